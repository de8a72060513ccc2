"""A simulated farm: the real plan and the real dispatch policy, with assumed stage costs instead of GPUs.

Two uses:
- `simulate` runs a discrete-event simulation of a storyboard on a cluster (GPU counts per VRAM
  tier) and estimates its makespan, next to a lower bound no schedule can beat.
- `SimWorker` has `farm.worker.StageWorker`'s public methods but sleeps instead of rendering, so the
  real director can be benchmarked at cluster scale on a laptop.

`simulate` calls `farm.schedule.assign` over `farm.plan.build_plan`'s DAG the same way
`actors/director.py` does, so what the simulator says about scheduling is what the farm does.
Plain functions over plain data; no Ray.
"""

from __future__ import annotations

import heapq
import math
import os
import platform
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from farm.faults import StageCancelled, fire
from farm.manifest import Manifest, Shot
from farm.observed import Observed
from farm.plan import Plan, Stage, output_fps, shot_frames
from farm.presets import GPU_TIERS, TIERS, Tier, keyframe_steps, video_steps
from farm.schedule import ReadyStage, WorkerView, assign

Policy = Callable[[list[ReadyStage], list[WorkerView]], list[tuple[str, str]]]

# --- cost model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TierCost:
    """Seconds one worker of a tier spends: per SDXL denoising step of a keyframe, per frame per
    SVD denoising step of a video segment, and per model load (first use of a model on a worker)."""

    keyframe_step_s: float
    video_frame_step_s: float
    load_s: float


# ASSUMED placeholder figures, not measurements: a 1024x576 SDXL step and one frame of a 1024x576
# SVD-XT step (CFG included). Mid (16-24 GB cards) is the reference; high is taken as ~2x mid's speed,
# low as ~0.6x, cpu as ~30x slower than mid. Loads assume weights on local disk; lower tiers are
# usually in slower hosts. Replace them with `calibrate` over a real ledger before trusting a makespan.
# The figures are per step at 1024x576 and are not rescaled for other resolutions.
DEFAULT_COSTS: dict[str, TierCost] = {
    "high": TierCost(keyframe_step_s=0.06, video_frame_step_s=0.08, load_s=20.0),
    "mid": TierCost(keyframe_step_s=0.12, video_frame_step_s=0.16, load_s=30.0),
    "low": TierCost(keyframe_step_s=0.20, video_frame_step_s=0.27, load_s=45.0),
    "cpu": TierCost(keyframe_step_s=3.6, video_frame_step_s=4.8, load_s=60.0),
}

# CPU stages run on the encoder pool, never on a GPU. ASSUMED: libx264 at ~50 frames/s for a shot's
# clip, and ~100 frames/s over the whole film for the merge (mostly concatenation; a crossfade
# re-encodes, which this understates).
CLIP_FRAME_S = 0.02
MERGE_FRAME_S = 0.01


def keyframe_seconds(steps: int, cost: TierCost) -> float:
    return steps * cost.keyframe_step_s


def video_seconds(steps: int, frames: int, cost: TierCost) -> float:
    # Every denoising step runs the UNet over all frames of the call, so cost ~ steps x frames.
    return steps * frames * cost.video_frame_step_s


class _Shots(NamedTuple):
    shots: dict[str, Shot]
    frames: dict[str, int]


def _index(manifest: Manifest) -> _Shots:
    fps = output_fps(manifest)
    return _Shots({s.id: s for s in manifest.shots}, {s.id: shot_frames(s.duration, fps) for s in manifest.shots})


def _stage_cost(stage: Stage, manifest: Manifest, tier: str, costs: Mapping[str, TierCost], index: _Shots) -> float:
    if stage.kind == "clip":
        return index.frames[stage.shot or ""] * CLIP_FRAME_S
    if stage.kind == "merge":
        return sum(index.frames.values()) * MERGE_FRAME_S
    cost = costs[tier]
    shot = index.shots[stage.shot or ""]
    if stage.kind == "keyframe":
        pinned = (shot.steps and shot.steps.keyframe) or manifest.steps.keyframe
        return keyframe_seconds(keyframe_steps(manifest.quality, pinned), cost)
    assert stage.segment is not None
    # Same step rule as farm/effective.py: pins win on every tier, else the tier's clamp.
    pinned = (shot.steps and shot.steps.video) or manifest.steps.video
    steps = video_steps(manifest.quality, _preset_tier(tier), pinned)
    return video_seconds(steps, stage.segment.frames, cost)


