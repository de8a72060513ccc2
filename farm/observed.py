"""What a stage was observed to do, as the ledger and lockfile record it.

Torch-free so the simulator reports the same shape as a real worker without importing torch.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Observed:
    steps: int = 0
    decode_batches: list[int] = field(default_factory=list)
    unet_batches: list[int] = field(default_factory=list)  # batch of each UNet call: 2x with CFG batched
    step_seconds: list[float] = field(default_factory=list)  # wall time between consecutive steps
    unet_seconds: list[float] = field(default_factory=list)  # time inside each UNet call
    seconds: float = 0.0
    peak_vram_bytes: int | None = None

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
        }
