"""The GPU halves of the model families: every module here that defines `GPU` (a GpuFamily)."""

from __future__ import annotations

import importlib
import pkgutil

from farm.gpu.families.base import GpuFamily

__all__ = ["GPU_FAMILIES", "GpuFamily", "gpu_family"]


def _discover() -> dict[str, GpuFamily]:
    found: dict[str, GpuFamily] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        gpu = getattr(importlib.import_module(f"{__name__}.{info.name}"), "GPU", None)
        if isinstance(gpu, GpuFamily):
            found[gpu.name] = gpu
    return found


GPU_FAMILIES: dict[str, GpuFamily] = _discover()


def gpu_family(name: str) -> GpuFamily:
    try:
        return GPU_FAMILIES[name]
    except KeyError:
        raise ValueError(f"no GPU half for model family {name!r}; have {', '.join(GPU_FAMILIES)}") from None
