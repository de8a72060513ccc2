"""A worker that sleeps instead of rendering: `farm.contract.Worker`, driven by the cost model.

The real director can run a cluster's worth of these on a laptop (bench/scheduler.py), so what is
measured is the director's own policy and overhead. Frames are flat colours derived from seeds and
inputs, cheap and deterministic, and go through the real artifact cache.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from farm.cache import ArtifactCache
from farm.contract import StageKind, StageRequest, StageResult
from farm.faults import OutOfMemory, StageCancelled, fire, spoil
from farm.hashing import array_hash
from farm.models import ModelSpec
from farm.observed import IdleClock, Observed, TakesTurns, stage_thread
from farm.sim.costs import DEFAULT_COSTS, TierCost, params_seconds


def pause(seconds: float, cancelled: Callable[[], bool] = lambda: False) -> None:
    """Sleep `seconds`, in short slices so a cancel lands mid-stage as it does between denoising steps."""
    end = time.perf_counter() + max(seconds, 0.0)
    while (left := end - time.perf_counter()) > 0:
        if cancelled():
            raise StageCancelled("job cancelled")
        time.sleep(min(left, 0.05))


def _seed_colour(seed: int) -> np.ndarray:
    return np.array([seed & 0xFF, (seed >> 8) & 0xFF, (seed >> 16) & 0xFF], dtype=np.int64)


def sim_image(height: int, width: int, seed: int) -> np.ndarray:
    """A flat HxWx3 uint8 image whose colour comes from the seed: deterministic and cheap."""
    return np.broadcast_to(_seed_colour(seed).astype(np.uint8), (height, width, 3)).copy()


def sim_frames(image: np.ndarray | None, count: int, height: int, width: int, seed: int) -> np.ndarray:
    """`count` frames; the first re-draws the conditioning image (as SVD does), the rest drift from
    a seed-derived colour, so each segment's content depends on its seed and its input."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    base = _seed_colour(seed)
    for i in range(count):
        frames[i] = ((base + 3 * i) % 256).astype(np.uint8)
    if count and image is not None and image.shape == (height, width, 3):
        frames[0] = image
    return frames


