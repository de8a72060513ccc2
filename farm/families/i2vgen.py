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
from farm.presets import MOTION_LEVEL_NUMBER, SCENE_PRESETS, MotionLevel, Quality, Tier, video_steps

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
    """docs/sources.md section 2: score = (subjects 1-3 + motion level 1-3) / 2 -> 7.0 / 9.0 / 11.0.

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


class I2VGen(Family):
    name = "i2vgen"
    title = "I2VGen-XL (image-to-video)"
    role = "video"
    pipeline = "I2VGenXLPipeline"
    classes = ("I2VGenXLPipeline",)
    decode_chunk = True
    shot_guidance = True  # the seed's I2VGen-XL guidance: the shot's value, else the adaptive rule
    ladder = (frozenset({"cpu_offload", "forward_chunking", "vae_slicing"}),)
    variants = {"base": Variant(
        "base", "I2VGen-XL", hub=(r"i2vgen",), licence="MIT", commercial=True, frames_per_call=16, size=(1280, 704),
        repo="ali-vilab/i2vgen-xl", size_gb=10)}
    default_variant = "base"

    def steps(self, quality: Quality, tier: Tier, pinned: int | None, variant: str | None = None) -> int:
        return video_steps(quality, tier, pinned)

    def call_params(self, inputs: ShotInputs, variant: str | None = None) -> dict[str, Any]:
        motion: MotionLevel = inputs.motion or SCENE_PRESETS[inputs.scene].motion  # type: ignore[assignment,index]
        guidance = inputs.guidance_scale or i2vgen_guidance(inputs.prompt, motion, inputs.subjects)
        return {"width": inputs.width, "height": inputs.height, "num_frames": inputs.frames,
                "num_inference_steps": inputs.steps, "decode_chunk_size": inputs.decode_chunk_size,
                "seed": inputs.seed, "prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt,
                "guidance_scale": guidance, "target_fps": inputs.fps}

    def tables(self) -> dict[str, Any]:
        return super().tables() | {
            "motion_types": {k: list(v) for k, v in I2VGEN_MOTION_TYPES.items()},
            "presets": {k: {"steps": s, "guidance": g} for k, (s, g) in I2VGEN_PRESETS.items()}}


FAMILY = I2VGen()
