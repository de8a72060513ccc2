"""Content-addressed stage outputs.

A stage's key hashes everything that determines its output: model identity, effective parameters,
seed and the keys of its inputs. Execution details that do not change the pictures (the worker,
its tier's decode chunk and memory knobs) stay out of the key, so a shot rendered on a mid-tier
card is reused on a low-tier one. Finished outputs live under the state dir; a restarted director
or an edited storyboard finds them by key and skips the work.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from farm.hashing import array_hash, content_hash, file_hash
from farm.models import ModelSpec, model_revision
from farm.paths import atomic_path

# Parameters that change how a stage runs, not what it produces.
EXECUTION_ONLY = ("decode_chunk_size",)


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """What of a model determines its pictures (the revision is read cheaply, never by hashing weights)."""
    return {"family": spec.family, "kind": spec.kind, "location": spec.location, "revision": model_revision(spec)}


def keyframe_key(model: dict[str, Any], params: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    """`options`: what changes the pipeline besides the model (LoRAs, VAE, sampler, step cache)."""
    return content_hash({"stage": "keyframe", "model": model, "params": params, "overrides": options})


def video_key(model: dict[str, Any], params: Mapping[str, Any], input_key: str, drop: int, kept: int,
              options: Mapping[str, Any] | None = None) -> str:
    outcome = {k: v for k, v in params.items() if k not in EXECUTION_ONLY}
    key = {"stage": "video", "model": model, "params": outcome, "input": input_key, "drop": drop, "kept": kept}
    if options and any(options.values()):  # stays the old key where nothing changes the pipeline
        key["options"] = dict(options)
    return content_hash(key)


def image_key(path: Path, size: tuple[int, int], fit: str = "crop") -> str:
    return content_hash({"stage": "image", "file": file_hash(str(path)), "size": list(size), "fit": fit})


def clip_key(segment_keys: list[str], fps: int, encode: dict[str, Any]) -> str:
    return content_hash({"stage": "clip", "segments": segment_keys, "fps": fps, "encode": encode})


def merge_key(clip_keys: list[str], options: dict[str, Any], encode: dict[str, Any]) -> str:
    return content_hash({"stage": "merge", "clips": clip_keys, "options": options, "encode": encode})


class ArtifactCache:
    """Files under `root/<2 hex>/<key>.<suffix>`, written atomically. On a multi-node cluster, root
    must be shared storage (FARM_CACHE_DIR on NFS/EFS) for workers on other nodes to reuse outputs."""

    def __init__(self, root: Path | str | None = None) -> None:
        if root is None:
            from farm.config import current

            root = current().cache_path
        self.root = Path(root)

    def path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}.{suffix}"

    def has(self, key: str, suffix: str) -> bool:
        return self.path(key, suffix).is_file()

    def put_arrays(self, key: str, **arrays: np.ndarray) -> Path:
        path = self.path(key, "npz")
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            # uncompressed: frames are noise-like to zlib, and speed matters here
            np.savez(fh, allow_pickle=False, **arrays)
        return path

    def get_arrays(self, key: str) -> dict[str, np.ndarray]:
        with np.load(self.path(key, "npz")) as data:
            return {name: data[name] for name in data.files}

    # A stage's frames: "last" is what the next stage starts from, "frames" what the clip shows.

    def last_frame(self, key: str) -> np.ndarray:
        return self.get_arrays(key)["last"]

    def put_keyframe(self, key: str, image: np.ndarray) -> dict[str, str]:
        """Store a keyframe stage's image; returns its hash for the stage's report."""
        self.put_arrays(key, last=image)
        return {"output_sha": array_hash(image)}

    def put_segment(self, key: str, first: np.ndarray, frames: np.ndarray, drop: int, kept: int) -> dict[str, str]:
        """Store a video segment started from `first`: the frames the clip keeps, and the last of them
        (where the next segment starts; a model's frame rule may have made more than are kept)."""
        last = frames[drop + kept - 1]
        self.put_arrays(key, frames=frames[drop:drop + kept], last=last)
        # Input and output hashes make chains checkable: a segment's input is its predecessor's output.
        return {"input_sha": array_hash(first), "output_sha": array_hash(last)}

    def put_json(self, key: str, value: Any) -> Path:
        path = self.path(key, "json")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(value, default=str))
        return path

    def get_json(self, key: str) -> Any:
        return json.loads(self.path(key, "json").read_text())

    def put_file(self, key: str, src: Path, suffix: str) -> Path:
        path = self.path(key, suffix)
        with atomic_path(path) as tmp:
            shutil.copyfile(src, tmp)
        return path

    def get_file(self, key: str, dest: Path, suffix: str) -> Path:
        with atomic_path(dest) as tmp:
            shutil.copyfile(self.path(key, suffix), tmp)
        return dest
