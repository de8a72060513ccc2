"""`farm calibrate`: the cost model fitted to the farm's own renders.

A finished render leaves `ledger.parquet` (one row per stage attempt: stage, worker, tier, start,
seconds) and `manifest.lock.json` (what each stage ran: steps, frames) side by side. From any number
of them this fits, per tier, seconds per keyframe step, per video frame-step and per decoded frame
(the median over stages, `farm.sim.costs.calibrate`) and the model load time (what a worker's first
stage of a model took beyond the fitted cost of that stage, median). Tiers the ledgers never ran
keep the assumed figures and are marked so in the file. The director and `farm plan --simulate` read
the file named by the farm config's `costs:`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from farm.contract import StageKind
from farm.sim.costs import DEFAULT_COSTS, TierCost, calibrate, params_pixels, params_seconds

Work = tuple[str, int, int, str | None, int | None]  # kind, steps, frames, family, pixels as the stage ran


def stage_work(lock: Mapping[str, Any]) -> dict[str, Work]:
    """stage id -> (kind, steps, frames, family, pixels) from a lockfile: the keyframe's steps at its
    size, each video segment's steps and frames, each decode's frames at the video's size."""
    out: dict[str, Work] = {}
    models = lock.get("models") or {}
    families = {role: (models.get(role) or {}).get("family") for role in ("keyframe", "video")}
    for shot in lock.get("shots", []):
        sid = shot["id"]
        keyframe = shot.get("keyframe") or {}
        params = keyframe.get("params") or {}
        steps = params.get("num_inference_steps")
        if steps:
            out[f"keyframe:{sid}"] = ("keyframe", int(steps), 1, families["keyframe"], params_pixels(params))
        for segment in (shot.get("video") or {}).get("segments", []):
            params = segment.get("params") or {}
            frames = int(params.get("num_frames") or segment.get("frames") or 0)
            index, pixels = segment.get("index", 0), params_pixels(params)
            out[f"video:{sid}:{index}"] = ("video", int(params.get("num_inference_steps") or 0), frames,
                                           families["video"], pixels)
            out[f"decode:{sid}:{index}"] = ("decode", 0, frames, families["video"], pixels)
    return out


def read_render(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Work]]:
    """A render's ledger rows and its stages' work; `folder` holds ledger.parquet and the lockfile
    (a path to the ledger itself is taken as its folder)."""
    import pyarrow.parquet as pq

    folder = folder.parent if folder.suffix == ".parquet" else folder
    ledger, lock = folder / "ledger.parquet", folder / "manifest.lock.json"
    for path in (ledger, lock):
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {path.name} (calibrate reads a finished render's folder)")
    return pq.read_table(ledger).to_pylist(), stage_work(json.loads(lock.read_text()))


def fit(renders: Iterable[tuple[list[dict[str, Any]], dict[str, Work]]],
        base: Mapping[str, TierCost] = DEFAULT_COSTS) -> tuple[dict[str, TierCost], dict[str, list[str]]]:
    """Per-tier costs from several renders, and what each tier's figures came from (`measured`
    kinds, `load`), so the file can say which are still assumed."""
    rows: list[dict[str, Any]] = []
    stages: dict[str, Work] = {}
    for number, (ledger, work) in enumerate(renders):
        # stage ids repeat across renders: prefix them with the render's number
        rows += [row | {"stage": f"{number}/{row['stage']}", "job_run": number} for row in ledger]
        stages |= {f"{number}/{sid}": w for sid, w in work.items()}
    fitted = calibrate(rows, stages, base)
    measured: dict[str, list[str]] = {}
    loads: dict[str, list[float]] = {}
    seen: set[tuple[int, str, str]] = set()
    for row in sorted(rows, key=lambda r: (r.get("job_run", 0), r.get("start") or 0.0)):
        info = stages.get(row["stage"])
        tier = row.get("tier")
        if not info or row.get("outcome") != "succeeded" or row.get("cache_hit") or tier not in fitted:
            continue
        kinds = measured.setdefault(tier, [])
        if info[0] not in kinds:
            kinds.append(info[0])
        first = (row.get("job_run", 0), str(row.get("worker")), StageKind(info[0]).role)  # its model's first stage
        if first in seen:
            continue
        seen.add(first)
        params = {"num_inference_steps": info[1], "num_frames": info[2]}
        family, pixels = (info[3], info[4]) if len(info) >= 5 else (None, None)  # older 3-tuples: tier-wide
        cost = params_seconds(info[0], params, fitted[tier], family, pixels)
        loads.setdefault(tier, []).append(max(0.0, float(row["seconds"]) - cost))
    for tier, extras in loads.items():
        fitted[tier] = replace(fitted[tier], load_s=statistics.median(extras))
        measured.setdefault(tier, []).append("load")
    return fitted, measured


def write_costs(path: Path, costs: Mapping[str, TierCost], measured: Mapping[str, list[str]],
                sources: list[str]) -> None:
    tiers = {tier: {**{k: round(v, 6) for k, v in asdict(cost).items() if k != "families"},
                    "families": {family: {kind: round(rate, 9) for kind, rate in kinds.items()}
                                 for family, kinds in cost.families.items()},
                    "measured": sorted(measured.get(tier, [])), "assumed": not measured.get(tier)}
             for tier, cost in costs.items()}
    path.write_text(yaml.safe_dump({"version": 1, "from": sources, "tiers": tiers}, sort_keys=False))


def load_costs(path: str | Path) -> dict[str, TierCost]:
    """A costs file `farm calibrate` wrote; tiers it lacks keep the assumed figures."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    tiers = data.get("tiers")
    if not isinstance(tiers, dict):
        raise ValueError(f"{path}: not a costs file (no `tiers:` mapping); make one with `farm calibrate`")
    out = dict(DEFAULT_COSTS)
    fields = set(TierCost.__dataclass_fields__)
    for tier, values in tiers.items():
        if tier not in DEFAULT_COSTS or not isinstance(values, dict):
            raise ValueError(f"{path}: tiers.{tier}: unknown tier or not a mapping")
        try:
            figures = {k: float(v) for k, v in values.items() if k in fields and k != "families"}
            families = {str(family): {str(kind): float(rate) for kind, rate in kinds.items()}
                        for family, kinds in (values.get("families") or {}).items()}
            out[tier] = replace(DEFAULT_COSTS[tier], **figures, families=families)
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: tiers.{tier}: {exc}") from None
        if any(v < 0 for v in figures.values()) or any(r < 0 for k in families.values() for r in k.values()):
            raise ValueError(f"{path}: tiers.{tier}: a negative cost")
    return out
