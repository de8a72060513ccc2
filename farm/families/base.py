"""What every model family file says about its family, with no torch: the pure half of a family.

A family is one diffusers pipeline line (SDXL, FLUX.1, SVD, Wan, ...). Its pure half (a module in
this package) says what role it plays, how a hub id / folder / file is recognised as it, its sizes
and frame rules, how the farm's effective parameters map onto its pipeline call, its presets per
VRAM tier, its memory ladder and its licence. Its GPU half (`farm/gpu/families/<name>.py`) builds,
loads and calls the pipeline. Nothing else in the farm names a family.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

from farm.presets import TIER_PRESETS, MemoryKnobs, Preset, Quality, Scene, Tier, decode_chunk_size, next_lower_preset

Role = Literal["keyframe", "video"]


@dataclass(frozen=True)
class Variant:
    """One checkpoint line of a family: SVD vs SVD-XT, FLUX.1 schnell vs dev, Wan TI2V-5B vs I2V-14B."""

    name: str
    title: str
    hub: tuple[str, ...]  # regular expressions over the hub id (lower case) that mean this variant
    licence: str
    commercial: bool  # may its outputs be used commercially under that licence (check it either way)
    repo: str  # the official hub id, in diffusers format
    size_gb: float  # about how much a real render must fetch
    note: str = ""  # anything else a user must do first (accept a licence on the hub)
    frames_per_call: int = 1  # video: the frames one call makes (what the model was trained on)
    fps: int | None = None  # video: the rate the model generates at; None: it takes the film's rate
    size: tuple[int, int] = (1024, 576)  # its native width x height
    multiple: int = 8  # sides must be multiples of this
    steps: Mapping[str, int] = field(default_factory=dict)  # quality -> default denoising steps
    guidance: float = 7.5  # default classifier-free guidance
    distilled: bool = False  # a few-step distilled checkpoint: its own steps and guidance always
    pipeline: Mapping[str, Any] = field(default_factory=dict)  # extra pipeline settings (Wan 2.2 A14B)
    # What its weights take on the card in bf16, every component resident (GB): counted from the
    # published configs (bench/configs/, tests/test_gpu_bench.py checks them); None where no config is
    # kept. A worker whose card cannot hold them skips the presets that keep them resident.
    weights_gb: float | None = None

    @property
    def download(self) -> str:
        """How to fetch it for a real render (the farm never downloads unless told to)."""
        command = f"huggingface-cli download {self.repo}  # about {self.size_gb:g} GB"
        return f"{self.note}; {command}" if self.note else command

    def steps_for(self, quality: Quality) -> int:
        return self.steps.get(quality) or self.steps["balanced"]


@dataclass(frozen=True)
class Draft:
    """A family's real fast draft (`--preview`, `quality: draft`): a distilled path instead of a few
    undistilled steps. `lora`: a step-distillation LoRA on the same model (where it is on disk comes
    from the manifest's `models.<role>_draft` or the farm config's `models.paths["draft:<family>"]`);
    `variant`: the family's own distilled checkpoint."""

    name: str
    kind: Literal["lora", "variant"]
    steps: int
    guidance: float
    variant: str | None = None
    scheduler: str | None = None  # the sampler the distilled path needs (LCM-LoRA needs LCMScheduler)


