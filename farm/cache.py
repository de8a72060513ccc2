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

import contextlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
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


def identity_key(adapter: Mapping[str, Any], images: list[str]) -> str:
    """A character's embeddings: the adapter's identity and the reference images' bytes (their sha256,
    in order), so a renamed photo is still found and an edited one is encoded anew."""
    return content_hash({"stage": "identity", "adapter": dict(adapter), "images": images})


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


def qc_key(segment_keys: list[str], start_key: str | None, seams: list[int],
           identity: Mapping[str, Any] | None = None) -> str:
    """A take's measurements (not its verdict: the gates are applied afresh each time); `identity`:
    the analyser and the characters' reference bytes, for shots with characters."""
    key: dict[str, Any] = {"stage": "qc", "segments": segment_keys, "start": start_key, "seams": seams,
                           "version": QC_VERSION}
    if identity:
        key["identity"] = dict(identity)
    return content_hash(key)


def merge_key(clip_keys: list[str], options: dict[str, Any], encode: dict[str, Any]) -> str:
    return content_hash({"stage": "merge", "clips": clip_keys, "options": options, "encode": encode})


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size: int
    used: float  # when it was last written or read (reads touch the file's mtime: atime is often off)


@dataclass
class CacheUsage:
    files: int = 0
    bytes: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)  # suffix (npz, json, mp4) -> bytes
    pinned_bytes: int = 0  # what queued and running jobs need
    stale_temp: int = 0  # half-written files a crash left behind (gc removes them)


@dataclass(frozen=True)
class GcReport:
    removed: int
    freed: int
    left: int  # bytes in the cache afterwards
    over_cap: bool  # still over the cap: what is left is pinned or in use


STALE_TEMP_S = 24 * 3600.0  # a temp file this old is no write in progress but a crash's leftover
GC_GRACE_S = 600.0  # never evict what was used this recently: a stage may be about to read it


def choose_evictions(entries: Iterable[CacheEntry], cap_bytes: int, pinned: Collection[str], now: float,
                     grace_s: float = GC_GRACE_S) -> list[CacheEntry]:
    """Least recently used first until the cache fits `cap_bytes`, sparing what a queued or running
    job needs (`pinned` keys) and what was used within `grace_s`."""
    entries = list(entries)
    total = sum(e.size for e in entries)
    chosen = []
    for entry in sorted(entries, key=lambda e: (e.used, e.key)):
        if total <= cap_bytes:
            break
        if entry.key in pinned or now - entry.used < grace_s:
            continue
        chosen.append(entry)
        total -= entry.size
    return chosen


class ArtifactCache:
    """Files under `root/<2 hex>/<key>.<suffix>`, written atomically. On a multi-node cluster, root
    must be shared storage (FARM_CACHE_DIR on NFS/EFS) for workers on other nodes to reuse outputs.
    Reads mark a file used; `gc` keeps the cache under its cap, least recently used out first."""

    def __init__(self, root: Path | str | None = None) -> None:
        if root is None:
            from farm.config import current

            root = current().cache_path
        self.root = Path(root)

    def path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}.{suffix}"

    def has(self, key: str, suffix: str) -> bool:
        """True if the output is there; a hit counts as a use (its reader is on the way)."""
        path = self.path(key, suffix)
        if not path.is_file():
            return False
        self._used(path)
        return True

    @staticmethod
    def _used(path: Path) -> None:
        with contextlib.suppress(OSError):  # a read-only shared cache still serves hits
            os.utime(path)

    # --- size: what is there, and keeping it under the cap ---------------------------------------

    def _scan(self, now: float) -> tuple[list[CacheEntry], list[Path]]:
        """One pass over the cache: every finished output, and the temp files a crash left behind
        (older than STALE_TEMP_S; younger ones are writes in progress)."""
        entries: list[CacheEntry] = []
        stale: list[Path] = []
        shards = [d for d in os.scandir(self.root) if d.is_dir(follow_symlinks=False) and len(d.name) == 2] \
            if self.root.is_dir() else []
        for shard in shards:
            for f in os.scandir(shard.path):
                with contextlib.suppress(FileNotFoundError):  # gone since the listing: another gc
                    if not f.is_file(follow_symlinks=False):
                        continue
                    st = f.stat()
                    if not f.name.startswith("."):
                        entries.append(CacheEntry(f.name.split(".", 1)[0], Path(f.path), st.st_size, st.st_mtime))
                    elif now - st.st_mtime > STALE_TEMP_S:
                        stale.append(Path(f.path))
        return entries, stale

    def entries(self) -> list[CacheEntry]:
        """Every finished output (temp files of writes in progress are not entries)."""
        return self._scan(time.time())[0]

    def usage(self, pinned: Collection[str] = (), now: float | None = None) -> CacheUsage:
        entries, stale = self._scan(time.time() if now is None else now)
        usage = CacheUsage(files=len(entries), bytes=sum(e.size for e in entries), stale_temp=len(stale))
        for entry in entries:
            usage.by_kind[entry.path.suffix.lstrip(".")] += entry.size
            usage.pinned_bytes += entry.size if entry.key in pinned else 0
        return usage

    def gc(self, cap_bytes: int, pinned: Collection[str] = (), *, now: float | None = None,
           grace_s: float = GC_GRACE_S, dry_run: bool = False) -> GcReport:
        """Evict least recently used outputs until the cache fits `cap_bytes`; never one in `pinned`
        (what queued and running jobs need) or used within `grace_s`. Removes crash leftovers too."""
        now = time.time() if now is None else now
        entries, stale = self._scan(now)
        chosen = choose_evictions(entries, cap_bytes, set(pinned), now, grace_s)
        if not dry_run:
            for path in [*stale, *(e.path for e in chosen)]:
                path.unlink(missing_ok=True)
        freed = sum(e.size for e in chosen)
        left = sum(e.size for e in entries) - freed
        return GcReport(removed=len(chosen), freed=freed, left=left, over_cap=left > cap_bytes)

    def put_arrays(self, key: str, **arrays: np.ndarray) -> Path:
        path = self.path(key, "npz")
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            # uncompressed: frames are noise-like to zlib, and speed matters here
            np.savez(fh, allow_pickle=False, **arrays)
        return path

    def get_arrays(self, key: str) -> dict[str, np.ndarray]:
        path = self.path(key, "npz")
        self._used(path)
        with np.load(path) as data:
            return {name: data[name] for name in data.files}

    # A stage's frames: "last" is what the next stage starts from, "frames" what the clip shows.

    def stage_input(self, kind: str, key: str | None) -> Any:
        """What a GPU stage starts from: a video call the previous frame (its keyframe, or the segment
        before), a decode its latents; a keyframe nothing."""
        if kind in (StageKind.KEYFRAME, StageKind.IDENTITY):
            return None  # a keyframe reads its characters' embeddings itself (StageRequest.identity)
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
        path = self.path(key, "json")
        self._used(path)
        return json.loads(path.read_text())

    def put_file(self, key: str, src: Path, suffix: str) -> Path:
        path = self.path(key, suffix)
        with atomic_path(path) as tmp:
            shutil.copyfile(src, tmp)
        return path

    def get_file(self, key: str, dest: Path, suffix: str) -> Path:
        src = self.path(key, suffix)
        self._used(src)
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return dest
