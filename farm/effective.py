"""Effective parameters of each stage: manifest + plan + the worker's preset -> the exact
arguments a pipeline receives. Plain dicts, so they go straight into cache keys and the lockfile."""

from __future__ import annotations

from typing import Any

from farm.manifest import Manifest
from farm.plan import Segment, ShotPlan
from farm.presets import (
    SCENE_PRESETS,
    Preset,
    i2vgen_guidance,
    keyframe_steps,
    motion_bucket,
    video_steps,
)


def keyframe_params(manifest: Manifest, sp: ShotPlan) -> dict[str, Any]:
    shot, defaults = sp.shot, manifest.defaults
    width, height = manifest.output.size
    pinned = (shot.steps and shot.steps.keyframe) or manifest.steps.keyframe
    return {
        "prompt": shot.prompt,
        "negative_prompt": shot.negative_prompt if shot.negative_prompt is not None else defaults.negative_prompt,
        "width": width,
        "height": height,
        "num_inference_steps": keyframe_steps(manifest.quality, pinned),
        "guidance_scale": shot.guidance_scale if shot.guidance_scale is not None else defaults.guidance_scale,
        "guidance_rescale": defaults.guidance_rescale,
        "seed": sp.seed,
    }


def video_params(manifest: Manifest, sp: ShotPlan, segment: Segment, seed: int, family: str,
                 preset: Preset, fps: int) -> dict[str, Any]:
    shot = sp.shot
    width, height = manifest.output.size
    pinned = (shot.steps and shot.steps.video) or manifest.steps.video
    common = {
        "width": width,
        "height": height,
        "num_frames": segment.frames,
        "num_inference_steps": video_steps(manifest.quality, preset.tier, pinned),
        "decode_chunk_size": preset.decode_chunk_size,
        "seed": seed,
    }
    if family == "i2vgen":
        motion = shot.motion or SCENE_PRESETS[shot.scene].motion
        guidance = shot.guidance_scale or i2vgen_guidance(shot.prompt, motion, shot.subjects)
        negative = shot.negative_prompt if shot.negative_prompt is not None else manifest.defaults.negative_prompt
        return {**common, "prompt": shot.prompt, "negative_prompt": negative,
                "guidance_scale": guidance, "target_fps": fps}
    return {
        **common,
        "motion_bucket_id": motion_bucket(shot.motion, shot.motion_bucket_id, shot.scene),
        "noise_aug_strength": SCENE_PRESETS[shot.scene].noise_aug_strength,
        "fps": fps,
        "min_guidance_scale": 1.0,
        "max_guidance_scale": 3.0,
    }