@dataclass(frozen=True)
class ShotInputs:
    """What the farm decided for one stage, before any family maps it onto its pipeline call."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    seed: int
    guidance_scale: float | None = None  # None: the family's default
    guidance_rescale: float = 0.0
    frames: int = 1  # video: frames to generate in this call
    fps: int = 15  # video: the film's frame rate
    decode_chunk_size: int | None = None
    motion: str | None = None  # low | medium | high, as the shot names it
    motion_level: str = "medium"  # the level that applies: the shot's, else its scene's or the template's
    motion_bucket_id: int | None = None
    noise_aug_strength: float = 0.0004  # on SVD-XT's scale (farm.presets.noise_aug_strength)
    subjects: int = 1


_WORDS = re.compile(r"[^\W\d_]+|\d|[^\w\s]")


def estimate_tokens(text: str) -> int:
    """Tokens a BPE or SentencePiece tokenizer makes of `text`, estimated from above: a word per 5
    letters, each digit and each punctuation mark its own, plus the start and end tokens."""
    return 2 + sum(max(1, -(-len(w) // 5)) if w[0].isalpha() else 1 for w in _WORDS.findall(text))


class Family:
    """The pure half of a model family. Subclasses set the class attributes and may override the
    mapping methods; `farm.families.FAMILIES` holds one instance of each."""

    name: ClassVar[str]
    title: ClassVar[str]
    role: ClassVar[Role]
    pipeline: ClassVar[str]  # the diffusers pipeline class it is loaded and called with
    classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s that mean this family
    variants: ClassVar[dict[str, Variant]]
    default_variant: ClassVar[str]
    default: ClassVar[bool] = False  # what plain `tiny` means for the role
    fallback: ClassVar[bool] = False  # takes hub ids of its role that no family recognises
    single_file: ClassVar[str | None] = None  # hub id whose configs a single .safetensors loads against
    tiny_frames: ClassVar[int] = 8  # video: frames per call of the tiny stand-in
    min_side: ClassVar[int] = 32  # below it the latents vanish (a 1x1 latent for the x32 VAEs)
    frame_step: ClassVar[int] = 1  # video: valid frame counts are frame_step * k + 1 (1: any count)
    min_frames: ClassVar[int] = 2
    takes_prompt: ClassVar[bool] = True  # video: the model reads the shot's prompt
    # (the pipeline's tokenizer attribute that reads the whole prompt, the tokens it keeps): CLIP's 77
    # by default; the rest of a longer prompt is cut off without a word from diffusers
    prompt_encoder: ClassVar[tuple[str, int] | None] = ("tokenizer", 77)
    takes_negative_prompt: ClassVar[bool] = True  # FLUX (distilled guidance) and SVD read none
    embeddings: ClassVar[bool] = False  # keyframe: takes textual-inversion embeddings (CLIP text encoders)
    decode_chunk: ClassVar[bool] = False  # video: the VAE decodes in chunks of `decode_chunk_size` frames
    decode_only: ClassVar[tuple[str, ...]] = ()  # video: call parameters only the decode reads
    channels_last: ClassVar[bool] = False  # a UNet of 2-D convolutions, which NHWC speeds up
    draft: ClassVar[Draft | None] = None  # its real fast draft, where it has one
    presets: ClassVar[dict[str, tuple[int, float]]] = {}  # named (steps, guidance) a shot may pick
    step_cache: ClassVar[bool] = False  # its denoiser takes diffusers' cache hooks (FirstBlockCache)
    # Seconds per unit of work (farm.sim.costs.work_units) at 1024x576, measured on a GPU of a tier:
    # tier -> stage kind -> rate. The cost model uses them in place of its assumed tier-wide figures.
    measured_rates: ClassVar[dict[str, dict[str, float]]] = {}
    # keyframe: how a character's reference photos condition it, best first (docs/characters.md); the
    # farm config's models.paths names the adapter ("ip_adapter:<family>") and its image encoder
    # ("image_encoder:<family>")
    identity_methods: ClassVar[tuple[str, ...]] = ()
    identity_per_shot: ClassVar[int] = 4  # characters one keyframe call can hold (an adapter each)
    # Memory knobs each tier starts with; the OOM ladder turns on one rung after the other.
    tier_knobs: ClassVar[dict[Tier, frozenset[str]]] = {
        tier: frozenset(k for k in ("cpu_offload", "forward_chunking", "vae_slicing") if getattr(p, k))
        for tier, p in TIER_PRESETS.items()}
    ladder: ClassVar[tuple[frozenset[str], ...]] = (
        frozenset({"cpu_offload"}), frozenset({"vae_slicing"}), frozenset({"forward_chunking"}))

    def identity_method(self, asked: str | None) -> str | None:
        """The method a character is drawn with: the one asked for, else the family's best."""
        return asked or (self.identity_methods[0] if self.identity_methods else None)

    def identity_problem(self, asked: str | None) -> str | None:
        """Why this family cannot draw a character with `asked` (None: the family's best), or None."""
        if not self.identity_methods:
            from farm.families import FAMILIES

            able = ", ".join(f.title for f in FAMILIES.values() if f.identity_methods)
            return f"{self.title} takes no identity references in this farm (these keyframe families do: {able})"
        if asked is not None and asked not in self.identity_methods:
            return (f"{self.title} cannot use {asked} in this farm (it takes {', '.join(self.identity_methods)}; "
                    "docs/characters.md says what each needs)")
        return None

    def prompt_warning(self, prompt: str) -> str | None:
        """A warning when `prompt` is likely longer than this family reads, estimated without the
        tokenizer (the worker counts exactly and records it in the lockfile)."""
        if self.prompt_encoder is None:
            return None
        limit = self.prompt_encoder[1]
        estimate = estimate_tokens(prompt)
        if estimate <= limit:
            return None
        return (f"about {estimate} tokens: {self.title} reads the first {limit} and drops the rest "
                "(put what matters first, or shorten it)")

    @property
    def draft_key(self) -> str:
        """The farm config's `models.paths` key of this family's draft (a LoRA or a checkpoint)."""
        return f"draft:{self.name}"

    # --- recognising -------------------------------------------------------------------------

    def variant_of(self, text: str) -> str | None:
        """The variant a hub id or a folder/file name names, or None when nothing says."""
        name = text.lower()
        for variant in self.variants.values():
            if any(re.search(pattern, name) for pattern in variant.hub):
                return variant.name
        return None

    def variant_of_folder(self, index: Mapping[str, Any], path: Path) -> str | None:
        """The variant a saved pipeline folder holds: its model_index.json, then its name."""
        del index
        return self.variant_of(path.name)

    def variant(self, name: str | None) -> Variant:
        return self.variants[name or self.default_variant]

    # --- sizes and frames --------------------------------------------------------------------

    def size_error(self, width: int, height: int, variant: str | None = None) -> str | None:
        """Why this family cannot render width x height, or None."""
        multiple = self.variant(variant).multiple
        if width < self.min_side or height < self.min_side:
            return f"{self.title} needs sides of at least {self.min_side} px, not {width}x{height}"
        if width % multiple or height % multiple:
            return f"{self.title} needs sides that are multiples of {multiple}, not {width}x{height}"
        return None

    def render_size(self, width: int, height: int, variant: str | None = None) -> tuple[int, int]:
        """The size to draw a picture of width x height at: rounded up to the family's multiple (FLUX and
        SD3 draw 1920x1080 as 1920x1088), then cropped back (farm.frames)."""
        m = self.variant(variant).multiple
        return -(-width // m) * m, -(-height // m) * m

    def tier_size(self, tier: Tier, width: int, height: int) -> tuple[int, int]:
        """The size a worker of `tier` renders video at (frames are brought to the film's size after)."""
        del tier
        return width, height

    def valid_frames(self, frames: int) -> bool:
        return frames >= self.min_frames and (frames - 1) % self.frame_step == 0

    def _makeable(self, frames: int, top: int) -> int:
        """The smallest count the model can make that is at least `frames` (Wan: 4k+1, LTX: 8k+1)."""
        frames = max(frames, self.min_frames)
        if self.frame_step > 1:
            frames = -(-(frames - 1) // self.frame_step) * self.frame_step + 1
        return min(frames, top)

    def call_buckets(self, top: int) -> tuple[int, ...]:
        """The only call lengths the farm asks for: a half, three quarters and all of one call's worth
        (`top`), each rounded up to a count the model makes.

        A compiled denoiser (`dynamic=False`) recompiles for every new frame count, about a minute per
        worker, and shot lengths would otherwise give a new count per shot; very short calls (SVD-XT
        asked for 2 frames) also move badly, since the models learnt on full-length clips. So a call
        makes the smallest bucket that covers what it needs and the extra frames are dropped: at most
        three compiled shapes per model and size, for at most a third more frames on a shot's last call."""
        return tuple(sorted({self._makeable(-(-top * quarters // 4), top) for quarters in (2, 3, 4)}))

    def call_frames(self, needed: int, top: int) -> int:
        """The frames a call makes to give at least `needed`: the smallest bucket that covers it."""
        return next((b for b in self.call_buckets(top) if b >= needed), top)

    def generation_fps(self, film_fps: int, variant: str | None = None) -> int:
        """The rate frames are generated at: the model's own where it has one (the merge then brings
        every clip to the film's rate), else the film's."""
        return self.variant(variant).fps or film_fps

    # --- parameters --------------------------------------------------------------------------

    def steps(self, quality: Quality, tier: Tier, pinned: int | None, variant: str | None = None,
              preset: str | None = None) -> int:
        """Denoising steps: pinned steps win on every tier (shots look alike wherever they ran); a
        distilled checkpoint always takes its own; then a chosen preset's; else the variant's default
        for the quality."""
        v = self.variant(variant)
        if v.distilled:
            return v.steps_for(quality)
        if pinned is not None:
            return pinned
        if preset is not None and preset in self.presets:
            return self.presets[preset][0]
        return v.steps_for(quality)

    def decode_chunk_size(self, quality: Quality, scene: Scene | None, tier: Tier) -> int | None:
        """Frames per VAE decode call, for families that decode in chunks (the seed's rule)."""
        return decode_chunk_size(quality, scene, tier) if self.decode_chunk else None

    def guidance(self, inputs: ShotInputs, variant: str | None = None) -> float:
        v = self.variant(variant)
        if v.distilled or inputs.guidance_scale is None:
            return v.guidance
        return inputs.guidance_scale

    def call_params(self, inputs: ShotInputs, variant: str | None = None) -> dict[str, Any]:
        """The pipeline call's arguments (image and generator aside) plus `seed`: what the worker passes,
        what the cache key hashes and what the lockfile shows."""
        raise NotImplementedError

    def split_params(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A video call's parameters as its two stages take them: the denoising's (which key the
        latents) and the decode's (its own, plus the frame count, size and seed it needs)."""
        denoise = {k: v for k, v in params.items() if k not in self.decode_only}
        decode = {k: params[k] for k in (*self.decode_only, "num_frames", "width", "height", "seed") if k in params}
        return denoise, decode

    def knobs(self, tier: Tier, variant: str | None = None) -> MemoryKnobs:
        return _knobs(self.tier_knobs[tier])

    def preset(self, tier: Tier, quality: Quality, scene: Scene | None, variant: str | None = None) -> Preset:
        """A worker of `tier`'s own preset for this family: its memory knobs and decode chunk."""
        chunk = self.decode_chunk_size(quality, scene, tier) if self.role == "video" else None
        return Preset(tier, chunk, self.knobs(tier, variant))

    def next_preset(self, preset: Preset, quality: Quality, scene: Scene | None,
                    variant: str | None = None) -> Preset | None:
        """One rung down this family's OOM ladder (farm.presets.next_lower_preset)."""
        return next_lower_preset(preset, self.ladder, lambda t: self.preset(t, quality, scene, variant))

    def tables(self) -> dict[str, Any]:
        """This family's facts for `farm presets` and `farm families`."""
        return {
            "title": self.title, "role": self.role, "pipeline": self.pipeline,
            "variants": {v.name: {"title": v.title, "licence": v.licence, "commercial": v.commercial,
                                  "frames_per_call": v.frames_per_call, "fps": v.fps, "size": list(v.size),
                                  "multiple": v.multiple, "steps": dict(v.steps), "guidance": v.guidance,
                                  "distilled": v.distilled, "repo": v.repo, "download": v.download,
                                  "hub": list(v.hub)}
                         for v in self.variants.values()},
            "frames": {"step": self.frame_step, "min": self.min_frames} if self.role == "video" else None,
            "tier_knobs": {t: sorted(k) for t, k in self.tier_knobs.items()},
            "draft": None if self.draft is None else {"name": self.draft.name, "kind": self.draft.kind,
                                                      "steps": self.draft.steps, "guidance": self.draft.guidance,
                                                      "variant": self.draft.variant, "scheduler": self.draft.scheduler,
                                                      "config_key": self.draft_key},
            "step_cache": self.step_cache,
            "presets": {k: {"steps": s, "guidance": g} for k, (s, g) in self.presets.items()},
            "oom_ladder": [sorted(r) for r in self.ladder],
        }


@cache  # a knob set is asked for every stage a director prices; there are a handful
def _knobs(on: frozenset[str]) -> MemoryKnobs:
    return MemoryKnobs(**{name: name in on for name in MemoryKnobs.names()})
