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
import PIL.Image
import torch

from farm.faults import StageCancelled
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
    """Count scheduler steps, UNet calls and VAE decode batch sizes, and time steps and UNet calls, by
    wrapping the pipeline's own objects for the duration of one call (the pipeline stays resident, so
    the wrappers are removed). Between steps it checks `cancelled`, so a cancelled job stops
    mid-stage, not at its end."""
    seen = Observed()
    scheduler, vae, unet = pipe.scheduler, pipe.vae, pipe.unet
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
        sample = args[0] if args else kwargs["sample"]
        seen.unet_batches.append(int(sample.shape[0]))
        unet_marks.append((clock.now(), None))

    def unet_out(_module: Any, _args: Any, _kwargs: Any, _output: Any) -> None:
        unet_marks[-1] = (unet_marks[-1][0], clock.now())

    scheduler.step, vae.decode = counting_step, recording_decode
    hooks = [unet.register_forward_pre_hook(unet_in, with_kwargs=True),
             unet.register_forward_hook(unet_out, with_kwargs=True)]
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


def run_keyframe(pipe: Any, params: Mapping[str, Any],
                 cancelled: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, Observed]:
    """Text-to-image: returns an HxWx3 uint8 image."""
    with observe(pipe, cancelled) as seen:
        out = pipe(
            prompt=params["prompt"],
            negative_prompt=params["negative_prompt"] or None,
            width=params["width"],
            height=params["height"],
            num_inference_steps=params["num_inference_steps"],
            guidance_scale=params["guidance_scale"],
            guidance_rescale=params["guidance_rescale"],
            generator=generator(params["seed"]),
            output_type="pt",
        )
    return tensor_to_uint8(out.images[:1])[0], seen


def run_video(pipe: Any, family: str, image: np.ndarray, params: Mapping[str, Any],
              cancelled: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, Observed]:
    """Image-to-video: returns (num_frames, H, W, 3) uint8 frames starting from `image`."""
    cond = PIL.Image.fromarray(image).resize((params["width"], params["height"]), PIL.Image.Resampling.LANCZOS)
    common = {
        "image": cond,
        "width": params["width"],
        "height": params["height"],
        "num_frames": params["num_frames"],
        "num_inference_steps": params["num_inference_steps"],
        "decode_chunk_size": params["decode_chunk_size"],
        "generator": generator(params["seed"]),
        "output_type": "pt",
    }
    with observe(pipe, cancelled) as seen:
        if family == "i2vgen":
            out = pipe(prompt=params["prompt"], negative_prompt=params["negative_prompt"] or None,
                       guidance_scale=params["guidance_scale"], target_fps=params["target_fps"], **common)
        else:
            out = pipe(fps=params["fps"], motion_bucket_id=params["motion_bucket_id"],
                       noise_aug_strength=params["noise_aug_strength"],
                       min_guidance_scale=params["min_guidance_scale"],
                       max_guidance_scale=params["max_guidance_scale"], **common)
    return tensor_to_uint8(out.frames[0]), seen
