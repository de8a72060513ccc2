"""Writing the user-facing artifacts: keyframe PNGs (parameters in a text chunk), lockfile, ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.PngImagePlugin

from farm.hashing import canonical_json
from farm.paths import atomic_path, atomic_write_text
from farm.store import LEDGER_COLUMNS


def write_keyframe_png(path: Path, image: np.ndarray, params: dict[str, Any]) -> Path:
    info = PIL.PngImagePlugin.PngInfo()
    # "parameters" is the key A1111/ComfyUI users already look in for generation settings.
    info.add_text("parameters", canonical_json(params))
    with atomic_path(path) as tmp:
        PIL.Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: Path) -> dict[str, Any]:
    with PIL.Image.open(path) as img:
        return json.loads(img.text["parameters"])


def write_lockfile(path: Path, lock: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(lock, indent=2, sort_keys=True, default=str) + "\n")


def write_ledger(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("job", pa.string()), ("shot", pa.string()), ("stage", pa.string()), ("attempt", pa.int32()),
        ("worker", pa.string()), ("tier", pa.string()), ("preset", pa.string()),
        ("start", pa.timestamp("us", tz="UTC")), ("end", pa.timestamp("us", tz="UTC")),
        ("seconds", pa.float64()), ("peak_vram_bytes", pa.int64()), ("outcome", pa.string()),
        ("cache_hit", pa.bool_()), ("error", pa.string()),
    ])
    table = pa.Table.from_pylist([{c: row.get(c) for c in LEDGER_COLUMNS} for row in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A user-supplied keyframe, converted to RGB at the generation size."""
    with PIL.Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize(size, PIL.Image.LANCZOS))
