"""Writing the user-facing artifacts: keyframe PNGs (parameters in a text chunk), lockfile, ledger."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.PngImagePlugin

from farm.frames import Fit, fit_image
from farm.hashing import canonical_json
from farm.paths import atomic_path, atomic_write_text
from farm.store import LEDGER_COLUMNS

if TYPE_CHECKING:
    from farm.cache import ArtifactCache
    from farm.jobbook import JobBook
    from farm.jobsetup import JobSetup
    from farm.manifest import Shot
    from farm.plan import Stage


def write_keyframe_png(path: Path, image: np.ndarray, params: dict[str, Any]) -> Path:
    info = PIL.PngImagePlugin.PngInfo()
    # "parameters" is the key A1111/ComfyUI users already look in for generation settings.
    info.add_text("parameters", canonical_json(params))
    with atomic_path(path) as tmp:
        PIL.Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: Path) -> dict[str, Any]:
    with PIL.Image.open(path) as img:
        return json.loads(img.info["parameters"])


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
        ("cache_hit", pa.bool_()), ("error", pa.string()), ("note", pa.string()),
    ])
    table = pa.Table.from_pylist([{c: row.get(c) for c in LEDGER_COLUMNS} for row in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def load_image(path: Path, size: tuple[int, int], fit: Fit = "crop") -> np.ndarray:
    """A user-supplied keyframe, converted to RGB at the generation size, never stretched: centre-cropped
    (or padded) where its aspect ratio differs."""
    with PIL.Image.open(path) as img:
        return fit_image(np.asarray(img.convert("RGB")), size, fit)


def user_images(setup: JobSetup) -> dict[str, tuple[Path, str]]:
    """Users' own first frames: shot -> (file, cache key). The key hashes the file's bytes and the
    generation size, so an edited image is a new input."""
    from farm.cache import image_key
    from farm.manifest import inside_root

    out = {}
    for sp in setup.plan.shots:
        if sp.first_frame_from == "image" and sp.shot.keyframe is not None:
            path = inside_root(setup.root, sp.shot.keyframe)
            out[sp.shot.id] = (path, image_key(path, setup.manifest.output.size, keyframe_fit(setup, sp.shot)))
    return out


def ingest_images(setup: JobSetup, cache: ArtifactCache) -> dict[str, str]:
    """Read users' own first frames into the cache at the generation size, once: shot -> cache key."""
    out = {}
    for shot_id, (path, key) in user_images(setup).items():
        if not cache.has(key, "npz"):
            shot = next(sp.shot for sp in setup.plan.shots if sp.shot.id == shot_id)
            cache.put_arrays(key, last=load_image(path, setup.manifest.output.size, keyframe_fit(setup, shot)))
        out[shot_id] = key
    return out


def keyframe_fit(setup: JobSetup, shot: Shot) -> Fit:
    return shot.keyframe_fit or setup.manifest.output.keyframe_fit


def write_job_ledger(path: Path, attempts: list[dict[str, Any]]) -> Path:
    """OUT/ledger.parquet from the store's attempt rows (Unix times become UTC timestamps)."""
    from datetime import UTC, datetime

    rows = [row | {"start": datetime.fromtimestamp(row["start"], UTC), "end": datetime.fromtimestamp(row["end"], UTC),
                   "cache_hit": bool(row["cache_hit"])} for row in attempts]
    return write_ledger(path, rows)


def write_outputs(book: JobBook, attempts: list[dict[str, Any]]) -> None:
    """A finished job's ledger and lockfile (the film, clips and keyframes are written by their stages)."""
    from farm.lockfile import build_lock

    setup = book.setup
    write_job_ledger(book.layout.ledger, attempts)
    encode = setup.encode_identity() | {k: v for k, v in setup.merge_options.items() if k != "fps"}
    lock = build_lock(book.id, setup.manifest, setup.plan, setup.specs, book.records(), encode, setup.warnings)
    lock["preview"] = setup.preview
    lock["tier_dependent"] = book.tier_dependence()
    # What a draft ran per role (a distilled path, or undistilled steps and why), and the step cache.
    lock["draft"] = {role: asdict(choice) for role, choice in setup.drafts.items()}
    lock["step_cache"] = {role: {"kind": "first_block", "threshold": t} for role, t in setup.step_cache.items()}
    write_lockfile(book.layout.lockfile, lock)


def from_cache(cache: ArtifactCache, book: JobBook, stage: Stage, tiers: Iterable[str], now: float) -> bool:
    """Finish `stage` from the cache if a finished copy is there (copying a CPU stage's file to its
    place in the outputs). True if it was."""
    for key in book.probe_keys(stage, tiers):
        if stage.gpu and cache.has(key, "npz") and cache.has(key, "json"):
            book.on_cache_hit(stage.id, key, cache.get_json(key), now)
            return True
        if not stage.gpu and cache.has(key, "mp4"):
            cache.get_file(key, Path(book.encode_request(stage.id).dest), "mp4")
            book.on_cache_hit(stage.id, key, {}, now)
            return True
    return False
