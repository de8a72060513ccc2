"""The CPU encoder actor: keyframe PNGs, per-shot clips and the final merge. GPUs never encode.

It reads stage outputs from the artifact cache by key and stores its own results there too, so an
unchanged shot's clip is copied, not re-encoded, when the storyboard is rendered again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from actors.remote import actor_class
from farm.artifacts import publish, write_keyframe_png
from farm.cache import ArtifactCache
from farm.contract import EncodeRequest, EncodeResult, PublishRequest, StageKind
from farm.encode import encode_clip, merge_clips


class Encoder:
    def __init__(self, cache_dir: str, yield_cpu: bool = False) -> None:
        self.cache = ArtifactCache(cache_dir)
        if yield_cpu:
            # On a host without GPUs the denoising runs on the same cores: encodes (and the ffmpeg
            # processes they start, which inherit this) take idle cycles instead of preempting it.
            os.nice(19 - os.nice(0))

    def write_keyframe(self, path: str, params: dict[str, Any], key: str) -> str:
        return str(write_keyframe_png(Path(path), self.cache.last_frame(key), params))

    def publish(self, req: PublishRequest) -> None:
        """A finished job's tags, timeline and report, off the director's loop."""
        publish(req, self.cache)

    def run(self, req: EncodeRequest) -> EncodeResult:
        """A clip from its segments' frames, a take's QC measurements, or the film from the clips; the
        result goes to the cache too."""
        if req.kind == StageKind.QC:
            from farm.faces import identity_metrics
            from farm.shot_metrics import measure

            frames = self.cache.segment_frames(req.inputs)
            start_key = req.options.get("start_key")
            start = self.cache.last_frame(start_key) if start_key else None
            metrics = measure(frames, start, req.options.get("seams", ())) | identity_metrics(
                start, req.options.get("identity"))
            self.cache.put_json(req.output_key, metrics)
            return EncodeResult(frames=int(frames.shape[0]), metrics=metrics)
        if req.kind == StageKind.CLIP:
            frames = self.cache.segment_frames(req.inputs)
            encode_clip(frames, req.fps, Path(req.dest), req.settings)
            self.cache.put_file(req.output_key, Path(req.dest), "mp4")
            return EncodeResult(frames=int(frames.shape[0]))
        merged = merge_clips([Path(c) for c in req.inputs], Path(req.dest), req.settings, **req.options)
        self.cache.put_file(req.output_key, Path(req.dest), "mp4")
        return EncodeResult(note=merged.how)


# Two ffmpeg processes at once keep a small machine's cores busy while the GPUs render.
EncoderActor = actor_class(Encoder, num_cpus=0, max_concurrency=2)
