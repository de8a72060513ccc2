"""Writing the user-facing artifacts: keyframe PNGs (parameters in a text chunk), lockfile, ledger."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.PngImagePlugin

from farm.contract import PublishRequest, StageKind
from farm.frames import Fit, fit_image
from farm.hashing import canonical_json
from farm.paths import atomic_path, atomic_write_text
from farm.store import LEDGER_COLUMNS

if TYPE_CHECKING:
    from farm.cache import ArtifactCache
    from farm.jobbook import JobBook
    from farm.jobsetup import JobSetup
    from farm.manifest import Shot
    from farm.paths import OutputLayout
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
        ("qc", pa.string()),  # a QC take's metrics and verdict, JSON
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


def promote_take(layout: OutputLayout, shot: str, take: int) -> None:
    """Take `take` won QC: its clip becomes `shots/<shot>.mp4`; take 1's moves to `takes/` beside the
    others (each step a rename or an atomic copy, so no clip is ever half-written)."""
    import shutil

    own, first = layout.shot_clip(shot), layout.take_clip(shot, 1)
    first.parent.mkdir(parents=True, exist_ok=True)
    if own.exists():
        own.replace(first)
    with atomic_path(own) as tmp:
        shutil.copyfile(layout.take_clip(shot, take), tmp)


def write_outputs(book: JobBook, attempts: list[dict[str, Any]]) -> PublishRequest:
    """A finished job's ledger and lockfile (the film, clips and keyframes are written by their
    stages); returns what the encoder publishes next (`publish`): tags, timeline, report."""
    from farm.lockfile import build_lock, character_entries
    from farm.plan import take_id

    setup = book.setup
    write_job_ledger(book.layout.ledger, attempts)
    encode = setup.encode_identity() | {k: v for k, v in setup.merge_options.items() if k != "fps"}
    lock = build_lock(book.id, setup.manifest, setup.plan, setup.specs, book.records(), encode, setup.warnings)
    lock["preview"] = setup.preview
    lock["tier_dependent"] = book.tier_dependence()
    # What a draft ran per role (a distilled path, or undistilled steps and why), and the step cache.
    lock["draft"] = {role: asdict(choice) for role, choice in setup.drafts.items()}
    lock["step_cache"] = {role: {"kind": "first_block", "threshold": t} for role, t in setup.step_cache.items()}
    identities = {sid: done.record | {"key": done.key} for sid, done in book.done.items()
                  if book.stage(sid).kind == StageKind.IDENTITY}
    cast = character_entries(setup.manifest, setup.plan, setup.characters, setup.adapter_record(), identities)
    for shot in lock["shots"]:
        shot["characters"] = cast[shot["id"]]
    write_lockfile(book.layout.lockfile, lock)
    frame_keys, curves, seconds = {}, {}, {}
    for shot in lock["shots"]:
        sid, take = shot["id"], shot["qc"]["take"]
        frame_keys[sid] = tuple(book.done[take_id(f"decode:{sid}:{seg['index']}", take)].key
                                for seg in shot["video"]["segments"])
        kept = next((t for t in book.takes.get(sid, []) if t.take == take), None)
        curves[sid] = dict(kept.metrics.get("curves", {})) if kept else {}
        seconds[sid] = sum(float(row["seconds"]) for row in attempts
                           if row["shot"] == sid and row["outcome"] == "succeeded")
    options = setup.merge_options
    return PublishRequest(book.id, str(book.layout.root), lock, tuple(options["transitions"]),
                          float(options["crossfade_seconds"]), frame_keys, curves, seconds)


def publish(req: PublishRequest, cache: ArtifactCache) -> None:
    """The outputs made from the finished ones (the encoder runs this): provenance tags in every mp4,
    the editor's timeline, the QC report and contact sheet."""
    from farm.paths import OutputLayout
    from farm.report import write_report
    from farm.timeline import build_timeline, write_timeline

    layout = OutputLayout(req.out_dir)
    tag_provenance(req.job, layout, req.lock)
    write_timeline(layout.timeline, build_timeline(req.lock, req.transitions, req.crossfade_seconds, layout))
    frames = {sid: cache.segment_frames(keys) for sid, keys in req.frame_keys.items()}
    write_report(layout, req.lock, frames, req.curves, req.seconds)


def tag_provenance(job: str, layout: OutputLayout, lock: Mapping[str, Any]) -> None:
    """Provenance travels with the files: the film and every shot clip carry the title, the job, the
    models, the lockfile's sha256 and a plain AI-generated note in their container metadata (stream
    copy; content credentials such as C2PA can come later)."""
    from farm.encode import tag
    from farm.hashing import file_hash

    models = "; ".join(f"{role}: {m['source']}" for role, m in lock["models"].items())
    tags = {"title": lock["title"], "comment": f"AI-generated by storyfarm (job {job}; {models})",
            "ai_generated": "true", "farm_job": job, "farm_models": models,
            "farm_lockfile_sha256": file_hash(str(layout.lockfile))}
    for path in [layout.final, *(layout.shot_clip(s["id"]) for s in lock["shots"])]:
        if path.exists():
            tag(path, tags | ({"farm_shot": path.stem} if path != layout.final else {}))


def from_cache(cache: ArtifactCache, book: JobBook, stage: Stage, tiers: Iterable[str], now: float) -> bool:
    """Finish `stage` from the cache if a finished copy is there (copying a CPU stage's file to its
    place in the outputs). True if it was."""
    for key in book.probe_keys(stage, tiers):
        if stage.kind == StageKind.QC and cache.has(key, "json"):  # a take's measurements
            book.on_cache_hit(stage.id, key, cache.get_json(key), now)
            return True
        if stage.gpu and cache.has(key, "npz") and cache.has(key, "json"):
            book.on_cache_hit(stage.id, key, cache.get_json(key), now)
            return True
        if not stage.gpu and cache.has(key, "mp4"):
            cache.get_file(key, Path(book.encode_request(stage.id).dest), "mp4")
            book.on_cache_hit(stage.id, key, {}, now)
            return True
    return False
