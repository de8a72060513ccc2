"""Every preset table of the farm, and the plain functions that turn a shot into effective parameters.

Sources: docs/sources.md section 1 (quality templates, scene presets, VRAM tiers, SVD-XT parameters) and
section 2 (I2VGen-XL guidance by motion, adaptive guidance). This module is the only place these
numbers live; the CLI prints them (`farm presets`), workers and the lockfile read them from here.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

Tier = Literal["high", "mid", "low", "cpu"]
TIERS: tuple[Tier, ...] = ("high", "mid", "low", "cpu")
GPU_TIERS: tuple[Tier, ...] = ("high", "mid", "low")
Quality = Literal["fast", "balanced", "high"]
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

# The document's motion levels 1-3 are levels, not buckets: SVD's motion_bucket_id is 1-255
# (default 127, more = more motion). Level 2 ("smooth") is SVD's default bucket.
MOTION_BUCKETS: dict[MotionLevel, int] = {"low": 60, "medium": 127, "high": 200}
MOTION_LEVEL_NUMBER: dict[MotionLevel, int] = {"low": 1, "medium": 2, "high": 3}


def motion_bucket(level: MotionLevel | None, bucket_id: int | None, scene: Scene) -> int:
    if bucket_id is not None:
        return bucket_id
    return MOTION_BUCKETS[level or SCENE_PRESETS[scene].motion]


# --- I2VGen-XL guidance (docs/sources.md section 2) -------------------------------------------------

# Guidance ranges by motion type; the adaptive score picks a value, the type clamps it.
I2VGEN_MOTION_TYPES: dict[str, tuple[float, float]] = {
    "micro": (7.0, 8.0),  # "leaves gently swaying"
    "medium": (9.0, 10.0),  # "person turning head"
    "strong": (11.0, 12.0),  # "dog jumping over fence"
    "camera": (10.0, 11.0),  # "camera zooming in slowly"
    "compound": (11.0, 12.5),  # "waves crashing while camera pans right"
}
I2VGEN_PRESETS: dict[str, tuple[int, float]] = {
    "preview": (30, 7.0),
    "standard": (50, 9.0),
    "high_motion": (60, 11.0),
    "creative": (40, 6.5),
}
MOTION_KEYWORDS: dict[int, tuple[str, ...]] = {
    1: ("sway", "breath", "float", "drift", "gentle", "gently"),
    2: ("walk", "turn", "pan", "panning"),
    3: ("jump", "run", "crash", "explod", "gallop", "sprint"),
}
CAMERA_KEYWORDS = ("camera", "zoom", "pan", "dolly", "tilt", "tracking shot", "orbit")


def keyword_motion_level(prompt: str) -> int | None:
    """Highest motion level named by the prompt's words (1 low, 2 medium, 3 high), or None."""
    words = prompt.lower()
    found = [level for level, keys in MOTION_KEYWORDS.items() if any(k in words for k in keys)]
    return max(found) if found else None


def adaptive_guidance(subjects: int, motion_level: int) -> float:
    """docs/sources.md: score = (subjects 1-3 + motion level 1-3) / 2 -> 7.0 / 9.0 / 11.0.

    As written the score never exceeds 3.0, so this alone never returns 11.0; `i2vgen_guidance`
    clamps it into the motion type's range, which is what gives strong motion its 11-12."""
    score = (min(max(subjects, 1), 3) + motion_level) / 2
    if score <= 1.5:
        return 7.0
    if score <= 3.0:
        return 9.0
    return 11.0


def i2vgen_motion_type(prompt: str, motion_level: int) -> str:
    words = prompt.lower()
    camera = bool(re.search(r"\b(" + "|".join(CAMERA_KEYWORDS) + r")", words))
    if camera and motion_level >= 3:
        return "compound"
    if camera:
        return "camera"
    return {1: "micro", 2: "medium", 3: "strong"}[motion_level]


def i2vgen_guidance(prompt: str, motion: MotionLevel, subjects: int = 1) -> float:
    """Adaptive guidance, clamped into the range of the prompt's motion type."""
    level = keyword_motion_level(prompt) or MOTION_LEVEL_NUMBER[motion]
    lo, hi = I2VGEN_MOTION_TYPES[i2vgen_motion_type(prompt, level)]
    return min(max(adaptive_guidance(subjects, level), lo), hi)


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


