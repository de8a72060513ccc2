"""Stable Video Diffusion (Stability AI): the seed's video model (docs/sources.md section 1),
image-to-video: SVD-XT makes 25 frames per call, SVD 14.

SVD takes no prompt. Its motion comes from `motion_bucket_id` (1-255): the documents' motion
levels 1-3 are levels, not buckets, so the farm maps low/medium/high to 60/127/200 (127 is SVD's
default). It conditions on the film's frame rate, decodes in chunks of `decode_chunk_size` frames,
and its steps and chunk come from the seed's VRAM tier table.
"""

from __future__ import annotations

from typing import Any

from farm.families.base import Family, ShotInputs, Variant
from farm.presets import MotionLevel, Quality, Tier, video_steps

LICENCE = "Stability AI Community License (commercial use free under USD 1M annual revenue; check it)"
MOTION_BUCKETS: dict[MotionLevel, int] = {"low": 60, "medium": 127, "high": 200}


# docs/sources.md section 1: noise_aug_strength 0.0002-0.0005 for SVD-XT, 0.015-0.025 for SVD.
XT_NOISE, BASE_NOISE = (0.0002, 0.0005), (0.015, 0.025)


def motion_bucket(level: str, bucket_id: int | None) -> int:
    """An explicit bucket wins; else the motion level that applies (farm.presets.motion_level)."""
    if bucket_id is not None:
        return bucket_id
    return MOTION_BUCKETS[level]  # type: ignore[index]


def noise_for(variant: str, strength: float) -> float:
    """The farm's noise (on SVD-XT's scale) for `variant`: as is for XT; for SVD, the same place in its
    own range (0.0004, the middle of XT's, becomes 0.0217)."""
    if variant == "xt":
        return strength
    lo, hi = XT_NOISE
    share = min(max((strength - lo) / (hi - lo), 0.0), 1.0)
    return round(BASE_NOISE[0] + share * (BASE_NOISE[1] - BASE_NOISE[0]), 6)


class SVD(Family):
    name = "svd"
    title = "Stable Video Diffusion (image-to-video)"
    prompt_encoder = None
    role = "video"
    pipeline = "StableVideoDiffusionPipeline"
    classes = ("StableVideoDiffusionPipeline",)
    takes_prompt = False
    takes_negative_prompt = False
    default = True
    decode_chunk = True
    decode_only = ("decode_chunk_size",)
    channels_last = True
    ladder = (frozenset({"cpu_offload", "forward_chunking", "vae_slicing"}),)
    variants = {
        "xt": Variant(
            "xt", "SVD-XT (25 frames)", hub=(r"(^|[-_./])xt([-_.]|$)",), licence=LICENCE, commercial=False,
            repo="stabilityai/stable-video-diffusion-img2vid-xt", size_gb=10, weights_gb=4.51,
            frames_per_call=25, size=(1024, 576)),
        "base": Variant(
            "base", "SVD (14 frames)", hub=(r"stable-video-diffusion", r"(^|[-_./])svd"), licence=LICENCE,
            commercial=False, repo="stabilityai/stable-video-diffusion-img2vid", size_gb=10,
            frames_per_call=14, size=(1024, 576)),
    }
    default_variant = "xt"

    def steps(self, quality: Quality, tier: Tier, pinned: int | None, variant: str | None = None,
              preset: str | None = None) -> int:
        return video_steps(quality, tier, pinned)  # the seed's tier table

    def call_params(self, inputs: ShotInputs, variant: str | None = None) -> dict[str, Any]:
        return {"width": inputs.width, "height": inputs.height, "num_frames": inputs.frames,
                "num_inference_steps": inputs.steps, "decode_chunk_size": inputs.decode_chunk_size,
                "seed": inputs.seed, "motion_bucket_id": motion_bucket(inputs.motion_level, inputs.motion_bucket_id),
                "noise_aug_strength": noise_for(self.variant(variant).name, inputs.noise_aug_strength),
                "fps": inputs.fps,
                "min_guidance_scale": 1.0, "max_guidance_scale": 3.0}

    def tables(self) -> dict[str, Any]:
        return super().tables() | {"motion_buckets": dict(MOTION_BUCKETS),
                                   "noise_aug_strength": {"xt": list(XT_NOISE), "base": list(BASE_NOISE)}}


FAMILY = SVD()
