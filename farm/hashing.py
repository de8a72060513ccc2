"""Stable hashing: shot seeds and content keys. One rule, used everywhere."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal data always hashes equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def file_hash(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
