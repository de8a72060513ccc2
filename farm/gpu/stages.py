"""Run one keyframe or video stage on a loaded pipeline, and observe what the pipeline really did.

The observation (denoising steps, UNet calls and their batch, frames per VAE decode call, seconds per
step and inside the UNet, peak VRAM) goes into the ledger and lockfile, so "the low tier used decode
chunk 6" and "guidance ran as one batch-2 UNet call per step" are measured facts, not intentions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from farm.faults import StageCancelled
from farm.gpu.families import gpu_family
from farm.observed import Observed


class _Clock:
    """Timestamps that never stall the GPU: CUDA events recorded in stream order and read once, after
    the call (a synchronize per step would drain the launch queue and slow the loop it measures)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        return start.elapsed_time(end) / 1000.0  # ms; both events have completed after the synchronize


@contextlib.contextmanager
def observe(pipe: Any, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Observed]:
    """Count scheduler steps, denoiser calls (the UNet or transformer) and VAE decode batch sizes, and
    time steps and denoiser calls, by wrapping the pipeline's own objects for the duration of one call
    (the pipeline stays resident, so the wrappers are removed). Between steps it checks `cancelled`,
    so a cancelled job stops mid-stage, not at its end."""
    seen = Observed()
    scheduler, vae = pipe.scheduler, pipe.vae
    denoisers = [m for m in (getattr(pipe, n, None) for n in ("unet", "transformer", "transformer_2"))
                 if isinstance(m, torch.nn.Module)]
    step, decode = scheduler.step, vae.decode
    cuda = torch.cuda.is_available()
    clock = _Clock(cuda)
    step_marks: list[Any] = []
    unet_marks: list[tuple[Any, Any]] = []

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        if cancelled():
            raise StageCancelled("job cancelled")
        seen.steps += 1
        out = step(*args, **kwargs)
        step_marks.append(clock.now())
        return out

    def recording_decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.decode_batches.append(int(latents.shape[0]))
        return decode(latents, *args, **kwargs)

    def unet_in(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        seen.unet_batches.append(int(sample.shape[0]) if sample is not None else 0)
        unet_marks.append((clock.now(), None))

    def unet_out(_module: Any, _args: Any, _kwargs: Any, _output: Any) -> None:
        unet_marks[-1] = (unet_marks[-1][0], clock.now())

    scheduler.step, vae.decode = counting_step, recording_decode
    hooks = [hook for net in denoisers for hook in (net.register_forward_pre_hook(unet_in, with_kwargs=True),
                                                    net.register_forward_hook(unet_out, with_kwargs=True))]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield seen
    finally:
        if cuda:
            torch.cuda.synchronize()
            seen.peak_vram_bytes = int(torch.cuda.max_memory_allocated())
        seen.seconds = time.perf_counter() - start
        seen.step_seconds = [clock.seconds(a, b) for a, b in zip(step_marks, step_marks[1:], strict=False)]
        seen.unet_seconds = [clock.seconds(a, b) for a, b in unet_marks if b is not None]
        for hook in hooks:
            hook.remove()
        del scheduler.step, vae.decode  # drop the instance attributes: the class methods show again


def generator(seed: int) -> torch.Generator:
    # A CPU generator draws the same noise on every device, so a shot renders alike on any tier.
    return torch.Generator("cpu").manual_seed(seed)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def tensor_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1], on the pipeline's device -> (N, H, W, C) uint8 on the host.

    Converted where the frames are, so one copy of a quarter of the bytes crosses to the host, and in
    float32 with the same arithmetic as `to_uint8`, so CPU renders give the same bytes either way."""
    out = (frames.float().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def run_stage(pipe: Any, family: str, params: Mapping[str, Any], image: np.ndarray | None = None,
              cancelled: Callable[[], bool] = lambda: False,
              extra: Mapping[str, Any] | None = None) -> tuple[np.ndarray, Observed]:
    """One whole keyframe or video call of `family`'s pipeline with the parameters its pure half
    mapped (and `extra` arguments that are tensors, not parameters: a keyframe's identity embeddings).
    Returns uint8 frames (N, H, W, 3): the keyframe's one image, or the video's frames starting from
    `image`."""
    with observe(pipe, cancelled) as seen:
        frames = gpu_family(family).call(pipe, params, image, generator(int(params["seed"])), extra=extra)
    return tensor_to_uint8(frames), seen


def run_denoise(pipe: Any, family: str, params: Mapping[str, Any], image: np.ndarray,
                cancelled: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, Observed]:
    """A video stage: the call up to its final latents, returned as float32 on the host (bf16 and fp16
    round-trip through float32 exactly) for the cache and the decode stage."""
    with observe(pipe, cancelled) as seen:
        latents = gpu_family(family).denoise(pipe, params, image, generator(int(params["seed"])))
    return latents.float().cpu().numpy(), seen


def run_decode(pipe: Any, family: str, params: Mapping[str, Any],
               latents: np.ndarray) -> tuple[np.ndarray, Observed]:
    """A decode stage: cached latents through the family's VAE to uint8 frames (N, H, W, 3)."""
    with observe(pipe) as seen, torch.no_grad():
        frames = gpu_family(family).decode(pipe, torch.from_numpy(latents), params, generator(int(params["seed"])))
    return tensor_to_uint8(frames), seen


def count_prompt(pipe: Any, family: str, params: Mapping[str, Any], seen: Observed) -> None:
    """Record how many tokens the family's reading tokenizer makes of the prompt (and its limit), so
    the lockfile says exactly where a long prompt was cut off."""
    encoder = gpu_family(family).rules.prompt_encoder
    prompt = params.get("prompt")
    tokenizer = getattr(pipe, encoder[0], None) if encoder else None
    if encoder is None or tokenizer is None or not isinstance(prompt, str):
        return
    seen.prompt_tokens = len(tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"])
    seen.prompt_limit = encoder[1]
