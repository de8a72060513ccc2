"""Effective parameters of each stage: manifest + plan + the worker's preset -> the exact arguments
the family's pipeline receives. The farm decides the inputs (prompt, size, steps, seed, motion);
the model family maps them onto its call (farm/families/). Plain dicts, so they go straight into
cache keys and the lockfile."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from farm.families import Draft, ShotInputs, family
from farm.manifest import Manifest
from farm.models import ModelSpec
from farm.plan import Segment, ShotPlan
from farm.presets import Preset, Tier


def keyframe_params(manifest: Manifest, sp: ShotPlan, spec: ModelSpec, tier: Tier = "cpu",
                    draft: Draft | None = None) -> dict[str, Any]:
    """`draft`: a draft's distilled path (its own steps and guidance)."""
    shot, defaults = sp.shot, manifest.defaults
    fam = family(spec.family)
    width, height = manifest.output.size
    pinned = (shot.steps and shot.steps.keyframe) or manifest.steps.keyframe
    inputs = ShotInputs(
        prompt=shot.prompt,
        negative_prompt=shot.negative_prompt if shot.negative_prompt is not None else defaults.negative_prompt,
        width=width, height=height, steps=fam.steps(manifest.quality, tier, pinned, spec.variant),
        seed=sp.seed,
        guidance_scale=shot.guidance_scale if shot.guidance_scale is not None else defaults.guidance_scale,
        guidance_rescale=defaults.guidance_rescale)
    return fam.call_params(_drafted(inputs, draft), spec.variant)


def video_params(manifest: Manifest, sp: ShotPlan, segment: Segment, seed: int, spec: ModelSpec, preset: Preset,
                 fps: int, draft: Draft | None = None) -> dict[str, Any]:
    """`fps`: the film's rate (families that condition on it use it; those with a rate of their own
    generate at that)."""
    shot = sp.shot
    fam = family(spec.family)
    width, height = manifest.output.size
    pinned = (shot.steps and shot.steps.video) or manifest.steps.video
    inputs = ShotInputs(
        prompt=shot.prompt,
        negative_prompt=shot.negative_prompt if shot.negative_prompt is not None else manifest.defaults.negative_prompt,
        width=width, height=height, steps=fam.steps(manifest.quality, preset.tier, pinned, spec.variant),
        seed=seed, guidance_scale=shot.guidance_scale if fam.shot_guidance else None, frames=segment.frames,
        fps=fps, decode_chunk_size=preset.decode_chunk_size, motion=shot.motion,
        motion_bucket_id=shot.motion_bucket_id, scene=shot.scene, subjects=shot.subjects)
    return fam.call_params(_drafted(inputs, draft), spec.variant)


def _drafted(inputs: ShotInputs, draft: Draft | None) -> ShotInputs:
    if draft is None:
        return inputs
    return replace(inputs, steps=draft.steps, guidance_scale=draft.guidance)
