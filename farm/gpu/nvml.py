"""What GPUs this process can see, read with NVML. Empty on machines without one: never faked."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from farm.presets import Tier, tier_for_vram


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total: int
    memory_used: int
    utilization: float  # 0..1

    @property
    def tier(self) -> Tier:
        return tier_for_vram(self.memory_total)


def gpus() -> list[GpuInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []  # no driver: a CPU machine
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            util = 0.0
            with contextlib.suppress(pynvml.NVMLError):
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            out.append(GpuInfo(i, name, int(mem.total), int(mem.used), util))
    finally:
        pynvml.nvmlShutdown()
    return out


def resolve_tier(setting: str, gpu: GpuInfo | None) -> Tier:
    """A forced tier wins (a CPU box can exercise every tier's presets); `auto` reads the card."""
    if setting != "auto":
        return setting  # type: ignore[return-value]
    return gpu.tier if gpu is not None else "cpu"
