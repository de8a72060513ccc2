"""A GPU worker's work, without Ray: keep pipelines resident, run keyframe and video stages.

`actors/worker.py` wraps this class as a Ray actor; tests and the benchmark can use it directly.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from farm.gpu import GpuInfo, gpus, resolve_tier
from farm.hashing import array_hash
from farm.models import ModelSpec, apply_memory_knobs, load_pipeline
from farm.presets import MemoryKnobs, Tier
from farm.stages import run_keyframe, run_video


def visible_gpu() -> GpuInfo | None:
    """The GPU this process renders on: Ray sets CUDA_VISIBLE_DEVICES to the one it granted."""
    if not torch.cuda.is_available():
        return None
    cards = gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    first = visible.split(",")[0].strip()
    if first.isdigit() and int(first) < len(cards):
        return cards[int(first)]
    return cards[0] if cards else None


class StageWorker:
    def __init__(self, worker_id: str, tier: str = "auto", threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.worker_id = worker_id
        self.gpu = visible_gpu()
        self.tier: Tier = resolve_tier(tier, self.gpu)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Half precision on GPUs (bf16 where supported keeps fp32's range); CPUs compute in fp32.
        if self.device == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
        self.pipelines: dict[tuple[Any, ...], tuple[MemoryKnobs, Any, dict[str, bool]]] = {}
        self.stages_run = 0

    # --- residency ---------------------------------------------------------------------------

    def pipeline(self, spec: ModelSpec, knobs: MemoryKnobs, lora: str | None = None,
                 vae: str | None = None) -> tuple[Any, dict[str, bool]]:
        """The resident pipeline for (model, lora, vae) with these memory knobs; loads it on first use.

        Keyed on the knobs *asked for*: what a pipeline can honour differs (SVD's VAE has no slicing),
        and comparing with what was applied would reload it on every stage."""
        key = (spec, lora, vae)
        held = self.pipelines.get(key)
        if held is not None and held[0] == knobs:
            return held[1], held[2]
        if held is not None:  # the OOM ladder asked for other memory knobs: rebuild from scratch
            self.unload(key)
        pipe = load_pipeline(spec, device=self.device, dtype=self.dtype, lora=lora, vae=vae,
                             cpu_offload=knobs.cpu_offload)
        pipe.set_progress_bar_config(disable=True)  # the farm shows its own progress
        applied = apply_memory_knobs(pipe, device=self.device, **asdict(knobs))
        self.pipelines[key] = (knobs, pipe, applied)
        return pipe, applied

    def unload(self, key: tuple[Any, ...]) -> None:
        self.pipelines.pop(key, None)
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def loaded_models(self) -> list[str]:
        return sorted({key[0].source for key in self.pipelines})

    def holds(self, spec: ModelSpec) -> bool:
        return any(key[0] == spec for key in self.pipelines)

    # --- stages --------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        gpu = visible_gpu()
        return {
            "id": self.worker_id,
            "node": platform.node(),
            "tier": self.tier,
            "device": self.device,
            "gpu": gpu.name if gpu else None,
            "vram_total": gpu.memory_total if gpu else None,
            "vram_used": gpu.memory_used if gpu else None,
            "utilization": gpu.utilization if gpu else None,
            "loaded_models": self.loaded_models(),
            "stages_run": self.stages_run,
            "pid": os.getpid(),
        }

    def _report(self, started: float, observed: dict[str, Any], applied: dict[str, bool], preset: str) -> dict:
        self.stages_run += 1
        return {"worker": self.worker_id, "tier": self.tier, "device": self.device, "preset": preset,
                "knobs": applied, "observed": observed, "wall_seconds": time.perf_counter() - started}

    def keyframe(self, req: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        started = time.perf_counter()
        pipe, applied = self.pipeline(req["model"], req["knobs"], req.get("lora"), req.get("vae"))
        image, seen = run_keyframe(pipe, req["params"])
        report = self._report(started, seen.as_dict(), applied, req["preset"])
        return image, report | {"output_sha": array_hash(image)}

    def video(self, req: dict[str, Any], image: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Returns (frames kept for the clip, last frame for the next segment, report)."""
        started = time.perf_counter()
        pipe, applied = self.pipeline(req["model"], req["knobs"])
        frames, seen = run_video(pipe, req["model"].family, image, req["params"])
        kept = frames[req["drop"]:req["drop"] + req["kept"]]
        last = frames[-1].copy()
        report = self._report(started, seen.as_dict(), applied, req["preset"])
        # Input and output hashes make the chain checkable: a segment's input is its predecessor's output.
        return kept, last, report | {"input_sha": array_hash(image), "output_sha": array_hash(last)}
