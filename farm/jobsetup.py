"""A job's fixed facts, worked out once when the job is admitted: the validated manifest, its models,
its plan, its encode settings. Shared by the director, the API, `farm render`, `farm plan` and the
simulator, so they all see a job the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.cache import model_identity
from farm.config import current
from farm.encode import EncodeSettings
from farm.manifest import FieldError, Manifest, inside_root, validate_data
from farm.models import ModelSpec, missing, resolve_model, with_tiny
from farm.plan import Plan, build_plan
from farm.presets import QUALITY_TEMPLATES

MODEL_OVERRIDES = ("tiny",)


def resolve_models(manifest: Manifest, root: Path | None, override: str | None = None) -> dict[str, ModelSpec]:
    """The manifest's models, or their tiny stand-ins of the same family (`--models tiny`)."""
    m = manifest.models
    specs = {
        "keyframe": resolve_model("keyframe", m.keyframe, base_dir=root, allow_pickle=m.allow_pickle,
                                  revision=m.keyframe_revision),
        "video": resolve_model("video", m.video, base_dir=root, allow_pickle=m.allow_pickle,
                               revision=m.video_revision),
    }
    if override == "tiny":
        specs = {role: with_tiny(spec) for role, spec in specs.items()}
    elif override is not None:
        raise ValueError(f"--models must be one of {', '.join(MODEL_OVERRIDES)} (or omitted), not {override!r}")
    return specs


def model_errors(manifest: Manifest, root: Path | None, override: str | None = None) -> list[FieldError]:
    """The manifest's models that cannot be loaded here without a download, each naming its field and
    how to fetch it. With `--models tiny` the tiny builds stand in and nothing is checked."""
    if override == "tiny":
        return []
    allow = current().models.allow_download
    return [FieldError(("models", role), msg) for role, spec in resolve_models(manifest, root).items()
            if (msg := missing(spec, allow)) is not None]


def encode_settings(manifest: Manifest) -> EncodeSettings:
    template = QUALITY_TEMPLATES[manifest.quality]
    out = manifest.output
    return EncodeSettings(crf=out.crf if out.crf is not None else template.crf,
                          preset=out.preset or template.x264_preset, bitrate=out.bitrate)


def encode_identity(settings: EncodeSettings) -> dict[str, Any]:
    """What of the encode settings determines the output: cache keys and the lockfile record this."""
    return {"crf": settings.crf, "preset": settings.preset, "bitrate": settings.bitrate}


def merge_options(manifest: Manifest, fps: int) -> dict[str, Any]:
    out = manifest.output
    return {"fps": fps, "transition": out.transition, "crossfade_seconds": out.crossfade_seconds,
            "final_resolution": out.final_size, "interpolate_fps": out.interpolate_fps}


@dataclass(frozen=True)
class JobSetup:
    manifest: Manifest
    root: Path
    plan: Plan
    specs: dict[str, ModelSpec]  # role -> model
    identity: dict[str, dict[str, Any]]  # role -> model identity (with its revision)
    encode: EncodeSettings
    merge_options: dict[str, Any]
    overrides: dict[str, str | None]  # the keyframe model's LoRA and VAE, as absolute paths
    preview: bool = False

    @property
    def fps(self) -> int:
        return self.plan.fps

    @property
    def tiny(self) -> bool:
        return all(spec.is_tiny for spec in self.specs.values())

    def encode_identity(self) -> dict[str, Any]:
        return encode_identity(self.encode)


def setup_job(manifest_data: dict[str, Any] | Manifest, root: Path | str, options: dict[str, Any] | None = None,
              *, check_files: bool = True) -> JobSetup:
    """Validate and plan a job. Raises ManifestError (field paths) or ModelError/ValueError for models.

    `options`: {"models": "tiny" | None, "preview": bool}. Reads model folders' metadata (revisions),
    never weights."""
    from farm.preview import preview

    options = options or {}
    root = Path(root)
    if isinstance(manifest_data, Manifest):
        manifest = manifest_data
    else:
        manifest = validate_data(manifest_data, root if check_files else None)
    specs = resolve_models(manifest, root, options.get("models"))
    if options.get("preview"):
        manifest = preview(manifest, math.lcm(*(s.rules.variant(s.variant).multiple for s in specs.values())))
    plan = build_plan(manifest, specs["video"])
    models = manifest.models
    overrides = {"lora": models.lora and str(inside_root(root, models.lora)),
                 "vae": models.vae and str(inside_root(root, models.vae))}
    return JobSetup(manifest, root, plan, specs, {role: model_identity(s) for role, s in specs.items()},
                    encode_settings(manifest), merge_options(manifest, plan.film_fps), overrides,
                    preview=bool(options.get("preview")))
