"""Content-addressed stage outputs.

A stage's key hashes everything that determines its output: model identity, effective parameters,
seed, the content of every weights file it loads and the keys of its inputs. What does not change the
pixels (the worker, its memory knobs) stays out of the key. A video call is two stages with two keys:
its latents (what the denoising made) and their decode (which the decode chunk and tiling change: the
temporal VAE's output depends on both), so another tier or an OOM retry with a smaller chunk decodes the
same latents anew instead of passing off other pixels as the same. Finished outputs live under the
state dir; a restarted director or an edited storyboard finds them by key and skips the work.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from farm.contract import StageKind
from farm.hashing import array_hash, content_hash, file_hash
from farm.models import ModelSpec, model_revision
from farm.paths import atomic_path


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """What of a model determines its pictures (the revision is read cheaply, never by hashing weights)."""
    return {"family": spec.family, "kind": spec.kind, "location": spec.location, "revision": model_revision(spec)}


def keyframe_key(model: dict[str, Any], params: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    """`options`: what changes the pipeline besides the model (LoRAs, VAE, sampler, step cache)."""
    return content_hash({"stage": "keyframe", "model": model, "params": params, "overrides": options})


def latents_key(model: dict[str, Any], params: Mapping[str, Any], input_key: str,
                options: Mapping[str, Any] | None = None) -> str:
    """A video call's final latents: the denoising parameters (no decode ones) and its first frame."""
    key = {"stage": "latents", "model": model, "params": dict(params), "input": input_key}
    if options and any(options.values()):
        key["options"] = dict(options)
    return content_hash(key)


def decode_key(latents: str, params: Mapping[str, Any], vae_tiling: bool, drop: int, kept: int) -> str:
    """Frames decoded from `latents`: the decode parameters (chunk, LTX's decode noise) and tiling
    change the pixels; `drop`/`kept` which of them the clip shows."""
    return content_hash({"stage": "decode", "latents": latents, "params": dict(params), "vae_tiling": vae_tiling,
                         "drop": drop, "kept": kept})


def image_key(path: Path, size: tuple[int, int], fit: str = "crop") -> str:
    return content_hash({"stage": "image", "file": file_hash(str(path)), "size": list(size), "fit": fit})


def clip_key(segment_keys: list[str], fps: int, encode: dict[str, Any]) -> str:
    return content_hash({"stage": "clip", "segments": segment_keys, "fps": fps, "encode": encode})


QC_VERSION = 1  # bump when farm.shot_metrics measures differently: cached measurements are then stale


def qc_key(segment_keys: list[str], start_key: str | None, seams: list[int]) -> str:
    """A take's measurements (not its verdict: the gates are applied afresh each time)."""
    return content_hash({"stage": "qc", "segments": segment_keys, "start": start_key, "seams": seams,
                         "version": QC_VERSION})


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

    def stage_input(self, kind: str, key: str | None) -> Any:
        """What a GPU stage starts from: a video call the previous frame (its keyframe, or the segment
        before), a decode its latents; a keyframe nothing."""
        if kind == StageKind.KEYFRAME:
            return None
        return self.last_frame(key or "") if kind == StageKind.VIDEO else self.latents(key or "")

    def last_frame(self, key: str) -> np.ndarray:
        return self.get_arrays(key)["last"]

    def put_keyframe(self, key: str, image: np.ndarray) -> dict[str, str]:
        """Store a keyframe stage's image; returns its hash for the stage's report."""
        self.put_arrays(key, last=image)
        return {"output_sha": array_hash(image)}

    def put_segment(self, key: str, frames: np.ndarray, drop: int, kept: int) -> dict[str, str]:
        """Store a decoded video segment: the frames the clip keeps, and the last of them (where the
        next segment starts; a call may have made more than are kept)."""
        last = frames[drop + kept - 1]
        self.put_arrays(key, frames=frames[drop:drop + kept], last=last)
        # Input and output hashes make chains checkable: a segment's input is its predecessor's output.
        return {"output_sha": array_hash(last)}

    def segment_frames(self, keys: Iterable[str]) -> np.ndarray:
        """The frames a clip shows, from its decoded segments' keys in order (put_segment's kept frames)."""
        return np.concatenate([self.get_arrays(k)["frames"] for k in keys], axis=0)

    def put_latents(self, key: str, latents: np.ndarray) -> dict[str, str]:
        """A video call's final latents (float32: bf16 and fp16 round-trip exactly), for its decode."""
        self.put_arrays(key, latents=latents)
        return {"output_sha": array_hash(latents)}

    def latents(self, key: str) -> np.ndarray:
        return self.get_arrays(key)["latents"]

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
