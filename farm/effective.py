"""Effective parameters of each stage: manifest + plan + the worker's preset -> the exact arguments
the family's pipeline receives. The farm decides the inputs (prompt, size, steps, seed, motion,
guidance) with the precedence `farm presets` prints (farm.presets.PRECEDENCE); the model family maps
them onto its call (farm/families/). Plain dicts, so they go straight into cache keys and the
lockfile."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from farm.families import Draft, ShotInputs, family
from farm.manifest import Manifest, Shot
from farm.models import ModelSpec
from farm.plan import Segment, ShotPlan
from farm.presets import Preset, Tier, motion_level, noise_aug_strength


def keyframe_params(manifest: Manifest, sp: ShotPlan, spec: ModelSpec, tier: Tier = "cpu",
                    draft: Draft | None = None) -> dict[str, Any]:
    """`draft`: a draft's distilled path (its own steps and guidance). The keyframe is drawn at the
    keyframe size rounded up to the family's multiple (the worker crops it back)."""
    shot, defaults = sp.shot, manifest.defaults
    fam = family(spec.family)
    width, height = fam.render_size(*manifest.output.keyframe_size, spec.variant)
    pinned = (shot.steps and shot.steps.keyframe) or manifest.steps.keyframe
    inputs = ShotInputs(
        prompt=shot.prompt, negative_prompt=negative_prompt(manifest, shot), width=width, height=height,
        steps=fam.steps(manifest.quality, tier, pinned, spec.variant), seed=sp.seed,
        guidance_scale=shot.guidance_scale if shot.guidance_scale is not None else defaults.guidance_scale,
        guidance_rescale=defaults.guidance_rescale)
    return fam.call_params(_drafted(inputs, draft), spec.variant)


def video_params(manifest: Manifest, sp: ShotPlan, segment: Segment, seed: int, spec: ModelSpec, preset: Preset,
                 fps: int, draft: Draft | None = None) -> dict[str, Any]:
    """`fps`: the film's rate (families that condition on it use it; those with a rate of their own
    generate at that). The size is the film's, or smaller where the worker's tier renders smaller."""
    shot, defaults = sp.shot, manifest.defaults
    fam = family(spec.family)
    width, height = fam.tier_size(preset.tier, *manifest.output.size)
    pinned = (shot.steps and shot.steps.video) or manifest.steps.video
    chosen = video_preset(manifest, shot)
    guidance = shot.video_guidance_scale if shot.video_guidance_scale is not None else defaults.video_guidance_scale
    if guidance is None and chosen is not None and chosen in fam.presets:
        guidance = fam.presets[chosen][1]
    inputs = ShotInputs(
        prompt=shot.prompt, negative_prompt=negative_prompt(manifest, shot), width=width, height=height,
        steps=fam.steps(manifest.quality, preset.tier, pinned, spec.variant, chosen), seed=seed,
        guidance_scale=guidance, frames=segment.frames, fps=fps, decode_chunk_size=preset.decode_chunk_size,
        motion=shot.motion, motion_level=motion_level(shot.motion, shot.scene, manifest.quality),
        motion_bucket_id=shot.motion_bucket_id,
        noise_aug_strength=noise_aug_strength(shot.noise_aug_strength, shot.scene, manifest.quality),
        subjects=shot.subjects)
    return fam.call_params(_drafted(inputs, draft), spec.variant)


def negative_prompt(manifest: Manifest, shot: Shot) -> str:
    return shot.negative_prompt if shot.negative_prompt is not None else manifest.defaults.negative_prompt


def video_preset(manifest: Manifest, shot: Shot) -> str | None:
    return shot.video_preset or manifest.defaults.video_preset


def _drafted(inputs: ShotInputs, draft: Draft | None) -> ShotInputs:
    if draft is None:
        return inputs
    return replace(inputs, steps=draft.steps, guidance_scale=draft.guidance)
