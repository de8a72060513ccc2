"""How long a stage takes on a worker of a tier: the cost model the director ranks stages with and
the simulator schedules with, and `calibrate`, which fits it to a real render's ledger.

Costs come from a stage's effective parameters (the same `farm.effective` numbers a worker gets),
so a tier that runs fewer steps is cheaper here exactly as it is on the GPU.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from farm.contract import GPU_KINDS, StageKind

if TYPE_CHECKING:
    from farm.jobbook import JobBook


@dataclass(frozen=True)
class TierCost:
    """Seconds one worker of a tier spends: per keyframe denoising step, per frame per video
    denoising step, per model load (first use of a model on a worker) and per frame of VAE decode."""

    keyframe_step_s: float
    video_frame_step_s: float
    load_s: float
    decode_frame_s: float = 0.1
    # What `farm calibrate` fitted where its ledgers ran a family on this tier: family -> stage kind ->
    # seconds per unit of work (`work_units`) at REF_PIXELS, scaled by the call's own pixels. Where a
    # family has no rate the tier-wide figures above apply (they do not scale with size).
    families: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def scaled(self, factor: float) -> TierCost:
        """Every figure times `factor` (benchmarks run the cost model faster than real time)."""
        return TierCost(self.keyframe_step_s * factor, self.video_frame_step_s * factor, self.load_s * factor,
                        self.decode_frame_s * factor,
                        {family: {kind: rate * factor for kind, rate in kinds.items()}
                         for family, kinds in self.families.items()})


REF_PIXELS = 1024 * 576  # the size a fitted family rate is per unit of work at


def work_units(kind: str, steps: int, frames: int) -> int:
    """A stage's work for the cost model: keyframe steps, video frame-steps (each denoising step runs
    over every frame of the call), decoded frames."""
    return {StageKind.KEYFRAME: steps, StageKind.VIDEO: steps * frames, StageKind.DECODE: frames}.get(
        StageKind(kind), 0)


def measured_rates(tier: str) -> dict[str, dict[str, float]]:
    """family -> stage kind -> rate, for the families measured on a GPU of `tier` (their own files)."""
    from farm.families import FAMILIES

    return {name: dict(fam.measured_rates[tier]) for name, fam in FAMILIES.items() if tier in fam.measured_rates}


# Mostly ASSUMED placeholder figures: a 1024x576 SDXL step and one frame of a 1024x576 SVD-XT step (CFG
# included). Mid (16-24 GB cards) is the reference; high is taken as ~2x mid's speed, low as ~0.6x, cpu
# as ~30x slower than mid. Loads assume weights on local disk; lower tiers are usually in slower hosts.
# Replace them with `calibrate` over a real ledger before trusting a makespan. The figures are per step
# at 1024x576 and are not rescaled for other resolutions; the decode figures are ASSUMED the same way,
# about one denoising step's worth per frame.
# MEASURED (BENCHMARKS.md "GPU stages at real size: NVIDIA H200", 2026-12-04, eager): the high tier's
# keyframe step, SDXL at 1024x576 on an H200 (0.077 s, eager and channels-last, which eager workers no
# longer use: likely an overestimate), and the rates a family file declares
# (`measured_rates`: LTX-Video's). The H200's rows under the mid and low caps are an H200's speed, not
# those cards', so those tiers stay assumed.
DEFAULT_COSTS: dict[str, TierCost] = {
    "high": TierCost(keyframe_step_s=0.077, video_frame_step_s=0.08, load_s=20.0, decode_frame_s=0.05,
                     families=measured_rates("high")),
    "mid": TierCost(keyframe_step_s=0.12, video_frame_step_s=0.16, load_s=30.0, decode_frame_s=0.1),
    "low": TierCost(keyframe_step_s=0.20, video_frame_step_s=0.27, load_s=45.0, decode_frame_s=0.18),
    "cpu": TierCost(keyframe_step_s=3.6, video_frame_step_s=4.8, load_s=60.0, decode_frame_s=3.0),
}

# CPU stages run on the encoder pool, never on a GPU. ASSUMED: libx264 at ~50 frames/s for a shot's
# clip, and ~100 frames/s over the whole film for the merge (mostly concatenation; a crossfade
# re-encodes, which this understates).
CLIP_FRAME_S = 0.02
MERGE_FRAME_S = 0.01
QC_FRAME_S = 0.016  # measured: farm.shot_metrics on 1024x576 frames on a 2-core CPU (bench/qc.py)


def params_pixels(params: Mapping[str, Any]) -> int | None:
    """The pixels per frame a call's params ask for; None where they carry no size (a decode's)."""
    width, height = params.get("width"), params.get("height")
    return int(width) * int(height) if width and height else None


def params_seconds(kind: str, params: Mapping[str, Any], cost: TierCost, family: str | None = None,
                   pixels: int | None = None) -> float:
    """Seconds of a GPU stage with these effective parameters on a worker costing `cost`: its work
    (`work_units`) at the family's fitted rate, scaled by the call's size (`pixels`, else the params'
    width x height), where there is one; else at the tier-wide rate, which does not scale with size."""
    if kind == StageKind.IDENTITY:  # ASSUMED: one reference image through a ViT-H ~ one keyframe step
        return len(params.get("images") or ()) * cost.keyframe_step_s
    work = work_units(kind, int(params.get("num_inference_steps") or 0), int(params.get("num_frames") or 1))
    rate = cost.families.get(family or "", {}).get(str(kind))
    if rate is not None:
        size = pixels or params_pixels(params) or REF_PIXELS
        return rate * work * size / REF_PIXELS
    tier_rate = {StageKind.KEYFRAME: cost.keyframe_step_s, StageKind.VIDEO: cost.video_frame_step_s,
                 StageKind.DECODE: cost.decode_frame_s}[StageKind(kind)]
    return tier_rate * work


def stage_seconds(book: JobBook, stage_id: str, tier: str, costs: Mapping[str, TierCost] = DEFAULT_COSTS) -> float:
    """Seconds `stage_id` takes on one worker of `tier`, model load excluded. CPU stages (clip,
    merge) ignore the tier: a constant per frame, because they run on the encoder pool."""
    stage = book.stage(stage_id)
    if stage.kind == StageKind.CLIP:
        return book.shots[stage.shot or ""].frames * CLIP_FRAME_S
    if stage.kind == StageKind.QC:
        return book.shots[stage.shot or ""].frames * QC_FRAME_S
    if stage.kind == StageKind.MERGE:
        return sum(sp.frames for sp in book.plan.shots) * MERGE_FRAME_S
    if tier not in costs:
        raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(costs)}")
    spec = book.setup.specs[StageKind(stage.kind).role]
    return params_seconds(stage.kind, book.params(stage_id, tier), costs[tier], spec.family,
                          stage_pixels(book, stage.kind))


def stage_pixels(book: JobBook, kind: str) -> int | None:
    """The pixels per frame a video or decode stage works at (a decode's params carry no size); None
    for a keyframe, whose params carry its own."""
    if kind == StageKind.KEYFRAME:
        return None
    from farm.manifest import parse_size

    width, height = parse_size(book.setup.manifest.output.resolution, "resolution")
    return width * height


def cost_table(book: JobBook, tiers: Iterable[str],
               costs: Mapping[str, TierCost] = DEFAULT_COSTS) -> dict[str, dict[str, float]]:
    """tier -> stage id -> seconds, for every stage of the job."""
    return {tier: {sid: stage_seconds(book, sid, tier, costs) for sid in book.plan.stages} for tier in tiers}


def fastest_tier(table: Mapping[str, Mapping[str, float]], book: JobBook) -> str:
    return min(table, key=lambda t: sum(c for sid, c in table[t].items() if book.stage(sid).gpu))


def price(book: JobBook, tiers: Iterable[str], costs: Mapping[str, TierCost] = DEFAULT_COSTS) -> None:
    """Give a job book what the dispatch policy weighs: every stage's cost on each of `tiers`, and
    its rank (the longest chain from it, at the fastest tier's costs). The director and the
    simulator both call this, so they plan with the same numbers."""
    table = cost_table(book, list(tiers) or ["mid"], costs)
    book.set_costs(table)
    book.set_ranks(table[fastest_tier(table, book)])


def load_seconds(costs: Mapping[str, TierCost] = DEFAULT_COSTS) -> dict[str, float]:
    """tier -> seconds a model load costs a worker of it."""
    return {tier: cost.load_s for tier, cost in costs.items()}


def calibrate(ledger_rows: list[dict[str, Any]], stages: Mapping[str, tuple[Any, ...]],
              base: Mapping[str, TierCost] = DEFAULT_COSTS) -> dict[str, TierCost]:
    """Fit per-tier keyframe_step_s, video_frame_step_s and decode_frame_s from a real render's ledger,
    and, where a stage says its family and size, per family x tier x kind rates scaled by size.

    `stages` maps stage id -> (kind, steps, frames[, family, pixels]) as that stage actually ran (steps
    are per tier, so take them from the lockfile). Failed and cache-hit rows are skipped. The fit is the
    median of seconds / work per row: a ledger row's seconds include a model load on a worker's first
    stage, and the median ignores those few outliers. Tiers or kinds with no rows keep `base`; load_s
    is always kept (the ledger does not separate it)."""
    rates: dict[str, dict[str, list[float]]] = {}
    family_rates: dict[str, dict[str, dict[str, list[float]]]] = {}
    for row in ledger_rows:
        if row.get("outcome") != "succeeded" or row.get("cache_hit"):
            continue
        info = stages.get(str(row.get("stage", "")))
        tier = row.get("tier")
        if info is None or not isinstance(tier, str) or tier not in base or info[0] not in GPU_KINDS:
            continue
        kind, steps, frames = info[0], int(info[1]), int(info[2])
        work = work_units(kind, steps, frames)
        seconds = row.get("seconds")
        if work <= 0 or seconds is None or not math.isfinite(float(seconds)) or float(seconds) < 0:
            continue
        rates.setdefault(tier, {}).setdefault(kind, []).append(float(seconds) / work)
        if len(info) >= 5 and info[3] and info[4]:
            family, pixels = str(info[3]), int(info[4])
            family_rates.setdefault(tier, {}).setdefault(family, {}).setdefault(kind, []).append(
                float(seconds) / (work * pixels / REF_PIXELS))
    out = dict(base)
    for tier, by_kind in rates.items():
        old = base[tier]
        fitted = {family: {**old.families.get(family, {}), **{k: statistics.median(v) for k, v in kinds.items()}}
                  for family, kinds in family_rates.get(tier, {}).items()}
        out[tier] = replace(
            old,
            keyframe_step_s=statistics.median(by_kind["keyframe"]) if "keyframe" in by_kind else old.keyframe_step_s,
            video_frame_step_s=statistics.median(by_kind["video"]) if "video" in by_kind else old.video_frame_step_s,
            decode_frame_s=statistics.median(by_kind["decode"]) if "decode" in by_kind else old.decode_frame_s,
            families={**old.families, **fitted},
        )
    return out

