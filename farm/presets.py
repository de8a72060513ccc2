"""Every preset table of the farm, and the plain functions that turn a shot into effective parameters.

Sources: docs/sources.md section 1 (quality templates, scene presets, VRAM tiers, SVD-XT parameters) and
section 2 (I2VGen-XL guidance by motion, adaptive guidance). This module is the only place these
numbers live; the CLI prints them (`farm presets`), workers and the lockfile read them from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from typing import Any, Literal

Tier = Literal["high", "mid", "low", "cpu"]
TIERS: tuple[Tier, ...] = ("high", "mid", "low", "cpu")
GPU_TIERS: tuple[Tier, ...] = ("high", "mid", "low")
Quality = Literal["draft", "fast", "balanced", "high"]
Scene = Literal["static", "dynamic", "smooth"]
MotionLevel = Literal["low", "medium", "high"]

GIB = 1024**3


@dataclass(frozen=True)
class TierPreset:
    """What a worker of one VRAM tier may use: decode chunk and video step ranges plus memory knobs."""

    name: Tier
    vram: str
    decode_chunk: tuple[int, int]
    video_steps: tuple[int, int]
    cpu_offload: bool
    forward_chunking: bool
    vae_slicing: bool


# docs/sources.md "Presets by GPU memory". The cpu tier has no VRAM to protect; it takes the mid ranges
# so a laptop render looks like a mid-tier render, and no offload (there is nowhere to offload to).
TIER_PRESETS: dict[Tier, TierPreset] = {
    "high": TierPreset("high", "> 24 GB", (12, 14), (60, 70), False, False, False),
    "mid": TierPreset("mid", "16-24 GB", (8, 10), (50, 60), False, False, True),
    "low": TierPreset("low", "< 16 GB", (4, 6), (50, 50), True, True, True),
    "cpu": TierPreset("cpu", "no GPU", (8, 10), (50, 60), False, False, False),
}


def tier_for_vram(total_bytes: int) -> Tier:
    """VRAM tier of a GPU: high > 24 GB, mid 16-24 GB, low < 16 GB.

    Cards are sold as "16 GB"/"24 GB" but report a little less (a 24 GB card shows ~23.6 GiB),
    so the bounds allow 5% slack below the nominal size.
    """
    gib = total_bytes / GIB
    if gib > 24 * 1.0:
        return "high"
    if gib >= 16 * 0.95:
        return "mid"
    return "low"


# A worker forced to a tier on a bigger card may use only this much of it (`--tier low` on an 80 GB card
# must run out of memory where a real low card would, or the tier is a label and not a test). Each cap
# classifies as its own tier under `tier_for_vram`; high is never capped.
TIER_MEMORY_CAP: dict[Tier, int | None] = {"high": None, "mid": 24 * GIB, "low": 15 * GIB, "cpu": None}


def memory_fraction(tier: Tier, total_bytes: int) -> float | None:
    """The share of a card of `total_bytes` a worker running as `tier` may allocate
    (`torch.cuda.set_per_process_memory_fraction`); None when the card is no bigger than the tier."""
    cap = TIER_MEMORY_CAP[tier]
    if cap is None or total_bytes <= cap:
        return None
    return cap / total_bytes


@dataclass(frozen=True)
class QualityTemplate:
    name: Quality
    keyframe_steps: int
    video_steps: int
    fps: int
    decode_chunk: int
    motion_level: int  # the document's 1-3 motion level; see MOTION_BUCKETS for the real bucket
    noise_aug_strength: float
    crf: int
    x264_preset: str


# docs/sources.md "Quality templates". All templates: CFG 7.5, rescale 0.7, DPM++ 2M Karras.
QUALITY_TEMPLATES: dict[Quality, QualityTemplate] = {
    "high": QualityTemplate("high", 50, 70, 15, 12, 2, 0.0004, 18, "slow"),
    "balanced": QualityTemplate("balanced", 40, 60, 15, 10, 2, 0.0004, 20, "medium"),
    "fast": QualityTemplate("fast", 30, 50, 12, 6, 2, 0.0003, 23, "fast"),
    # Not a seed template: `quality: draft` is `--preview` written in the manifest (each family's
    # distilled path where it has one, else a few undistilled steps; small; quick to encode).
    "draft": QualityTemplate("draft", 4, 4, 15, 6, 2, 0.0003, 28, "veryfast"),
}
GUIDANCE_SCALE = 7.5
GUIDANCE_RESCALE = 0.7
NEGATIVE_PROMPT = "blurry, distorted"


@dataclass(frozen=True)
class ScenePreset:
    name: Scene
    motion: MotionLevel
    noise_aug_strength: float
    decode_chunk: tuple[int, int]


# docs/sources.md "Presets by scene"; noise_aug is the middle of the document's range.
SCENE_PRESETS: dict[Scene, ScenePreset] = {
    "static": ScenePreset("static", "low", 0.00025, (8, 10)),
    "dynamic": ScenePreset("dynamic", "high", 0.00045, (10, 14)),
    "smooth": ScenePreset("smooth", "medium", 0.0004, (10, 12)),
}

# The documents' motion levels 1-3 (docs/sources.md sections 1-2); families map them onto their own
# parameters (SVD's motion buckets, I2VGen-XL's guidance).
MOTION_LEVEL_NUMBER: dict[MotionLevel, int] = {"low": 1, "medium": 2, "high": 3}


# --- effective parameters ----------------------------------------------------------------------


def clamp(value: int, bounds: tuple[int, int]) -> int:
    return min(max(value, bounds[0]), bounds[1])


def video_steps(quality: Quality, tier: Tier, pinned: int | None) -> int:
    """Pinned steps win on every tier (shots look alike wherever they ran); else the template's
    steps clamped into the tier's range."""
    if pinned is not None:
        return pinned
    return clamp(QUALITY_TEMPLATES[quality].video_steps, TIER_PRESETS[tier].video_steps)