def _preset_tier(tier: str) -> Tier:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
    return tier  # type: ignore[return-value]


def stage_cost(stage: Stage, manifest: Manifest, tier: str, costs: Mapping[str, TierCost] = DEFAULT_COSTS) -> float:
    """Seconds `stage` takes on one worker of `tier`, model load excluded.

    GPU stages: keyframe steps x keyframe_step_s; video steps for the tier x segment frames x
    video_frame_step_s. CPU stages (clip, merge) ignore the tier: a constant per frame, because
    they run on the encoder pool."""
    return _stage_cost(stage, manifest, tier, costs, _index(manifest))


def cost_table(plan: Plan, manifest: Manifest, tiers: list[str],
               costs: Mapping[str, TierCost] = DEFAULT_COSTS) -> dict[str, dict[str, float]]:
    """tier -> stage id -> seconds, for every stage of the plan."""
    index = _index(manifest)
    return {tier: {sid: _stage_cost(s, manifest, tier, costs, index) for sid, s in plan.stages.items()}
            for tier in tiers}


def calibrate(ledger_rows: list[dict[str, Any]], stages: Mapping[str, tuple[str, int, int]],
              base: Mapping[str, TierCost] = DEFAULT_COSTS) -> dict[str, TierCost]:
    """Fit per-tier keyframe_step_s and video_frame_step_s from a real render's ledger.

    `stages` maps stage id -> (kind, steps, frames) as that stage actually ran (steps are per tier,
    so take them from the lockfile or the director's records). Failed and cache-hit rows are skipped.
    The fit is the median of seconds / (steps [x frames]) per row: a ledger row's seconds include a
    model load on a worker's first stage, and the median ignores those few outliers. Tiers or kinds
    with no rows keep `base`; load_s is always kept (the ledger does not separate it)."""
    rates: dict[str, dict[str, list[float]]] = {}
    for row in ledger_rows:
        if row.get("outcome") != "succeeded" or row.get("cache_hit"):
            continue
        info = stages.get(row.get("stage", ""))
        tier = row.get("tier")
        if info is None or tier not in base:
            continue
        kind, steps, frames = info
        work = steps if kind == "keyframe" else steps * frames if kind == "video" else 0
        seconds = row.get("seconds")
        if work <= 0 or seconds is None or not math.isfinite(float(seconds)) or float(seconds) < 0:
            continue
        rates.setdefault(tier, {}).setdefault(kind, []).append(float(seconds) / work)
    out = dict(base)
    for tier, by_kind in rates.items():
        old = base[tier]
        out[tier] = replace(
            old,
            keyframe_step_s=statistics.median(by_kind["keyframe"]) if "keyframe" in by_kind else old.keyframe_step_s,
            video_frame_step_s=statistics.median(by_kind["video"]) if "video" in by_kind else old.video_frame_step_s,
        )
    return out


# --- cluster ------------------------------------------------------------------------------------


