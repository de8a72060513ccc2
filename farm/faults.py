"""Injected faults for tests and drills, shared by the real worker and the simulator's worker.

A fault is {"match": "<glob on job/stage id>", "kind": "oom|error|crash|disk_full", "times": N}. It fires
inside the stage, before any work, so it takes the same paths a real failure would (disk_full: the
OSError ENOSPC a write to a full cache disk raises).

A spoiling fault, kind "frozen|black|flicker" on a decode stage, lets the stage finish and turns the
frames it made into a known-bad clip (every frame the first, all black, or alternating black and
white), so quality control's retakes can be shown and tested. Its output is cached under the stage's
key like any other: spoil only in drills and tests.
"""

from __future__ import annotations

import errno
import fnmatch
import os
from collections.abc import Callable
from typing import Any

import numpy as np

SPOILS = ("frozen", "black", "flicker")


class OutOfMemory(RuntimeError):
    """A stage ran out of GPU memory; the job book walks it one rung down the preset ladder. Here,
    free of torch, so the director and the API can tell it by type without importing torch."""


class StageCancelled(RuntimeError):
    """The director cancelled the job while this stage ran; raised between denoising steps (or sleeps,
    in the simulator). Here, free of torch, so both workers raise the one class the director checks."""


def fire(faults: list[dict[str, Any]], stage_id: str, oom: Callable[[str], BaseException]) -> None:
    """Consume and raise the first armed fault matching `stage_id`. `oom` builds the out-of-memory
    error the caller's path expects (the real worker raises torch's own, to go through its handler)."""
    for fault in faults:
        if fault["kind"] in SPOILS:
            continue
        if fault.get("times", 1) > 0 and fnmatch.fnmatch(stage_id, fault["match"]):
            fault["times"] = fault.get("times", 1) - 1
            if fault["kind"] == "crash":
                os._exit(13)  # a worker process dying mid-stage (driver crash, OOM killer)
            if fault["kind"] == "oom":
                raise oom(f"CUDA out of memory (injected fault on {stage_id})")
            if fault["kind"] == "disk_full":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<cache>/{stage_id} (injected fault)")
            raise RuntimeError(f"injected fault on {stage_id}")


def spoil(faults: list[dict[str, Any]], stage_id: str, frames: np.ndarray) -> np.ndarray:
    """`frames` ((T, H, W, 3) uint8) made bad by the first armed spoiling fault matching `stage_id`
    (consumed), else unchanged."""
    for fault in faults:
        if fault["kind"] in SPOILS and fault.get("times", 1) > 0 and fnmatch.fnmatch(stage_id, fault["match"]):
            fault["times"] = fault.get("times", 1) - 1
            if fault["kind"] == "frozen":
                return np.repeat(frames[:1], len(frames), axis=0)
            if fault["kind"] == "black":
                return np.zeros_like(frames)
            out = np.zeros_like(frames)
            out[1::2] = 255  # black and white in turn: the worst flicker there is
            return out
    return frames
