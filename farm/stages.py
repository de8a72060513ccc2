"""Run one keyframe or video stage on a loaded pipeline, and observe what the pipeline really did.

The observation (denoising steps taken, frames per VAE decode call, peak VRAM) goes into the
ledger and lockfile, so "the low tier used decode chunk 6" is a measured fact, not an intention.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from farm.faults import StageCancelled


@dataclass
class Observed:
    steps: int = 0
    decode_batches: list[int] = field(default_factory=list)
    seconds: float = 0.0
    peak_vram_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "decode_chunk_max": max(self.decode_batches, default=0),
            "decode_calls": len(self.decode_batches),
            "seconds": round(self.seconds, 4),
            "peak_vram_bytes": self.peak_vram_bytes,
        }


@contextlib.contextmanager
def observe(pipe: Any, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Observed]:
    """Count scheduler steps and VAE decode batch sizes by wrapping the pipeline's own objects
    for the duration of one call (the pipeline stays resident, so the wrappers are removed).
    Between steps it checks `cancelled`, so a cancelled job stops mid-stage, not at its end."""
    seen = Observed()
    scheduler, vae = pipe.scheduler, pipe.vae
    step, decode = scheduler.step, vae.decode

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        if cancelled():
            raise StageCancelled("job cancelled")
        seen.steps += 1
        return step(*args, **kwargs)

    def recording_decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.decode_batches.append(int(latents.shape[0]))
        return decode(latents, *args, **kwargs)

    scheduler.step, vae.decode = counting_step, recording_decode
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield seen
    finally:
        seen.seconds = time.perf_counter() - start
        if cuda:
            seen.peak_vram_bytes = int(torch.cuda.max_memory_allocated())
        del scheduler.step, vae.decode  # drop the instance attributes: the class methods show again


def generator(seed: int) -> torch.Generator:
    # A CPU generator draws the same noise on every device, so a shot renders alike on any tier.
    return torch.Generator("cpu").manual_seed(seed)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def run_keyframe(pipe: Any, params: dict[str, Any],
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
            output_type="np",
        )
    return to_uint8(out.images[0]), seen


def run_video(pipe: Any, family: str, image: np.ndarray, params: dict[str, Any],
              cancelled: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, Observed]:
    """Image-to-video: returns (num_frames, H, W, 3) uint8 frames starting from `image`."""
    cond = PIL.Image.fromarray(image).resize((params["width"], params["height"]), PIL.Image.LANCZOS)
    common = {
        "image": cond,
        "width": params["width"],
        "height": params["height"],
        "num_frames": params["num_frames"],
        "num_inference_steps": params["num_inference_steps"],
        "decode_chunk_size": params["decode_chunk_size"],
        "generator": generator(params["seed"]),
        "output_type": "np",
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
    frames = np.asarray(out.frames[0])
    return to_uint8(frames), seen
