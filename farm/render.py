"""`farm render`: one storyboard, rendered on a local Ray (or the cluster this process is attached to)."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.artifacts import write_ledger, write_lockfile
from farm.encode import EncodeSettings
from farm.lockfile import build_lock
from farm.manifest import Manifest, load
from farm.models import ModelSpec, resolve_model, with_tiny
from farm.paths import OutputLayout
from farm.plan import build_plan
from farm.presets import QUALITY_TEMPLATES
from farm.preview import preview
from farm.progress import ProgressBars


@dataclass
class RenderResult:
    job_id: str
    layout: OutputLayout
    lock: dict[str, Any]
    ledger: list[dict[str, Any]]
    seconds: float


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
        raise ValueError(f"--models must be 'tiny' (or omitted), not {override!r}")
    return specs


def encode_settings(manifest: Manifest) -> EncodeSettings:
    template = QUALITY_TEMPLATES[manifest.quality]
    out = manifest.output
    return EncodeSettings(crf=out.crf if out.crf is not None else template.crf,
                          preset=out.preset or template.x264_preset, bitrate=out.bitrate)


def merge_options(manifest: Manifest, fps: int) -> dict[str, Any]:
    out = manifest.output
    return {"fps": fps, "transition": out.transition, "crossfade_seconds": out.crossfade_seconds,
            "final_resolution": out.final_size, "interpolate_fps": out.interpolate_fps}


def start_ray(tier: str, workers: int) -> bool:
    """Start a local Ray unless this process is already attached to one. Returns whether we started it."""
    import ray

    from actors.worker import tier_resource

    if ray.is_initialized():
        return False
    resources = {tier_resource(tier): workers} if tier != "auto" else {}
    ray.init(resources=resources, include_dashboard=False, log_to_driver=bool(os.environ.get("FARM_RAY_LOGS")),
             configure_logging=False)
    return True


def start_pool(workers: int | None, tier: str) -> dict[str, tuple[Any, str]]:
    """One worker actor per GPU (or `workers` of them); returns id -> (handle, tier it reports)."""
    import ray

    from actors.worker import start_worker

    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or gpus or 1
    threads = max(1, (os.cpu_count() or 1) // count) if not gpus else None
    handles = {f"w{i}": start_worker(f"w{i}", tier, gpu=gpus > 0, threads=threads) for i in range(count)}
    infos = ray.get([h.info.remote() for h in handles.values()])
    return {wid: (h, info["tier"]) for (wid, h), info in zip(handles.items(), infos, strict=True)}


def render(path: Path | str, out_dir: Path | str, *, models: str | None = None, workers: int | None = None,
           tier: str = "auto", progress: bool = True, job_id: str | None = None,
           draft: bool = False) -> RenderResult:
    import ray

    from actors.director import Director, Job
    from actors.encoder import EncoderActor

    started = time.perf_counter()
    path = Path(path)
    manifest = load(path)  # refuses bad input before anything starts
    if draft:
        manifest = preview(manifest)
    root = path.parent
    specs = resolve_models(manifest, root, models)
    plan = build_plan(manifest, specs["video"].frames_per_call)
    layout = OutputLayout(out_dir)
    job = Job(job_id or uuid.uuid4().hex[:12], manifest, root, plan, specs, layout, encode_settings(manifest),
              merge_options(manifest, plan.fps))

    we_started = start_ray(tier, workers or 1)
    pool = start_pool(workers, tier)
    encoder = EncoderActor.remote()
    bars = ProgressBars(progress)
    director = Director(pool, encoder, on_event=bars)
    try:
        director.run(job)
    finally:
        bars.close()
        write_ledger(layout.ledger, director.ledger)
        for handle, _ in pool.values():
            ray.kill(handle)
        ray.kill(encoder)
        if we_started:
            ray.shutdown()
    encode = {"crf": job.encode.crf, "preset": job.encode.preset, "bitrate": job.encode.bitrate,
              **{k: v for k, v in job.merge_options.items() if k != "fps"}}
    lock = build_lock(job.id, manifest, plan, specs, director.records, encode) | {"preview": draft}
    write_lockfile(layout.lockfile, lock)
    return RenderResult(job.id, layout, lock, director.ledger, time.perf_counter() - started)