def decode_chunk_size(quality: Quality, scene: Scene, tier: Tier) -> int:
    """The template's chunk, capped by the scene's range, then fitted into the tier's memory range."""
    wanted = min(QUALITY_TEMPLATES[quality].decode_chunk, SCENE_PRESETS[scene].decode_chunk[1])
    return clamp(wanted, TIER_PRESETS[tier].decode_chunk)


@dataclass(frozen=True)
class MemoryKnobs:
    cpu_offload: bool
    forward_chunking: bool
    vae_slicing: bool


def memory_knobs(tier: Tier) -> MemoryKnobs:
    preset = TIER_PRESETS[tier]
    return MemoryKnobs(preset.cpu_offload, preset.forward_chunking, preset.vae_slicing)


@dataclass(frozen=True)
class Preset:
    """What the OOM ladder walks down: the tier whose ranges apply, the video decode chunk (None for
    keyframe stages, which have none), the memory knobs, and the rung (0 = the worker's own preset)."""

    tier: Tier
    decode_chunk_size: int | None
    knobs: MemoryKnobs
    step: int = 0

    def label(self) -> str:
        flags = [name for name, on in asdict(self.knobs).items() if on]
        head = self.tier if self.decode_chunk_size is None else f"{self.tier}/chunk{self.decode_chunk_size}"
        return head + ("+" + "+".join(flags) if flags else "")


def video_preset(quality: Quality, scene: Scene, tier: Tier | str) -> Preset:
    t = as_tier(tier)
    return Preset(t, decode_chunk_size(quality, scene, t), memory_knobs(t))


def keyframe_preset(tier: Tier | str) -> Preset:
    t = as_tier(tier)
    return Preset(t, None, memory_knobs(t))


def as_tier(tier: str) -> Tier:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
    return tier


LOWER_TIER: dict[Tier, Tier | None] = {"high": "mid", "mid": "low", "low": None, "cpu": None}
ALL_ON = MemoryKnobs(True, True, True)
# A keyframe's ladder, one knob per rung: offload the models, then decode the image in slices, then
# the low tier's last setting (chunked feed-forward). Its parameters do not depend on the tier.
KEYFRAME_LADDER = ("cpu_offload", "vae_slicing", "forward_chunking")


def next_lower_preset(preset: Preset, quality: Quality, scene: Scene) -> Preset | None:
    """The OOM ladder. Video: halve the decode chunk (down to the tier's floor), then turn on offload
    and slicing, then take the next lower tier's settings. Keyframe: turn on one more memory knob per
    rung (KEYFRAME_LADDER). None when there is nothing lower."""
    if preset.decode_chunk_size is None:
        for knob in KEYFRAME_LADDER:
            if not getattr(preset.knobs, knob):
                return replace(preset, knobs=replace(preset.knobs, **{knob: True}), step=preset.step + 1)
        return None
    floor = TIER_PRESETS[preset.tier].decode_chunk[0]
    if preset.decode_chunk_size > floor:
        return replace(preset, decode_chunk_size=max(floor, preset.decode_chunk_size // 2), step=preset.step + 1)
    if preset.knobs != ALL_ON:
        return replace(preset, knobs=ALL_ON, step=preset.step + 1)
    lower = LOWER_TIER[preset.tier]
    if lower is None:
        return None
    return replace(video_preset(quality, scene, lower), knobs=ALL_ON, step=preset.step + 1)


def tables() -> dict[str, Any]:
    """Every table as plain data, for `farm presets` and the docs."""
    return {
        "tiers": {k: asdict(v) for k, v in TIER_PRESETS.items()},
        "quality": {k: asdict(v) for k, v in QUALITY_TEMPLATES.items()},
        "scenes": {k: asdict(v) for k, v in SCENE_PRESETS.items()},
        "motion_buckets": dict(MOTION_BUCKETS),
        "i2vgen_motion_types": {k: list(v) for k, v in I2VGEN_MOTION_TYPES.items()},
        "i2vgen_presets": {k: {"steps": s, "guidance": g} for k, (s, g) in I2VGEN_PRESETS.items()},
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
PREVIEW_STEPS = 4  # docs/sources.md section 3: distilled few-step sampling is the preview regime (4-8 steps)


def preview_size(width: int, height: int, long_side: int = PREVIEW_LONG_SIDE) -> tuple[int, int]:
    """Scale so the long side is `long_side`, keeping the aspect ratio and multiples of 8."""
    scale = min(1.0, long_side / max(width, height))
    return (max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8))
