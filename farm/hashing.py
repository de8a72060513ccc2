"""Stable hashing: shot seeds and content keys. One rule, used everywhere."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# One encoder: json.dumps with options builds a new one on every call, and a director hashes often.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal data always hashes equal."""
    return _CANONICAL.encode(value)


def content_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def file_hash(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(path: str) -> str:
    """The content hash of a weights file or folder (a LoRA, a VAE, an embedding), so a cache key
    changes when the weights do, not when they move. Memoised by path, size and modification time:
    hashing a 300 MB LoRA once per job, not once per stage."""
    from pathlib import Path

    if not path:  # Path("") is the working directory: never hash that for an unset path
        raise FileNotFoundError("no weights path given")
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    parts = []
    for file in files:
        stat = file.stat()
        memo = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _DIGESTS:
            _DIGESTS[memo] = file_hash(str(file))
        parts.append([file.relative_to(root).as_posix() if root.is_dir() else "", _DIGESTS[memo]])
    return content_hash(parts)


def derive_seed(job_seed: int, *parts: str | int) -> int:
    """A 32-bit seed derived from the job seed and names (shot id, segment index).

    Stable across processes and Python versions (no built-in `hash`), so a shot keeps its
    seed when other shots are added or reordered.
    """
    digest = hashlib.sha256(canonical_json([job_seed, *parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def array_hash(array: Any) -> str:
    """Hash of an image or frame stack's pixels and shape (what an artifact *is*, not where it lives)."""
    import numpy as np

    arr = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
    digest.update(arr.data.cast("B"))
    return digest.hexdigest()
