"""Speed knobs of a GPU worker: which to use (a plain decision) and applying them to a pipeline.

Memory knobs (farm.presets) decide whether a stage fits; these decide how fast it runs once it does.
Half precision is chosen with the device (farm.gpu.worker); guidance is already one batched UNet call
per step in all three pipelines, which `observe` records as unet_batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

CompileSetting = Literal["auto", "on", "off"]  # the farm config's `compile` (FARM_COMPILE)


@dataclass(frozen=True)
class SpeedKnobs:
    channels_last: bool  # NHWC convolutions: what tensor cores read natively
    compile: bool  # torch.compile the UNet, where nearly all FLOPs are


def speed_knobs(device: str, capability: tuple[int, int] | None, cpu_offload: bool,
                setting: CompileSetting = "auto", convolutional: bool = True) -> SpeedKnobs:
    """What pays on this device.

    - channels-last on CUDA only, only for families whose denoiser is a UNet of 2-D convolutions
      (`convolutional`), and only where the UNet is compiled: CPUs gain little from it and the tiny
      CPU models lose; the transformer families (FLUX, SD3, Wan, LTX) have no 2-D convolutions to
      speed up; and in eager mode every GroupNorm converts NHWC back to NCHW (measured on an H200:
      SDXL 1024x1024 eager at 0.121 s/step with channels-last, GroupNorm statistics and layout
      copies 45% of GPU time; BENCHMARKS.md "GPU stages"), while Inductor plans the layouts itself.
    - compile ("auto") on CUDA GPUs of compute capability 8.0+ (Ampere and newer, where Inductor's
      Triton kernels and bf16 do well) and not under CPU offload, whose hooks move weights between
      calls and break the graph. A worker is long-lived and renders the same shapes again and again,
      so the compile (a minute or so, on the worker's first stage) is paid once per model and shape.
    """
    cuda = device.startswith("cuda")
    if setting == "on":
        compile_unet = not cpu_offload
    elif setting == "off":
        compile_unet = False
    else:
        compile_unet = cuda and capability is not None and capability >= (8, 0) and not cpu_offload
    return SpeedKnobs(channels_last=cuda and convolutional and compile_unet, compile=compile_unet)


def apply_speed_knobs(pipe: Any, knobs: SpeedKnobs) -> dict[str, bool]:
    """Apply `knobs`; return what is in effect (sdpa is checked, not set: diffusers picks it)."""

    applied = {"sdpa": uses_sdpa(pipe), "channels_last": False, "compiled": False}
    if knobs.channels_last:  # the compiled UNet only: the VAE runs eager, where NHWC costs its GroupNorms
        unet = getattr(pipe, "unet", None)
        if unet is not None:
            to_channels_last(unet)
            applied["channels_last"] = True
    if knobs.compile:
        nets = [m for m in (getattr(pipe, n, None) for n in ("unet", "transformer", "transformer_2")) if m is not None]
        applied["compiled"] = all([compile_unet(net) for net in nets]) and bool(nets)
    return applied


def to_channels_last(module: Any) -> None:
    """NHWC for the 4-D weights (2-D convolutions) only: `module.to(memory_format=...)` refuses any
    module with a 5-D weight, and SVD's temporal VAE decoder has 3-D convolutions."""
    import torch

    for param in module.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)


def uses_sdpa(pipe: Any) -> bool:
    """True when every attention layer of the UNet and VAE runs torch's scaled_dot_product_attention
    (flash / memory-efficient kernels) rather than a materialised attention matrix."""
    processors: list[Any] = []
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None and hasattr(module, "attn_processors"):
            processors += list(module.attn_processors.values())
    return bool(processors) and all(_calls_sdpa(type(p)) for p in processors)


_SDPA_SEEN: dict[type, bool] = {}


def _calls_sdpa(cls: type) -> bool:
    # Read from the processor's code rather than a list of class names, which diffusers keeps adding to.
    import inspect

    if cls not in _SDPA_SEEN:
        try:
            _SDPA_SEEN[cls] = "scaled_dot_product_attention" in inspect.getsource(cls.__call__)
        except (OSError, TypeError):
            _SDPA_SEEN[cls] = False
    return _SDPA_SEEN[cls]


def compile_unet(unet: Any) -> bool:
    """Compile the UNet's forward in place (not the module, so the hooks `observe` puts on the module
    stay outside the graph). If Inductor cannot compile on this machine the calls fall back to eager
    instead of failing the stage."""
    import torch

    if getattr(unet, "_farm_compiled", False):
        return True
    torch._dynamo.config.suppress_errors = True  # a compiler failure costs speed, never a render
    inductor = torch._inductor.config
    inductor.conv_1x1_as_mm = True  # the UNets' 1x1 convolutions are matmuls in disguise
    # No coordinate-descent tuning: on an H200 it kept SDXL's first compile past 140 s (BENCHMARKS.md).
    unet.forward = torch.compile(unet.forward, fullgraph=False, dynamic=False)
    unet._farm_compiled = True
    log.info("compiled %s forward (first call per shape compiles)", type(unet).__name__)
    return True
