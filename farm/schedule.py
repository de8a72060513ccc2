"""Which ready stage runs on which worker: a plain function over plain data.

The same policy drives the real director and the simulator, so what the benchmark measures is
what the farm does. `assign` plans ahead (earliest finish time with reservation, docs/scheduling.md);
`assign_greedy` is the previous policy (every idle worker gets work) and `assign_fifo` the baseline,
both kept for the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# A dispatch policy: ready stages, the workers, the work left per model -> (stage, worker) pairs.
Policy = Callable[[list["ReadyStage"], list["WorkerView"], Mapping[str, float]], list[tuple[str, str]]]

TIER_RANK = {"high": 3, "mid": 2, "low": 1, "cpu": 0}


# ASSUMED: what it costs a worker to pick up a chain's previous segment from the shared cache when
# another worker rendered it (latents and frames over the network), against reading its own.
MOVE_S = 1.0


@dataclass(frozen=True)
class WorkerView:
    id: str
    tier: str
    models: frozenset[str]  # model keys it holds resident
    idle: bool = True
    free_in: float | None = None  # a busy worker: seconds until its stage is expected to end (None: unknown)
    load_s: float = 0.0  # what loading a model it does not hold costs it
    queue_free: bool = False  # a busy worker that can be handed its next stage now (prefetch)


@dataclass(frozen=True)
class ReadyStage:
    id: str
    model: str  # the model key the stage needs
    priority: int = 0  # job priority: higher first
    rank: float = 0.0  # work left on the longest chain from this stage: longer first
    seq: int = 0  # submission order, the final tie-break (FIFO)
    avoid: frozenset[str] = frozenset()  # workers this stage failed on
    costs: tuple[tuple[str, float], ...] = ()  # (tier, seconds without a model load); empty: unknown
    prefer: str | None = None  # the worker that rendered the chain's previous segment
    kind: str = ""  # keyframe | video | decode


def order(ready: list[ReadyStage]) -> list[ReadyStage]:
    """Higher-priority jobs first; then decodes, which are short and hand a shot's frames to the
    encoders (clip, QC) and to the shot chained after it: held back behind long video stages they
    would leave the encoders a pile of work after the last GPU stage; then the stage with the longest
    chain behind it, because a storyboard finishes no sooner than its longest chain."""
    return sorted(ready, key=lambda s: (-s.priority, s.kind != "decode", -s.rank, s.seq, s.id))


def worker_score(stage: ReadyStage, worker: WorkerView) -> tuple[int, int]:
    # Model residency saves a load (seconds to minutes for real models), so it beats tier.
    return (int(stage.model in worker.models), TIER_RANK.get(worker.tier, 0))


def assign(ready: list[ReadyStage], workers: list[WorkerView],
           backlog: Mapping[str, float] | None = None, prefetch_s: float | None = None) -> list[tuple[str, str]]:
    """Earliest finish time with reservation (list scheduling, as HEFT does over a DAG).

    The most urgent stage first (priority, then the longest chain behind it): it goes to the worker
    where it would end soonest, counting the time until a busy worker frees, a model load where the
    worker lacks the model, the stage's cost on that worker's tier and moving a chain's frames to
    another worker. If that worker is idle the stage is dispatched; if it is busy the stage waits for
    it, and the worker is reserved so the stages after it plan around it. So a slow GPU stays idle
    when a faster one that frees soon would finish the stage earlier, a second model is loaded only
    when that wins, and a higher-priority job's stages claim workers before a lower one's.

    `backlog` (model -> seconds of work not yet finished, ready or not) makes it model-aware: the
    model with the most work left will be needed on every worker, so loading another model onto a
    worker that lacks it costs that worker a second load later, and is charged so. Keyframes then
    gather on a few workers while the rest wait for the video model's work.

    `prefetch_s` (the director's, never the simulator's): a busy worker whose queue is free and
    that should free within that many seconds is handed the stage reserved for it now, so the
    request and its input are there when its current stage ends and its GPU does not wait on the
    director. Called
    again at every event, so reservations are never stale. A failed stage avoids the workers it
    failed on unless it has failed on all of them."""
    everyone = {w.id for w in workers}
    start = {w.id: 0.0 if w.idle else (w.free_in if w.free_in is not None else math.inf) for w in workers}
    models = {w.id: set(w.models) for w in workers}
    dominant = max(backlog, key=lambda m: backlog[m]) if backlog else None
    planned: set[str] = set()  # workers given a stage in this call: no longer free now
    queued: set[str] = set()  # busy workers handed their next stage in this call
    out: list[tuple[str, str]] = []

    def switches(stage: ReadyStage, worker: WorkerView) -> bool:
        """Loading the stage's model here means loading the dominant model after it too."""
        held = models[worker.id]
        return stage.model not in held and dominant not in (None, stage.model) and dominant not in held

    cost = {stage.id: dict(stage.costs) for stage in ready}

    def finish(stage: ReadyStage, worker: WorkerView) -> float:
        load = 0.0 if stage.model in models[worker.id] else worker.load_s
        if switches(stage, worker):
            load += worker.load_s  # it loads the dominant model after this too
        move = MOVE_S if stage.prefer not in (None, worker.id) else 0.0
        return start[worker.id] + load + cost[stage.id].get(worker.tier, 0.0) + move

    waiting: list[tuple[ReadyStage, list[WorkerView]]] = []
    for stage in order(ready):
        allowed = workers if everyone <= stage.avoid else [w for w in workers if w.id not in stage.avoid]
        candidates = [w for w in allowed if start[w.id] < math.inf]
        if not candidates:
            continue
        best = min(candidates, key=lambda w: (finish(stage, w), w.id in planned,
                                              *(-x for x in worker_score(stage, w)), w.id))
        end = finish(stage, best)
        if best.idle and best.id not in planned:  # free now: dispatch; otherwise the stage waits for it
            out.append((stage.id, best.id))
        elif (prefetch_s is not None and best.queue_free and best.id not in queued
              and start[best.id] <= prefetch_s):
            out.append((stage.id, best.id))  # next on a worker about to free: into its queue now
            queued.add(best.id)
        else:
            waiting.append((stage, candidates))
        planned.add(best.id)
        start[best.id] = end  # reserved: the stages after this one plan around it
        models[best.id].add(stage.model)
    # While much work is left, a slower worker that would sit idle takes a waiting stage, least
    # urgent first: it ends that stage before the farm runs out of work, so no faster worker misses
    # it. Near the end (the stage would end after the work left is done) it waits instead, and so does
    # a worker that would have to load a second model for it.
    left = sum((backlog or {}).values())
    for stage, candidates in reversed(waiting):
        idle = [w for w in candidates if w.idle and w.id not in planned and not switches(stage, w)]
        if not idle:
            continue
        own = cost[stage.id]
        fastest = min(own.values(), default=0.0)
        capacity = sum(fastest / own[w.tier] if own.get(w.tier, 0.0) > 0 else 1.0 for w in workers)
        worker = min(idle, key=lambda w: (finish(stage, w), -worker_score(stage, w)[1], w.id))
        if finish(stage, worker) <= left / max(capacity, 1e-9):
            out.append((stage.id, worker.id))
            planned.add(worker.id)
            models[worker.id].add(stage.model)
    return out


