"""A GPU worker's work, without Ray: keep pipelines resident, run keyframe and video stages.

`actors/worker.py` wraps this class as a Ray actor; tests and `bench/gpu.py` use it directly. It
speaks `farm.contract.Worker`: a `StageRequest` in, a `StageResult` out, frames through the cache.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from farm.cache import ArtifactCache
from farm.config import FarmConfig, current
from farm.contract import IdentityAdapter, StageKind, StageRequest, StageResult
from farm.faults import OutOfMemory, fire, spoil
from farm.frames import fit_frames
from farm.gpu.identity import call_embeds, encode_faces, encode_references
from farm.gpu.loading import apply_memory_knobs, load_pipeline, use_sampler, use_step_cache
from farm.gpu.nvml import GpuInfo, gpus, resolve_tier
from farm.gpu.speed import apply_speed_knobs, speed_knobs
from farm.gpu.stages import count_prompt, observe, run_decode, run_denoise, run_stage
from farm.hashing import array_hash
from farm.models import ModelError, ModelSpec, missing
from farm.observed import IdleClock, TakesTurns, stage_thread
from farm.presets import MemoryKnobs, Tier, holds_weights, memory_fraction

# (spec, device=, dtype=, loras=, vae=, cpu_offload=[, embeddings=]) -> pipeline; bench/gpu.py passes one that builds
# real-size models with random weights, so it measures this worker's own code.
Loader = Callable[..., Any]


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


def cap_memory(setting: str, tier: Tier, gpu: GpuInfo | None,
               set_fraction: Callable[[float], None]) -> float | None:
    """A tier forced on a bigger card caps this process's share of it, so it runs out of memory where a
    real card of that tier would. `auto` reads the card and needs no cap. Returns the fraction set."""
    if setting == "auto" or gpu is None:
        return None
    fraction = memory_fraction(tier, gpu.memory_total)
    if fraction is not None:
        set_fraction(fraction)
    return fraction


class StageWorker(TakesTurns):
    def __init__(self, worker_id: str, tier: str = "auto", threads: int | None = None,
                 loader: Loader = load_pipeline, config: FarmConfig | None = None) -> None:
        self.config = config or current()
        self.threads = threads
        self.loader = loader
        self._use_threads()
        self.worker_id = worker_id
        self.gpu = visible_gpu()
        self.tier: Tier = resolve_tier(tier, self.gpu)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Half precision on GPUs (bf16 where supported keeps fp32's range); CPUs compute in fp32.
        if self.device == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
        self.memory_cap = cap_memory(tier, self.tier, self.gpu if self.device == "cuda" else None,
                                     torch.cuda.set_per_process_memory_fraction)
        self.pipelines: dict[tuple[Any, ...], tuple[MemoryKnobs, Any, dict[str, bool]]] = {}
        self.stages_run = 0
        self.idle = IdleClock()
        self.turn = stage_thread()  # one stage at a time, in the order they came (a prefetched one waits)
        self.faults: list[dict[str, Any]] = []
        self.cancelled: set[str] = set()

    def _use_threads(self) -> None:
        """OpenMP's thread count is per calling thread, and Ray's OMP_NUM_THREADS=1 holds on every thread
        that has not set its own: set it where the work runs (the stage thread, farm/observed.py)."""
        if self.threads:
            torch.set_num_threads(self.threads)

    # --- residency ---------------------------------------------------------------------------

    def pipeline(self, spec: ModelSpec, knobs: MemoryKnobs, loras: tuple[tuple[str, float], ...] = (),
                 vae: str | None = None, scheduler: str | None = None,
                 step_cache: float | None = None,
                 embeddings: tuple[tuple[str, str], ...] = (),
                 adapter: IdentityAdapter | None = None) -> tuple[Any, dict[str, bool]]:
        """The resident pipeline for (model, LoRAs, VAE, sampler, step cache) with these memory knobs;
        loads it on first use.

        Keyed on the knobs *asked for*: what a pipeline can honour differs (SVD's VAE has no slicing),
        and comparing with what was applied would reload it on every stage."""
        key = (spec, loras, vae, scheduler, step_cache, embeddings, adapter)
        held = self.pipelines.get(key)
        if held is not None and held[0] == knobs:
            return held[1], held[2]
        if held is not None:  # the OOM ladder asked for other memory knobs: rebuild from scratch
            self.unload(key)
        variant = spec.rules.variant(spec.variant)
        weights, usable = (None if spec.is_tiny else variant.weights_gb), self.usable_bytes()
        if weights is not None and usable is not None and not holds_weights(knobs, weights * 1e9, usable):
            # Not worth reading 30 GB from disk to find out: the director's ladder takes the next rung.
            raise OutOfMemory(f"{variant.title}'s weights ({weights:g} GB in bf16) do not fit beside a call in the "
                              f"{usable / 1e9:.1f} GB this worker may use without offloading them")
        try:
            # bench/gpu.py's loader takes neither
            extra: dict[str, Any] = {"embeddings": embeddings} if embeddings else {}
            if adapter is not None:
                extra["adapter"] = adapter
            pipe = self.loader(spec, device=self.device, dtype=self.dtype, loras=loras, vae=vae,
                               cpu_offload=knobs.cpu_offload or knobs.group_offload, **extra)
            pipe.set_progress_bar_config(disable=True)  # the farm shows its own progress
            use_sampler(pipe, scheduler)
            applied = apply_memory_knobs(pipe, device=self.device, **asdict(knobs))
            capability = torch.cuda.get_device_capability() if self.device == "cuda" else None
            offloaded = applied["cpu_offload"] or applied["group_offload"]
            fast = speed_knobs(self.device, capability, offloaded, self.config.compile, spec.rules.channels_last)
            applied |= apply_speed_knobs(pipe, fast)
            applied["step_cache"] = use_step_cache(pipe, step_cache)
        except torch.OutOfMemoryError as exc:  # a load that does not fit is an OOM of the stage like any other
            raise self._out_of_memory(exc) from None
        self.pipelines[key] = (knobs, pipe, applied)
        return pipe, applied

    def usable_bytes(self) -> float | None:
        """The card memory this worker may use (a forced tier's cap included); None without a GPU."""
        if self.device != "cuda" or self.gpu is None:
            return None
        return self.gpu.memory_total * (self.memory_cap or 1.0)

    def resident(self, req: StageRequest) -> Any:
        """The loaded pipeline a request runs on (None if it is not loaded)."""
        held = self.pipelines.get((req.model, req.loras, req.vae, req.scheduler, req.step_cache, req.embeddings,
                                   req.adapter))
        return held[1] if held else None

    def unload(self, key: tuple[Any, ...]) -> None:
        self.pipelines.pop(key, None)
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _out_of_memory(self, exc: BaseException) -> OutOfMemory:
        """Free what the failed call held before the director retries on a lower preset."""
        self.pipelines.clear()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return OutOfMemory(str(exc))

    def loaded_models(self) -> list[str]:
        return sorted({key[0].source for key in self.pipelines})

    def missing_models(self, specs: list[ModelSpec]) -> dict[str, str]:
        """Which of `specs` this worker could not load without a download (role -> why): the director
        asks before it accepts a job, so a missing model fails the submit, not the GPU work."""
        return {spec.role: why for spec in specs
                if (why := missing(spec, self.config.models.allow_download)) is not None}

    # --- faults and cancellation ----------------------------------------------------------------

    def set_faults(self, faults: list[dict[str, Any]]) -> None:
        """Arm faults for tests and drills: [{"match": "*/video:a:*", "kind": "oom|error|crash", "times": 1}].
        They fire inside the stage, before the pipeline runs, through the same paths real failures take."""
        self.faults = [dict(f) for f in faults]

    def cancel(self, ident: str) -> None:
        """Called concurrently with a running stage (the actor is threaded): it stops at the next step."""
        self.cancelled.add(ident)

    # --- stages --------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        gpu = visible_gpu()
        return {
            "id": self.worker_id,
            "node": platform.node(),
            "tier": self.tier,
            "memory_cap": self.memory_cap,  # share of the card a forced tier may use (None: all of it)
            "device": self.device,
            "gpu": gpu.name if gpu else None,
            "vram_total": gpu.memory_total if gpu else None,
            "vram_used": gpu.memory_used if gpu else None,
            "utilization": gpu.utilization if gpu else None,
            "loaded_models": self.loaded_models(),
            "stages_run": self.stages_run,
            "pid": os.getpid(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),  # above 0: its calls yield the cores to Ray's daemons
        }

    def _identity(self, pipe: Any, req: StageRequest) -> dict[str, Any]:
        """A character's identity stage: IP-Adapter's image embeddings of the references, or InstantID's
        face embedding and keypoints from the face analyser the job names (farm/faces.py)."""
        if req.adapter is None or req.adapter.method != "instantid":
            return {"embeds": encode_references(pipe, req.model.family, req.references, self.device)}
        from farm.faces import analyser_for

        analyser = analyser_for(req.params.get("faces"))
        if analyser is None:
            raise ModelError(f"InstantID needs a face model and none loads here ({req.params.get('faces')}): "
                             "install insightface and onnxruntime, and name its models in models.paths[\"faces\"]")
        return encode_faces(analyser, req.references)

    def _run(self, req: StageRequest, cache: ArtifactCache, source: Any, input_s: float) -> StageResult:
        idle_before = self.idle.start()
        started = time.perf_counter()
        self._use_threads()
        is_cancelled = lambda: req.ident in self.cancelled  # noqa: E731
        try:
            fire(self.faults, req.ident, torch.OutOfMemoryError)
            pipe, applied = self.pipeline(req.model, req.knobs, req.loras, req.vae, req.scheduler, req.step_cache,
                                          req.embeddings, req.adapter)
            if req.kind == StageKind.IDENTITY:
                with observe(pipe) as seen:
                    arrays = self._identity(pipe, req)
                cache.put_arrays(req.output_key, **arrays)
                hashes = {"output_sha": array_hash(arrays["embeds"])}
            elif req.kind == StageKind.KEYFRAME:
                extra = call_embeds(cache, req.identity, pipe, dict(req.params), self.device, req.adapter,
                                    req.model.family)
                images, seen = run_stage(pipe, req.model.family, req.params, cancelled=is_cancelled, extra=extra)
                count_prompt(pipe, req.model.family, req.params, seen)
                # drawn at the family's multiple (1920x1088 for 1920x1080): cropped back to the keyframe size
                hashes = cache.put_keyframe(req.output_key, fit_frames(images, req.frame_size)[0])
            elif req.kind == StageKind.VIDEO:
                first = source
                latents, seen = run_denoise(pipe, req.model.family, req.params, first, is_cancelled)
                count_prompt(pipe, req.model.family, req.params, seen)
                hashes = cache.put_latents(req.output_key, latents) | {"input_sha": array_hash(first)}
            else:
                latents = source
                frames, seen = run_decode(pipe, req.model.family, req.params, latents)
                frames = fit_frames(frames, req.frame_size)  # a tier that renders smaller (I2VGen-XL below 16 GB)
                frames = spoil(self.faults, req.ident, frames)
                hashes = cache.put_segment(req.output_key, frames, req.drop, req.kept) | {
                    "input_sha": array_hash(latents)}
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(exc) from None
        finally:
            self.cancelled.discard(req.ident)
            self.idle.end()
        self.stages_run += 1
        return StageResult(self.worker_id, self.tier, self.device, req.preset, applied, seen.as_dict(),
                           time.perf_counter() - started, **hashes, idle_before_s=idle_before, input_s=input_s)
