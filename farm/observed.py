"""What a stage was observed to do, as the ledger and lockfile record it.

Torch-free so the simulator reports the same shape as a real worker without importing torch.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farm.cache import ArtifactCache
    from farm.contract import StageRequest, StageResult


@dataclass
class Observed:
    steps: int = 0
    decode_batches: list[int] = field(default_factory=list)
    unet_batches: list[int] = field(default_factory=list)  # batch of each UNet call: 2x with CFG batched
    step_seconds: list[float] = field(default_factory=list)  # wall time between consecutive steps
    unet_seconds: list[float] = field(default_factory=list)  # time inside each UNet call
    seconds: float = 0.0
    peak_vram_bytes: int | None = None
    prompt_tokens: int | None = None  # the prompt as the reading tokenizer counts it, start and end included
    prompt_limit: int | None = None  # what the family keeps; more and the rest was cut off

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "decode_chunk_max": max(self.decode_batches, default=0),
            "decode_calls": len(self.decode_batches),
            "unet_calls": len(self.unet_batches),
            "unet_batch": max(self.unet_batches, default=0),
            "step_seconds": round(statistics.median(self.step_seconds), 5) if self.step_seconds else None,
            "unet_seconds": round(sum(self.unet_seconds), 4),
            "seconds": round(self.seconds, 4),
            "peak_vram_bytes": self.peak_vram_bytes,
            "prompt_tokens": self.prompt_tokens,
            "prompt_truncated": None if self.prompt_tokens is None or self.prompt_limit is None
            else self.prompt_tokens > self.prompt_limit,
        }


class IdleClock:
    """A worker's own view of how long it waited between one stage's end and the next one's start:
    result handling, the director's decision and the request's transfer, all the time its GPU had
    nothing to do. Wall clock (the director compares it with its own readiness times)."""

    def __init__(self) -> None:
        self.last_end: float | None = None

    def start(self) -> float | None:
        """The gap before the stage starting now (None for a worker's first stage)."""
        return None if self.last_end is None else time.time() - self.last_end

    def end(self) -> None:
        self.last_end = time.time()


def stage_thread() -> ThreadPoolExecutor:
    """The one thread every stage of a worker runs on, one at a time, in the order they came.

    One thread, not whichever of the threaded actor's threads a call lands on: each thread that runs
    torch's parallel CPU ops gets an OpenMP team of its own, and once the teams' threads outnumber the
    cores libgomp stops spinning between parallel regions, which made every pipeline call on a CPU
    worker 1.3x slower than the same loop on one thread (BENCHMARKS.md, "Farm overhead")."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")


class TakesTurns:
    """A worker's `run`, shared by the GPU worker and the simulator's: read the stage's input first,
    then wait for the GPU's turn (the worker's stage thread), then `_run`. A stage sent ahead of time
    (prefetch) so has its input in hand when the stage before it ends."""

    turn: ThreadPoolExecutor
    idle: IdleClock

    def _run(self, req: StageRequest, cache: ArtifactCache, source: Any, input_s: float) -> StageResult:
        raise NotImplementedError

    def run(self, req: StageRequest) -> StageResult:
        """Run one keyframe, video (denoise to latents) or decode stage. Inputs and outputs go through
        the artifact cache by key, so a stage's result survives this process and is found again by
        whoever needs it next; a decode that runs out of memory leaves the latents where they were."""
        from farm.cache import ArtifactCache

        cache = ArtifactCache(req.cache_dir)
        read = time.perf_counter()
        source = cache.stage_input(req.kind, req.input_key)
        input_s = time.perf_counter() - read
        return self.turn.submit(self._run, req, cache, source, input_s).result()