def keyframe_steps(quality: Quality, pinned: int | None) -> int:
    return pinned if pinned is not None else QUALITY_TEMPLATES[quality].keyframe_steps


def decode_chunk_size(quality: Quality, scene: Scene | None, tier: Tier) -> int:
    """The template's chunk, capped by the scene's range (where the shot names a scene), then fitted
    into the tier's memory range."""
    wanted = QUALITY_TEMPLATES[quality].decode_chunk
    if scene is not None:
        wanted = min(wanted, SCENE_PRESETS[scene].decode_chunk[1])
    return clamp(wanted, TIER_PRESETS[tier].decode_chunk)


LEVEL_NAMES: dict[int, MotionLevel] = {n: name for name, n in MOTION_LEVEL_NUMBER.items()}


def motion_level(motion: MotionLevel | None, scene: Scene | None, quality: Quality) -> MotionLevel:
    """A shot's motion level: its own, else its scene's, else the quality template's."""
    if motion is not None:
        return motion
    if scene is not None:
        return SCENE_PRESETS[scene].motion
    return LEVEL_NAMES[QUALITY_TEMPLATES[quality].motion_level]


def noise_aug_strength(explicit: float | None, scene: Scene | None, quality: Quality) -> float:
    """SVD's conditioning noise on SVD-XT's scale: the shot's own, else its scene's, else the quality
    template's (the family maps it onto the non-XT model's range)."""
    if explicit is not None:
        return explicit
    if scene is not None:
        return SCENE_PRESETS[scene].noise_aug_strength
    return QUALITY_TEMPLATES[quality].noise_aug_strength


# Where each parameter comes from, first match wins (`farm presets` prints this).
PRECEDENCE: dict[str, list[str]] = {
    "keyframe steps": ["shot steps.keyframe", "job steps.keyframe", "the family's draft path (drafts)",
                       "quality template (SDXL) or the family's default for the quality"],
    "video steps": ["shot steps.video", "job steps.video", "shot video_preset / job defaults.video_preset "
                    "(I2VGen-XL)", "the family's draft path (drafts)", "quality template clamped into the "
                    "worker tier's range (SVD, I2VGen-XL) or the family's default for the quality"],
    "keyframe guidance": ["shot guidance_scale", "job defaults.guidance_scale", "the family's default"],
    "video guidance": ["shot video_guidance_scale", "job defaults.video_guidance_scale",
                       "video_preset's guidance (I2VGen-XL)", "adaptive rule by motion (I2VGen-XL) or the family's "
                       "default"],
    "motion": ["shot motion_bucket_id (SVD)", "shot motion", "shot scene's motion", "quality template's motion "
               "level"],
    "noise_aug_strength": ["shot noise_aug_strength", "shot scene's", "quality template's",
                           "then mapped onto the model's range (SVD 0.015-0.025, SVD-XT as given)"],
    "decode_chunk_size": ["the decode stage's OOM ladder rung (halved down to the tier's floor)",
                          "quality template's, capped by the shot scene's range, clamped into the decoding "
                          "worker tier's range (SVD, I2VGen-XL; Wan and LTX decode whole, tiling on the ladder)"],
    "memory knobs": ["OOM ladder rung", "the family's knobs for the worker's tier (a forced tier caps the card "
                     "to that tier's size)"],
}


@dataclass(frozen=True)
class MemoryKnobs:
    """Memory savers a worker applies to a loaded pipeline (farm.gpu.loading says how). A knob a
    pipeline or device cannot honour is reported off, not raised."""

    cpu_offload: bool = False  # whole models move to the GPU only while they run
    forward_chunking: bool = False  # the denoiser's feed-forward one slice at a time
    vae_slicing: bool = False  # decode one image/frame batch slice at a time
    group_offload: bool = False  # leaf-level offload with CUDA streams (Wan 14B in ~13 GB)
    vae_tiling: bool = False  # decode in spatial tiles (video VAEs at 720p)
    fp8_storage: bool = False  # denoiser weights stored in fp8, computed in bf16 (layerwise casting)

    @classmethod
    @cache  # asked for every stage a director prices
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def on(self) -> frozenset[str]:
        return frozenset(name for name in self.names() if getattr(self, name))

    def with_on(self, names: frozenset[str]) -> MemoryKnobs:
        return replace(self, **{name: True for name in names})

    @property
    def resident(self) -> bool:
        """Whether every weight stays on the card in bf16 (no offload, no fp8 storage)."""
        return not (self.cpu_offload or self.group_offload or self.fp8_storage)


