"""The CPU encoder actor: keyframe PNGs, per-shot clips and the final merge. GPUs never encode.

It reads stage outputs from the artifact cache by key and stores its own results there too, so an
unchanged shot's clip is copied, not re-encoded, when the storyboard is rendered again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import ray

from farm.artifacts import write_keyframe_png
from farm.cache import ArtifactCache
from farm.encode import EncodeSettings, encode_clip, merge_clips


class Encoder:
    def __init__(self, cache_dir: str, yield_cpu: bool = False) -> None:
        self.cache = ArtifactCache(cache_dir)
        if yield_cpu:
            # On a host without GPUs the denoising runs on the same cores: encodes (and the ffmpeg
            # processes they start, which inherit this) take idle cycles instead of preempting it.
            os.nice(19 - os.nice(0))

    def write_keyframe(self, path: str, params: dict[str, Any], key: str) -> str:
        return str(write_keyframe_png(Path(path), self.cache.last_frame(key), params))

    def encode_clip(self, path: str, fps: float, settings: EncodeSettings, segment_keys: list[str], key: str) -> int:
        frames = np.concatenate([self.cache.get_arrays(k)["frames"] for k in segment_keys], axis=0)
        encode_clip(frames, fps, Path(path), settings)
        self.cache.put_file(key, Path(path), "mp4")
        return int(frames.shape[0])

    def merge(self, clips: list[str], out: str, settings: EncodeSettings, options: dict[str, Any], key: str) -> str:
        merge_clips([Path(c) for c in clips], Path(out), settings, **options)
        self.cache.put_file(key, Path(out), "mp4")
        return out


# Two ffmpeg processes at once keep a small machine's cores busy while the GPUs render.
EncoderActor = ray.remote(num_cpus=0, max_concurrency=2)(Encoder)
