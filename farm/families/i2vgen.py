"""I2VGen-XL (Alibaba), image-to-video with a prompt: the seeds' second video backend
(docs/sources.md section 2). Deprecated in diffusers but importable; 16 frames per call.

Guidance follows the document's motion table and adaptive rule: the score (subjects 1-3 + motion
level 1-3) / 2 picks 7.0 / 9.0 / 11.0, clamped into the range of the prompt's motion type. Steps
and decode chunk come from the seed's VRAM tier table, like SVD's.
"""

from __future__ import annotations

import re
from typing import Any

from farm.families.base import Family, ShotInputs, Variant
from farm.presets import MOTION_LEVEL_NUMBER, MotionLevel, Quality, Tier

# Guidance ranges by motion type; the adaptive score picks a value, the type clamps it.
I2VGEN_MOTION_TYPES: dict[str, tuple[float, float]] = {
    "micro": (7.0, 8.0),  # "leaves gently swaying"
    "medium": (9.0, 10.0),  # "person turning head"
    "strong": (11.0, 12.0),  # "dog jumping over fence"
    "camera": (10.0, 11.0),  # "camera zooming in slowly"
    "compound": (11.0, 12.5),  # "waves crashing while camera pans right"
}
LOW_TIER_LINES = 512
I2VGEN_PRESETS: dict[str, tuple[int, float]] = {
    "preview": (30, 7.0),
    "standard": (50, 9.0),
    "high_motion": (60, 11.0),
    "creative": (40, 6.5),
}
# The documents' keywords (docs/sources.md section 2), matched as whole words with their inflections
# only: "run" must not fire inside "brunette", "pan" inside "panoramic", "breath" inside
# "breathtaking".
MOTION_KEYWORDS: dict[int, tuple[str, ...]] = {
    1: (r"sway(?:s|ing|ed)?", r"breath(?:e|es|ing|ed)?", r"float(?:s|ing|ed)?", r"drift(?:s|ing|ed)?",
        r"gentle", r"gently"),
    2: (r"walk(?:s|ing|ed)?", r"turn(?:s|ing|ed)?", r"pan(?:s|ning|ned)?"),
    3: (r"jump(?:s|ing|ed)?", r"run(?:s|ning)?", r"ran", r"crash(?:es|ing|ed)?", r"explod(?:e|es|ing|ed)",
        r"explosions?", r"gallop(?:s|ing|ed)?", r"sprint(?:s|ing|ed)?"),
}
CAMERA_KEYWORDS = (r"camera", r"zoom(?:s|ing|ed)?", r"pan(?:s|ning|ned)?", r"dolly", r"tilt(?:s|ing|ed)?",
                   r"tracking shot", r"orbit(?:s|ing|ed)?")


def _words(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b")


_LEVELS = {level: _words(keys) for level, keys in MOTION_KEYWORDS.items()}
_CAMERA = _words(CAMERA_KEYWORDS)


def keyword_motion_level(prompt: str) -> int | None:
    """Highest motion level named by the prompt's words (1 low, 2 medium, 3 high), or None."""
    words = prompt.lower()
    found = [level for level, pattern in _LEVELS.items() if pattern.search(words)]
    return max(found) if found else None


def adaptive_guidance(subjects: int, motion_level: int) -> float:
    """docs/sources.md section 2: score = (subjects 1-3 + motion level 1-3) / 2 -> 7.0 / 9.0 / 11.0.

    As written (<= 1.5 -> 7.0, <= 3.0 -> 9.0, else 11.0) the rule never reaches 11.0, since the score is
    at most 3.0. The farm reads the thresholds as strict: < 1.5 -> 7.0, < 3.0 -> 9.0, and the top
    score (three subjects in high motion) -> 11.0. The motion type's range then clamps the value."""
    score = (min(max(subjects, 1), 3) + motion_level) / 2
    if score < 1.5:
        return 7.0
    if score < 3.0:
        return 9.0
    return 11.0


def i2vgen_motion_type(prompt: str, motion_level: int) -> str:
    camera = bool(_CAMERA.search(prompt.lower()))
    if camera and motion_level >= 3:
        return "compound"
    if camera:
        return "camera"
    return {1: "micro", 2: "medium", 3: "strong"}[motion_level]


def i2vgen_guidance(prompt: str, motion: MotionLevel | None, subjects: int = 1,
                    fallback: MotionLevel = "medium") -> float:
    """Adaptive guidance, clamped into the range of the prompt's motion type. An explicit `motion`
    always wins; the prompt's keywords only speak when the shot names none (then `fallback`, the
    scene's or template's level)."""
    level = MOTION_LEVEL_NUMBER[motion] if motion else keyword_motion_level(prompt) or MOTION_LEVEL_NUMBER[fallback]
    lo, hi = I2VGEN_MOTION_TYPES[i2vgen_motion_type(prompt, level)]
    return min(max(adaptive_guidance(subjects, level), lo), hi)


class I2VGen(Family):
    name = "i2vgen"
    title = "I2VGen-XL (image-to-video)"
    role = "video"
    pipeline = "I2VGenXLPipeline"
    classes = ("I2VGenXLPipeline",)
    decode_chunk = True
    decode_only = ("decode_chunk_size",)
    ladder = (frozenset({"cpu_offload", "forward_chunking", "vae_slicing"}),)
    variants = {"base": Variant(
        "base", "I2VGen-XL", hub=(r"i2vgen",), licence="MIT", commercial=True, frames_per_call=16, size=(1280, 704),
        repo="ali-vilab/i2vgen-xl", size_gb=10, weights_gb=4.98)}
    default_variant = "base"
    presets = I2VGEN_PRESETS

    def steps(self, quality: Quality, tier: Tier, pinned: int | None, variant: str | None = None,
              preset: str | None = None) -> int:
        """Pinned steps, else the shot's or job's preset's, else the quality's preset (preview for drafts
        and fast renders, standard otherwise): I2VGen-XL's own table, not SVD's tier table."""
        if pinned is not None:
            return pinned
        return self.presets[preset or ("preview" if quality in ("draft", "fast") else "standard")][0]

    def tier_size(self, tier: Tier, width: int, height: int) -> tuple[int, int]:
        """docs/sources.md section 2: below 16 GB, at most 512p (and 16 frames, its call length)."""
        if tier != "low" or min(width, height) <= LOW_TIER_LINES:
            return width, height
        scale = LOW_TIER_LINES / min(width, height)
        return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)

    def call_params(self, inputs: ShotInputs, variant: str | None = None) -> dict[str, Any]:
        guidance = inputs.guidance_scale or i2vgen_guidance(inputs.prompt, inputs.motion,  # type: ignore[arg-type]
                                                             inputs.subjects, inputs.motion_level)  # type: ignore[arg-type]
        return {"width": inputs.width, "height": inputs.height, "num_frames": inputs.frames,
                "num_inference_steps": inputs.steps, "decode_chunk_size": inputs.decode_chunk_size,
                "seed": inputs.seed, "prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt,
                "guidance_scale": guidance, "target_fps": inputs.fps}

    def tables(self) -> dict[str, Any]:
        return super().tables() | {"motion_types": {k: list(v) for k, v in I2VGEN_MOTION_TYPES.items()},
                                   "low_tier_max_lines": LOW_TIER_LINES}


FAMILY = I2VGen()