# The share of a card the weights alone may take and still leave room for a call's activations. Below
# it a preset that keeps them resident cannot run: FLUX.1's 33.7 GB of weights on a 32 GB high-tier card.
WEIGHTS_SHARE = 0.9


def holds_weights(knobs: MemoryKnobs, weights_bytes: float | None, usable_bytes: float | None) -> bool:
    """Whether a preset with these knobs can hold a model's weights on a card with `usable_bytes` (a
    tier cap included). Unknown sizes say yes: the OOM ladder still catches what does not fit."""
    if not knobs.resident or weights_bytes is None or usable_bytes is None:
        return True
    return weights_bytes <= WEIGHTS_SHARE * usable_bytes


def memory_knobs(tier: Tier) -> MemoryKnobs:
    """The seed's per-tier knobs (docs/sources.md section 1: low tier offloads, chunks, slices)."""
    preset = TIER_PRESETS[tier]
    return MemoryKnobs(preset.cpu_offload, preset.forward_chunking, preset.vae_slicing)


@dataclass(frozen=True)
class Preset:
    """What the OOM ladder walks down: the tier whose ranges apply, the video decode chunk (None where
    the stage has none), the memory knobs, and the rung (0 = the worker's own preset)."""

    tier: Tier
    decode_chunk_size: int | None
    knobs: MemoryKnobs
    step: int = 0

    def label(self) -> str:
        flags = [name for name, on in asdict(self.knobs).items() if on]
        head = self.tier if self.decode_chunk_size is None else f"{self.tier}/chunk{self.decode_chunk_size}"
        return head + ("+" + "+".join(flags) if flags else "")


def as_tier(tier: str) -> Tier:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
    return tier


LOWER_TIER: dict[Tier, Tier | None] = {"high": "mid", "mid": "low", "low": None, "cpu": None}


def next_lower_preset(preset: Preset, rungs: tuple[frozenset[str], ...],
                      lower: Callable[[Tier], Preset]) -> Preset | None:
    """The OOM ladder, one rung per call; None when there is nothing lower.

    1. Halve the decode chunk, down to the tier's floor (video families that decode in chunks).
    2. Turn on the family's next rung of memory knobs (`rungs`, in order).
    3. Take the next lower tier's preset (`lower(tier)`), keeping every knob turned on so far, where
       that changes something (a smaller chunk, fewer steps).
    """
    floor = TIER_PRESETS[preset.tier].decode_chunk[0]
    if preset.decode_chunk_size is not None and preset.decode_chunk_size > floor:
        return replace(preset, decode_chunk_size=max(floor, preset.decode_chunk_size // 2), step=preset.step + 1)
    for rung in rungs:
        if not rung <= preset.knobs.on():
            return replace(preset, knobs=preset.knobs.with_on(rung), step=preset.step + 1)
    tier = LOWER_TIER[preset.tier]
    if tier is None:
        return None
    below = lower(tier)
    below = replace(below, knobs=below.knobs.with_on(preset.knobs.on()), step=preset.step + 1)
    if below.decode_chunk_size == preset.decode_chunk_size and below.knobs == preset.knobs:
        return None  # a lower tier would run the very same thing
    return below


def tables() -> dict[str, Any]:
    """The seed's tables as plain data, for `farm presets` (which adds each model family's) and the docs."""
    return {
        "tiers": {k: asdict(v) for k, v in TIER_PRESETS.items()},
        "quality": {k: asdict(v) for k, v in QUALITY_TEMPLATES.items()},
        "scenes": {k: asdict(v) for k, v in SCENE_PRESETS.items()},
        "precedence": PRECEDENCE,
        "tier_memory_cap_gib": {t: (cap / GIB if cap else None) for t, cap in TIER_MEMORY_CAP.items()},
        "keyframe": {"guidance_scale": GUIDANCE_SCALE, "guidance_rescale": GUIDANCE_RESCALE,
                     "scheduler": "DPM++ 2M Karras", "negative_prompt": NEGATIVE_PROMPT},
        "effective_video": {
            q: {t: {"steps": video_steps(q, t, None), "decode_chunk_size": decode_chunk_size(q, "smooth", t)}
                for t in TIERS}
            for q in QUALITY_TEMPLATES
        },
    }


# --- draft renders -----------------------------------------------------------------------------

PREVIEW_LONG_SIDE = 256
PREVIEW_STEPS = QUALITY_TEMPLATES["draft"].keyframe_steps  # docs/sources.md section 3: the 4-8 step regime


def preview_size(width: int, height: int, long_side: int = PREVIEW_LONG_SIDE, multiple: int = 8) -> tuple[int, int]:
    """Scale so the long side is `long_side`, keeping the aspect ratio and multiples of `multiple`
    (what the job's model families need)."""
    scale = min(1.0, long_side / max(width, height))
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))