def assign_greedy(ready: list[ReadyStage], workers: list[WorkerView],
                  backlog: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """The previous policy, kept for the benchmark. Greedy: every idle worker gets a ready stage if
    one exists (no GPU idles while work waits);
    the most urgent stage picks first, taking the idle worker that holds its model, then the best tier.
    A failed stage waits for a worker it has not failed on (even a busy one); only when it has failed on
    every worker in the pool may it go back to one of them."""
    idle = [w for w in workers if w.idle]
    everyone = {w.id for w in workers}
    out: list[tuple[str, str]] = []
    for stage in sorted(ready, key=lambda s: (-s.priority, -s.rank, s.seq, s.id)):
        if not idle:
            break
        candidates = [w for w in idle if w.id not in stage.avoid]
        if not candidates and everyone <= stage.avoid:
            candidates = idle
        if not candidates:
            continue
        best = max(candidates, key=lambda w: worker_score(stage, w))
        out.append((stage.id, best.id))
        idle.remove(best)
    return out


def assign_fifo(ready: list[ReadyStage], workers: list[WorkerView],
                backlog: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """Baseline for benchmarks: ready stages in submission order, dealt round-robin over the idle
    workers, blind to tier and residency. Stateless, so the rotation starts at the oldest stage's seq:
    successive calls start at different workers instead of always filling the first in the list."""
    idle = [w for w in workers if w.idle]
    stages = sorted(ready, key=lambda s: (s.seq, s.id))
    if not idle or not stages:
        return []
    start = stages[0].seq % len(idle)
    rotated = idle[start:] + idle[:start]
    return [(stage.id, worker.id) for stage, worker in zip(stages, rotated, strict=False)]