def sim_observed(steps: int, frames: int, chunk: int | None, seconds: float) -> dict[str, Any]:
    """What a real run would have counted (one batched-CFG call per step), in farm.observed's shape."""
    chunk = max(1, min(chunk or frames, frames))
    decodes = [chunk] * (frames // chunk) + ([frames % chunk] if frames % chunk else [])
    per_step = seconds / steps if steps else 0.0
    return Observed(steps=steps, decode_batches=decodes, unet_batches=[2] * steps,
                    step_seconds=[per_step] * steps, unet_seconds=[per_step] * steps, seconds=seconds).as_dict()


def sim_keyframe(params: Mapping[str, Any], cost: TierCost, time_scale: float,
                 cancelled: Callable[[], bool] = lambda: False,
                 family: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One keyframe stage, simulated: sleep its cost (as the plan costs it), return (image, observed)."""
    steps = int(params["num_inference_steps"])
    started = time.perf_counter()
    pause(params_seconds("keyframe", params, cost, family) * time_scale, cancelled)
    image = sim_image(int(params["height"]), int(params["width"]), int(params.get("seed", 0)))
    return image, sim_observed(steps, 1, 1, time.perf_counter() - started)


def sim_video(image: np.ndarray | None, params: Mapping[str, Any], cost: TierCost, time_scale: float,
              cancelled: Callable[[], bool] = lambda: False,
              family: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One video segment, simulated: sleep its cost, return (all generated frames, observed)."""
    steps, count = int(params["num_inference_steps"]), int(params["num_frames"])
    started = time.perf_counter()
    pause(params_seconds("video", params, cost, family) * time_scale, cancelled)
    frames = sim_frames(image, count, int(params["height"]), int(params["width"]), int(params.get("seed", 0)))
    return frames, sim_observed(steps, count, None, time.perf_counter() - started)


def sim_decode(latents: np.ndarray, params: Mapping[str, Any], cost: TierCost, time_scale: float,
               cancelled: Callable[[], bool] = lambda: False,
               family: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One decode, simulated: the "latents" are already the frames; sleep the decode's cost."""
    started = time.perf_counter()
    pixels = int(latents.shape[1] * latents.shape[2]) if latents.ndim >= 3 else None
    pause(params_seconds("decode", {"num_frames": len(latents)}, cost, family, pixels) * time_scale, cancelled)
    observed = sim_observed(0, len(latents), params.get("decode_chunk_size"), time.perf_counter() - started)
    return latents.astype(np.uint8), observed


class SimWorker(TakesTurns):
    """`farm.contract.Worker`, sleeping `cost x time_scale` instead of rendering."""

    def __init__(self, worker_id: str, tier: str = "cpu", threads: int | None = None, *,
                 costs: Mapping[str, TierCost] = DEFAULT_COSTS, time_scale: float = 1.0) -> None:
        del threads  # accepted for StageWorker's signature; nothing to thread
        tier = "cpu" if tier == "auto" else tier  # no card to read a tier from
        if tier not in costs:
            raise ValueError(f"no simulated costs for tier {tier!r}; known: {', '.join(costs)}")
        self.worker_id = worker_id
        self.tier = tier
        self.cost = costs[tier]
        self.time_scale = time_scale
        self.device = "sim"
        self.pipelines: dict[tuple[Any, ...], str] = {}  # resident key -> model name
        self.stages_run = 0
        self.idle = IdleClock()
        self.turn = stage_thread()  # one stage at a time, in the order they came (a prefetched one waits)
        self.faults: list[dict[str, Any]] = []
        self.cancelled: set[str] = set()

    def pipeline(self, req: StageRequest) -> dict[str, bool]:
        """Make the model resident (paying load_s x time_scale once); returns the knobs applied."""
        key = (req.model.key, req.loras, req.vae, req.adapter)
        if key not in self.pipelines:
            pause(self.cost.load_s * self.time_scale)
            self.pipelines[key] = req.model.source
        return {k: bool(v) for k, v in asdict(req.knobs).items()}

    def loaded_models(self) -> list[str]:
        return sorted(set(self.pipelines.values()))

    def missing_models(self, specs: list[ModelSpec]) -> dict[str, str]:
        return {}  # a simulated worker has every model

    def set_faults(self, faults: list[dict[str, Any]]) -> None:
        """As StageWorker.set_faults: [{"match": "*/video:a:*", "kind": "oom|error|crash", "times": 1}]."""
        self.faults = [dict(f) for f in faults]

    def cancel(self, ident: str) -> None:
        self.cancelled.add(ident)

    def info(self) -> dict[str, Any]:
        return {"id": self.worker_id, "node": platform.node(), "tier": self.tier, "device": self.device,
                "gpu": f"simulated {self.tier}", "vram_total": None, "vram_used": None, "utilization": None,
                "loaded_models": self.loaded_models(), "stages_run": self.stages_run, "pid": os.getpid()}

    def _run(self, req: StageRequest, cache: ArtifactCache, source: Any, input_s: float) -> StageResult:
        idle_before = self.idle.start()
        started = time.perf_counter()
        is_cancelled = lambda: req.ident in self.cancelled  # noqa: E731
        try:
            fire(self.faults, req.ident, OutOfMemory)
            applied = self.pipeline(req)
            if req.kind == StageKind.IDENTITY:
                started_at = time.perf_counter()
                pause(params_seconds("identity", req.params, self.cost) * self.time_scale, is_cancelled)
                embeds = np.zeros((2, len(req.references), 8), np.float32)  # [negative, positive] as CFG takes them
                cache.put_arrays(req.output_key, embeds=embeds)
                hashes = {"output_sha": array_hash(embeds)}
                observed = sim_observed(0, 1, None, time.perf_counter() - started_at)
            elif req.kind == StageKind.KEYFRAME:
                image, observed = sim_keyframe(req.params, self.cost, self.time_scale, is_cancelled, req.model.family)
                hashes = cache.put_keyframe(req.output_key, image)
            elif req.kind == StageKind.VIDEO:
                first = source
                frames, observed = sim_video(first, req.params, self.cost, self.time_scale, is_cancelled,
                                             req.model.family)
                hashes = cache.put_latents(req.output_key, frames) | {"input_sha": array_hash(first)}
            else:
                latents = source
                frames, observed = sim_decode(latents, req.params, self.cost, self.time_scale, is_cancelled,
                                               req.model.family)
                frames = spoil(self.faults, req.ident, frames)
                hashes = cache.put_segment(req.output_key, frames, req.drop, req.kept) | {
                    "input_sha": array_hash(latents)}
        finally:
            self.cancelled.discard(req.ident)
            self.idle.end()
        self.stages_run += 1
        return StageResult(self.worker_id, self.tier, self.device, req.preset, applied, observed,
                           time.perf_counter() - started, **hashes, idle_before_s=idle_before, input_s=input_s)
