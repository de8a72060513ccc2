"""`farm render`: one storyboard rendered by the farm's director on a local Ray (or the cluster this
process is attached to), with progress bars fed by the director's events."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.encode import EncodeSettings
from farm.manifest import Manifest, load
from farm.models import ModelSpec, resolve_model, with_tiny
from farm.paths import OutputLayout, state_dir
from farm.pool import PoolConfig, resources_for_local
from farm.presets import QUALITY_TEMPLATES
from farm.progress import ProgressBars


class RenderError(RuntimeError):
    pass


@dataclass
class RenderResult:
    job_id: str
    layout: OutputLayout
    lock: dict[str, Any]
    ledger: list[dict[str, Any]]
    seconds: float
    startup_seconds: float = 0.0  # Ray start, director, worker actors, model loads
    render_seconds: float = 0.0  # submit to the final film written: the part that scales with shots


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


def encode_identity(settings: EncodeSettings) -> dict[str, Any]:
    """What of the encode settings determines the output: cache keys and the lockfile record this."""
    return {"crf": settings.crf, "preset": settings.preset, "bitrate": settings.bitrate}


def merge_options(manifest: Manifest, fps: int) -> dict[str, Any]:
    out = manifest.output
    return {"fps": fps, "transition": out.transition, "crossfade_seconds": out.crossfade_seconds,
            "final_resolution": out.final_size, "interpolate_fps": out.interpolate_fps}


def start_ray(pool: PoolConfig) -> bool:
    """Start a local Ray unless this process is already attached to one. Returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    # address="local": always a fresh local cluster, never someone else's that happens to be running.
    ray.init(address="local", resources=resources_for_local(pool), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True


def local_director(pool: PoolConfig) -> Any:
    """A director for local renders with this pool shape (forced tier and worker count)."""
    from actors.director import get_director

    name = f"farm-local-{pool.tier}-{pool.workers or 0}"
    root = state_dir()
    return get_director(pool, name=name, store_path=str(root / "farm.sqlite"), cache_dir=str(root / "cache"))


def follow(director: Any, job_id: str, bars: ProgressBars, poll_s: float = 0.2) -> str:
    """Feed the director's events to the progress bars until the job ends; returns its final state."""
    import ray
    from ray.exceptions import ActorUnavailableError

    since = 0
    while True:
        try:
            events, state = ray.get(director.events.remote(job_id, since))
        except ActorUnavailableError:  # the director is restarting; it reloads the job from the store
            time.sleep(0.5)
            since = 0  # a restarted director starts a fresh event list for the job
            continue
        since += len(events)
        for event in events:
            bars(event)
        if state not in ("queued", "running"):
            return state
        time.sleep(poll_s)


def render(path: Path | str, out_dir: Path | str, *, models: str | None = None, workers: int | None = None,
           tier: str = "auto", progress: bool = True, draft: bool = False, priority: int = 0,
           cache: bool = True) -> RenderResult:
    import ray

    from actors.director import job_key

    started = time.perf_counter()
    path = Path(path).resolve()
    manifest = load(path)  # refuses bad input before anything starts
    resolve_models(manifest, path.parent, models)
    out = OutputLayout(Path(out_dir).resolve())
    pool = PoolConfig(tier=tier, workers=workers)
    we_started = start_ray(pool)
    try:
        director = local_director(pool)
        data = manifest.model_dump(mode="json", exclude_unset=True)
        options = {"models": models, "preview": draft, "cache": cache}
        job = ray.get(director.submit.remote(data, str(path.parent), str(out.root), options=options,
                                             priority=priority,
                                             idempotency_key=job_key(data, str(out.root), options)))
        if job["state"] in ("failed", "cancelled", "succeeded"):
            # The same render ran to an end before (its outputs may since be gone or edited): run it
            # again; every finished stage comes back from the cache, so a complete one costs seconds.
            job = ray.get(director.requeue.remote(job["id"]))
        ray.get(director.ping.remote())
        startup = time.perf_counter() - started
        bars = ProgressBars(progress)
        try:
            state = follow(director, job["id"], bars)
        finally:
            bars.close()
        rendered = time.perf_counter()
        status = ray.get(director.status.remote(job["id"]))
    finally:
        if we_started:
            ray.shutdown()
    if state != "succeeded":
        raise RenderError(f"job {job['id']} {state}: {status['error']}")
    lock = json.loads(out.lockfile.read_text())
    import pyarrow.parquet as pq

    ledger = pq.read_table(out.ledger).to_pylist()
    total = time.perf_counter() - started
    return RenderResult(job["id"], out, lock, ledger, total, startup, rendered - started - startup)
