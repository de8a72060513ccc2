"""The CPU encoder actor: keyframe PNGs, per-shot clips and the final merge. GPUs never encode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray

from farm.artifacts import write_keyframe_png
from farm.encode import EncodeSettings, encode_clip, merge_clips


class Encoder:
    def write_keyframe(self, path: str, params: dict[str, Any], image: np.ndarray) -> str:
        return str(write_keyframe_png(Path(path), image, params))

    def encode_clip(self, path: str, fps: float, settings: EncodeSettings, *segments: np.ndarray) -> int:
        frames = np.concatenate(segments, axis=0)
        encode_clip(frames, fps, Path(path), settings)
        return int(frames.shape[0])

    def merge(self, clips: list[str], out: str, settings: EncodeSettings, options: dict[str, Any]) -> str:
        return str(merge_clips([Path(c) for c in clips], Path(out), settings, **options))


# Two ffmpeg processes at once keep both of a small machine's cores busy while the GPUs render.
EncoderActor = ray.remote(num_cpus=0, max_concurrency=2)(Encoder)