def load_cluster(path: Path | str) -> dict[str, int]:
    """GPU count per tier, from `tiers: {high: 4, mid: 8, low: 4}` or a Ray cluster launcher config.

    In a cluster.yaml, each node type under `available_node_types` advertises its tier through the
    custom resource `farm_tier_<tier>: N` (N GPU workers of that tier per node, what
    actors/worker.py asks for). Nodes per type: `max_workers`, else `min_workers`, else 1; the
    head node type counts one more node (the head itself)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with `tiers` or `available_node_types`")
    if "tiers" in data:
        counts = _tiers_section(path, data["tiers"])
    elif "available_node_types" in data:
        counts = _ray_node_types(path, data["available_node_types"], data.get("head_node_type"))
    else:
        raise ValueError(f"{path}: expected `tiers: {{high: N, mid: N, low: N}}` or a Ray cluster.yaml "
                         "with `available_node_types`")
    if sum(counts.values()) <= 0:
        raise ValueError(f"{path}: the cluster has no GPU workers")
    return counts


def _count(path: Path, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: {where} must be a whole number >= 0, not {value!r}")
    return value


def _tiers_section(path: Path, tiers: Any) -> dict[str, int]:
    if not isinstance(tiers, dict):
        raise ValueError(f"{path}: `tiers` must map tier names to GPU counts")
    counts: dict[str, int] = {}
    for tier, n in tiers.items():
        if tier not in TIERS:
            raise ValueError(f"{path}: tiers.{tier}: unknown tier; expected one of {', '.join(TIERS)}")
        counts[tier] = _count(path, f"tiers.{tier}", n)
    return counts


def _ray_node_types(path: Path, node_types: Any, head: Any) -> dict[str, int]:
    if not isinstance(node_types, dict) or not node_types:
        raise ValueError(f"{path}: `available_node_types` must be a non-empty mapping of node types")
    counts: dict[str, int] = {}
    for name, node in node_types.items():
        where = f"available_node_types.{name}"
        if not isinstance(node, dict):
            raise ValueError(f"{path}: {where} must be a mapping")
        resources = node.get("resources") or {}
        if not isinstance(resources, dict):
            raise ValueError(f"{path}: {where}.resources must be a mapping")
        per_node = {tier: _count(path, f"{where}.resources.farm_tier_{tier}", resources[f"farm_tier_{tier}"])
                    for tier in GPU_TIERS if f"farm_tier_{tier}" in resources}
        gpus = _count(path, f"{where}.resources.GPU", resources.get("GPU", 0))
        if gpus and not per_node:
            raise ValueError(f"{path}: node type {name!r} has {gpus} GPU(s) but no farm_tier_high|mid|low "
                             "resource: say which tier its GPUs are")
        if gpus and sum(per_node.values()) > gpus:
            raise ValueError(f"{path}: node type {name!r} advertises {sum(per_node.values())} farm_tier_* "
                             f"workers but only {gpus} GPU(s)")
        if "max_workers" in node:
            nodes = _count(path, f"{where}.max_workers", node["max_workers"])
        elif "min_workers" in node:
            nodes = _count(path, f"{where}.min_workers", node["min_workers"])
        else:
            nodes = 1
        if name == head and ("max_workers" in node or "min_workers" in node):
            nodes += 1
        for tier, n in per_node.items():
            counts[tier] = counts.get(tier, 0) + n * nodes
    return counts


# --- policies -----------------------------------------------------------------------------------


def assign_fifo(ready: list[ReadyStage], workers: list[WorkerView]) -> list[tuple[str, str]]:
    """Baseline: ready stages in submission order, dealt round-robin over the idle workers, blind to
    tier and residency. Stateless, so the rotation starts at the oldest stage's seq: successive
    calls start at different workers instead of always filling the first in the list."""
    idle = [w for w in workers if w.idle]
    stages = sorted(ready, key=lambda s: (s.seq, s.id))
    if not idle or not stages:
        return []
    start = stages[0].seq % len(idle)
    rotated = idle[start:] + idle[:start]
    return [(stage.id, worker.id) for stage, worker in zip(stages, rotated, strict=False)]


# --- simulation ---------------------------------------------------------------------------------


class StageRun(NamedTuple):
    stage_id: str
    worker: str
    start: float
    end: float


@dataclass
class SimResult:
    makespan: float
    lower_bound: float
    ratio: float  # makespan / lower_bound: 1.0 is a provably optimal schedule
    busy: dict[str, float]  # worker -> seconds busy (model loads included)
    runs: list[StageRun]
    tiers: dict[str, str] = field(default_factory=dict)  # worker -> tier ("cpu" for encoders)
    loads: int = 0  # model loads paid by GPU workers


@dataclass
class _Gpu:
    id: str
    tier: str
    models: set[str] = field(default_factory=set)
    running: str | None = None


def _cluster_tiers(cluster: Mapping[str, int]) -> list[str]:
    for tier, n in cluster.items():
        _preset_tier(tier)
        if n < 0:
            raise ValueError(f"cluster: {tier} has a negative GPU count ({n})")
    return [t for t in TIERS if cluster.get(t, 0) > 0]


def _fastest(table: Mapping[str, Mapping[str, float]], plan: Plan) -> str:
    return min(table, key=lambda t: sum(c for sid, c in table[t].items() if plan.stages[sid].gpu))


def rank_costs(plan: Plan, manifest: Manifest, tiers: list[str],
               costs: Mapping[str, TierCost] = DEFAULT_COSTS) -> dict[str, float]:
    """Stage costs at the fastest of `tiers`: what both the director and the simulator rank stages by
    (a stage's rank is the length of the longest chain from it), so they order work the same way."""
    table = cost_table(plan, manifest, tiers, costs)
    return dict(table[_fastest(table, plan)])


def simulate(plan: Plan, manifest: Manifest, cluster: Mapping[str, int], *,
             costs: Mapping[str, TierCost] = DEFAULT_COSTS, policy: Policy = assign, encoders: int = 2,
             model_keys: Mapping[str, str] | None = None) -> SimResult:
    """Discrete-event simulation of `plan` on `cluster` (GPU count per tier), cold start.

    At each event time the ready GPU stages and all GPU workers are handed to `policy` exactly as
    the director does (rank = tail length at the fastest tier's costs, seq = plan order). A worker
    without the stage's model loads it first (load_s) and keeps it: both models may stay resident.
    Clip and merge stages queue FIFO for `encoders` CPU encoder slots, outside the GPU capacity."""
    tiers = _cluster_tiers(cluster)
    if not tiers:
        raise ValueError("cluster has no GPU workers")
    if encoders < 1:
        raise ValueError("need at least one encoder")
    keys = {"keyframe": "keyframe", "video": "video", **(model_keys or {})}
    table = cost_table(plan, manifest, tiers, costs)
    tails = plan.tail_lengths(rank_costs(plan, manifest, tiers, costs))
    seq = {sid: i for i, sid in enumerate(plan.stages)}
    gpus = {f"{tier}-{i}": _Gpu(f"{tier}-{i}", tier) for tier in tiers for i in range(cluster[tier])}
    free_encoders = deque(f"encoder-{i}" for i in range(encoders))
    busy = {name: 0.0 for name in [*gpus, *free_encoders]}

    waiting = {sid: len(s.deps) for sid, s in plan.stages.items()}
    after = plan.dependents()
    gpu_ready = [sid for sid, n in waiting.items() if n == 0 and plan.stages[sid].gpu]
    cpu_ready = deque(sid for sid, n in waiting.items() if n == 0 and not plan.stages[sid].gpu)
    events: list[tuple[float, int, str, str]] = []  # (end, tie-break, stage, worker)
    runs: list[StageRun] = []
    done = 0
    loads = 0
    now = 0.0

    def start(sid: str, worker: str, seconds: float) -> None:
        heapq.heappush(events, (now + seconds, len(runs), sid, worker))
        runs.append(StageRun(sid, worker, now, now + seconds))
        busy[worker] += seconds

    while True:
        while cpu_ready and free_encoders:
            sid = cpu_ready.popleft()
            start(sid, free_encoders.popleft(), table[tiers[0]][sid])
        if gpu_ready and any(g.running is None for g in gpus.values()):
            views = [WorkerView(g.id, g.tier, frozenset(g.models), g.running is None) for g in gpus.values()]
            wanted = [ReadyStage(sid, keys[plan.stages[sid].kind], 0, tails[sid], seq[sid]) for sid in gpu_ready]
            for sid, wid in policy(wanted, views):
                gpu = gpus.get(wid)
                if sid not in gpu_ready or gpu is None or gpu.running is not None:
                    raise ValueError(f"policy assigned {sid!r} to {wid!r}, which is not a ready stage "
                                     "on an idle worker")
                model = keys[plan.stages[sid].kind]
                load = 0.0 if model in gpu.models else costs[gpu.tier].load_s
                loads += model not in gpu.models
                gpu.models.add(model)
                gpu.running = sid
                gpu_ready.remove(sid)
                start(sid, wid, load + table[gpu.tier][sid])
        if not events:
            break
        now = events[0][0]
        newly: list[str] = []
        # Everything that ends at this instant frees its worker before the next dispatch.
        while events and events[0][0] <= now + 1e-9:
            _, _, sid, worker = heapq.heappop(events)
            done += 1
            if worker in gpus:
                gpus[worker].running = None
            else:
                free_encoders.append(worker)
            for nxt in after[sid]:
                waiting[nxt] -= 1
                if waiting[nxt] == 0:
                    newly.append(nxt)
        for sid in sorted(newly, key=seq.__getitem__):
            (gpu_ready if plan.stages[sid].gpu else cpu_ready).append(sid)
        gpu_ready.sort(key=seq.__getitem__)
    if done < len(plan.stages):
        raise RuntimeError(f"simulation stalled: the policy left {len(plan.stages) - done} stages unassigned "
                           "with workers idle")
    makespan = max((r.end for r in runs), default=0.0)
    bound = lower_bound(plan, manifest, cluster, costs, encoders=encoders)
    worker_tiers = {g.id: g.tier for g in gpus.values()} | {e: "cpu" for e in busy if e not in gpus}
    return SimResult(makespan, bound, makespan / bound if bound > 0 else 1.0, busy, runs, worker_tiers, loads)


def lower_bound(plan: Plan, manifest: Manifest, cluster: Mapping[str, int],
                costs: Mapping[str, TierCost] = DEFAULT_COSTS, *, encoders: int = 2) -> float:
    """No schedule on this cluster finishes sooner (from a cold start):

        c*(s)    = min over the cluster's tiers of stage s's cost   (the "fastest tier" per stage)
        speed(T) = max over GPU stages s of c*(s) / c_T(s)          (<= 1; 1 for the fastest tier)
        LB = max( sum_GPU c*(s) / sum_T n_T speed(T),               GPU work over weighted capacity
                  critical_path(c*, clips and merge included) + min_T load_s(T),
                  sum_CPU c(s) / encoders )                         encoder pool's work

    The work term holds because a worker of tier T spends at least c*(s)/speed(T) on any stage s;
    the chain term because the chain's first stage waits for its worker's first model load."""
    tiers = _cluster_tiers(cluster)
    if not tiers:
        raise ValueError("cluster has no GPU workers")
    table = cost_table(plan, manifest, tiers, costs)
    best = {sid: min(table[t][sid] for t in tiers) for sid in plan.stages}
    gpu_ids = [sid for sid, s in plan.stages.items() if s.gpu]
    capacity = 0.0
    for tier in tiers:
        ratios = [best[sid] / table[tier][sid] for sid in gpu_ids if table[tier][sid] > 0]
        capacity += cluster[tier] * (max(ratios) if ratios else 1.0)
    work = sum(best[sid] for sid in gpu_ids)
    cpu_work = sum(c for sid, c in best.items() if not plan.stages[sid].gpu)
    chain = plan.critical_path(best) + min(costs[t].load_s for t in tiers)
    return max(work / capacity if capacity else 0.0, chain, cpu_work / max(encoders, 1))


# --- report -------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_report(result: SimResult, cluster: Mapping[str, int]) -> str:
    """Per tier: GPUs, busy %, stages run; then makespan, lower bound and their ratio."""
    ran: dict[str, int] = {}
    for run in result.runs:
        ran[run.worker] = ran.get(run.worker, 0) + 1
    rows = [("tier", "GPUs", "busy %", "stages")]
    groups = [(t, cluster.get(t, 0), [w for w, wt in result.tiers.items() if wt == t and not w.startswith("encoder")])
              for t in TIERS if cluster.get(t, 0) > 0]
    encoders = [w for w in result.tiers if w.startswith("encoder")]
    groups.append(("encoders", len(encoders), encoders))
    for name, count, workers in groups:
        capacity = count * result.makespan
        pct = 100.0 * sum(result.busy.get(w, 0.0) for w in workers) / capacity if capacity else 0.0
        rows.append((name, str(count), f"{pct:.1f}", str(sum(ran.get(w, 0) for w in workers))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in rows]
    lines += [
        "",
        f"makespan     {result.makespan:10.1f} s  ({_duration(result.makespan)})",
        f"lower bound  {result.lower_bound:10.1f} s  ({_duration(result.lower_bound)})",
        f"ratio        {result.ratio:10.3f}",
        f"model loads  {result.loads:10d}",
        "(estimated with assumed per-tier costs, cold start; see farm/simulate.py)",
    ]
    return "\n".join(lines)


def simulate_file(manifest_path: str, cluster_path: str, frames_per_call: int = 25) -> str:
    """`farm plan FILE --simulate CLUSTER`: load both files, plan, simulate, and report."""
    from farm.manifest import load
    from farm.models import resolve_model
    from farm.plan import build_plan

    manifest = load(manifest_path)
    cluster = load_cluster(cluster_path)
    plan = build_plan(manifest, frames_per_call)
    root = Path(manifest_path).parent
    keys = {}
    for role in ("keyframe", "video"):
        spec = resolve_model(role, getattr(manifest.models, role), base_dir=root,  # type: ignore[arg-type]
                             allow_pickle=manifest.models.allow_pickle)
        keys[role] = f"{spec.family}:{spec.location}"  # as actors/director.py's model_key
    result = simulate(plan, manifest, cluster, model_keys=keys)
    return format_report(result, cluster)


# --- simulated worker ---------------------------------------------------------------------------


def _pause(seconds: float, cancelled: Callable[[], bool] = lambda: False) -> None:
    """Sleep `seconds`, in short slices so a cancel lands mid-stage as it does between denoising steps."""
    end = time.perf_counter() + max(seconds, 0.0)
    while (left := end - time.perf_counter()) > 0:
        if cancelled():
            raise StageCancelled("job cancelled")
        time.sleep(min(left, 0.05))


def _model_id(spec: Any) -> tuple[str, str]:
    """(identity, display name) of a model spec: a ModelSpec, or anything else by its text."""
    if hasattr(spec, "family") and hasattr(spec, "location"):
        return f"{spec.family}:{spec.location}", str(getattr(spec, "source", spec.location))
    return str(spec), str(spec)


def _knobs_dict(knobs: Any) -> dict[str, bool]:
    if is_dataclass(knobs) and not isinstance(knobs, type):
        return {k: bool(v) for k, v in asdict(knobs).items()}
    return {k: bool(v) for k, v in dict(knobs or {}).items()}


def _seed_colour(seed: int) -> np.ndarray:
    return np.array([seed & 0xFF, (seed >> 8) & 0xFF, (seed >> 16) & 0xFF], dtype=np.int64)


def sim_image(height: int, width: int, seed: int) -> np.ndarray:
    """A flat HxWx3 uint8 image whose colour comes from the seed: deterministic and cheap."""
    return np.broadcast_to(_seed_colour(seed).astype(np.uint8), (height, width, 3)).copy()


def sim_frames(image: np.ndarray | None, count: int, height: int, width: int, seed: int) -> np.ndarray:
    """`count` frames; the first re-draws the conditioning image (as SVD does), the rest drift from
    a seed-derived colour, so each segment's content depends on its seed and its input."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    base = _seed_colour(seed)
    for i in range(count):
        frames[i] = ((base + 3 * i) % 256).astype(np.uint8)
    if count and image is not None and image.shape == (height, width, 3):
        frames[0] = image
    return frames


def _observed(steps: int, frames: int, chunk: int | None, seconds: float) -> dict[str, Any]:
    """What a real run would have counted (one batched-CFG UNet call per step), in farm.observed's shape."""
    chunk = max(1, min(chunk or frames, frames))
    decodes = [chunk] * (frames // chunk) + ([frames % chunk] if frames % chunk else [])
    per_step = seconds / steps if steps else 0.0
    return Observed(steps=steps, decode_batches=decodes, unet_batches=[2] * steps,
                    step_seconds=[per_step] * steps, unet_seconds=[per_step] * steps, seconds=seconds).as_dict()


def sim_keyframe(params: dict[str, Any], cost: TierCost, time_scale: float,
                 cancelled: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, dict[str, Any]]:
    """One keyframe stage, simulated: sleep its cost, return (image, observed)."""
    steps = int(params["num_inference_steps"])
    started = time.perf_counter()
    _pause(keyframe_seconds(steps, cost) * time_scale, cancelled)
    image = sim_image(int(params["height"]), int(params["width"]), int(params.get("seed", 0)))
    return image, _observed(steps, 1, 1, time.perf_counter() - started)


def sim_video(image: np.ndarray | None, params: dict[str, Any], cost: TierCost, time_scale: float,
              cancelled: Callable[[], bool] = lambda: False) -> tuple[np.ndarray, dict[str, Any]]:
    """One video segment, simulated: sleep its cost, return (all generated frames, observed)."""
    steps, count = int(params["num_inference_steps"]), int(params["num_frames"])
    started = time.perf_counter()
    _pause(video_seconds(steps, count, cost) * time_scale, cancelled)
    frames = sim_frames(image, count, int(params["height"]), int(params["width"]), int(params.get("seed", 0)))
    return frames, _observed(steps, count, params.get("decode_chunk_size"), time.perf_counter() - started)


def _out_of_memory(message: str) -> BaseException:
    from farm.worker import OutOfMemory  # imports torch: only when an OOM drill fires

    return OutOfMemory(message)


class SimWorker:
    """`farm.worker.StageWorker`'s interface, sleeping `cost x time_scale` instead of rendering.

    Both interfaces are here: `run(req)` over the artifact cache (what the director calls now) and
    the older `keyframe(req)` / `video(req, image)` over arrays."""

    def __init__(self, worker_id: str, tier: str = "cpu", threads: int | None = None, *,
                 costs: Mapping[str, TierCost] = DEFAULT_COSTS, time_scale: float = 1.0) -> None:
        del threads  # accepted for StageWorker's signature; nothing to thread
        tier = "cpu" if tier == "auto" else tier  # no card to read a tier from
        if tier not in costs:
            raise ValueError(f"no simulated costs for tier {tier!r}; known: {', '.join(costs)}")
        self.worker_id = worker_id
        self.tier = tier
        self.cost = costs[tier]
        self.time_scale = time_scale
        self.device = "sim"
        self.pipelines: dict[tuple[str, str | None, str | None], str] = {}  # resident key -> model name
        self.stages_run = 0
        self.faults: list[dict[str, Any]] = []
        self.cancelled: set[str] = set()

    # --- residency ---------------------------------------------------------------------------

    def pipeline(self, spec: Any, knobs: Any, lora: str | None = None, vae: str | None = None) -> dict[str, bool]:
        """Make the model resident (paying load_s x time_scale once); returns the knobs applied."""
        ident, name = _model_id(spec)
        key = (ident, lora, vae)
        if key not in self.pipelines:
            _pause(self.cost.load_s * self.time_scale)
            self.pipelines[key] = name
        return _knobs_dict(knobs)

    def loaded_models(self) -> list[str]:
        return sorted(set(self.pipelines.values()))

    # --- faults and cancellation ---------------------------------------------------------------

    def set_faults(self, faults: list[dict[str, Any]]) -> None:
        """As StageWorker.set_faults: [{"match": "video:a:*", "kind": "oom|error|crash", "times": 1}]."""
        self.faults = [dict(f) for f in faults]

    def _maybe_fault(self, stage_id: str) -> None:
        fire(self.faults, stage_id, _out_of_memory)

    def cancel(self, stage_id: str) -> None:
        self.cancelled.add(stage_id)

    # --- stages ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "id": self.worker_id,
            "node": platform.node(),
            "tier": self.tier,
            "device": self.device,
            "gpu": f"simulated {self.tier}",
            "vram_total": None,
            "vram_used": None,
            "utilization": None,
            "loaded_models": self.loaded_models(),
            "stages_run": self.stages_run,
            "pid": os.getpid(),
        }

    def _report(self, started: float, observed: dict[str, Any], applied: dict[str, bool], preset: str) -> dict:
        self.stages_run += 1
        return {"worker": self.worker_id, "tier": self.tier, "device": self.device, "preset": preset,
                "knobs": applied, "observed": observed, "wall_seconds": time.perf_counter() - started}

    def run(self, req: dict[str, Any]) -> dict[str, Any]:
        """StageWorker.run: inputs and outputs through the artifact cache, by key."""
        from farm.cache import ArtifactCache

        started = time.perf_counter()
        stage_id = req["stage"]
        cache = ArtifactCache(req["cache_dir"])
        is_cancelled = lambda: stage_id in self.cancelled  # noqa: E731
        try:
            self._maybe_fault(stage_id)
            if req["kind"] == "keyframe":
                applied = self.pipeline(req["model"], req["knobs"], req.get("lora"), req.get("vae"))
                image, observed = sim_keyframe(req["params"], self.cost, self.time_scale, is_cancelled)
                hashes = cache.put_keyframe(req["output_key"], image)
            else:
                applied = self.pipeline(req["model"], req["knobs"])
                first = cache.last_frame(req["input_key"])
                frames, observed = sim_video(first, req["params"], self.cost, self.time_scale, is_cancelled)
                hashes = cache.put_segment(req["output_key"], first, frames, req["drop"], req["kept"])
        finally:
            self.cancelled.discard(stage_id)
        return self._report(started, observed, applied, req["preset"]) | hashes
