"""Which ready stage runs on which idle worker: a plain function over plain data.

The same policy drives the real director and the simulator, so what the benchmark measures is
what the farm does.
"""

from __future__ import annotations

from dataclasses import dataclass

TIER_RANK = {"high": 3, "mid": 2, "low": 1, "cpu": 0}


@dataclass(frozen=True)
class WorkerView:
    id: str
    tier: str
    models: frozenset[str]  # model keys it holds resident
    idle: bool = True


@dataclass(frozen=True)
class ReadyStage:
    id: str
    model: str  # the model key the stage needs
    priority: int = 0  # job priority: higher first
    rank: float = 0.0  # work left on the longest chain from this stage: longer first
    seq: int = 0  # submission order, the final tie-break (FIFO)
    avoid: frozenset[str] = frozenset()  # workers this stage failed on


def order(ready: list[ReadyStage]) -> list[ReadyStage]:
    """Higher-priority jobs first; within a job the stage with the longest chain behind it first,
    because a chained storyboard finishes no sooner than its longest chain."""
    return sorted(ready, key=lambda s: (-s.priority, -s.rank, s.seq, s.id))


def worker_score(stage: ReadyStage, worker: WorkerView) -> tuple[int, int]:
    # Model residency saves a load (seconds to minutes for real models), so it beats tier.
    return (int(stage.model in worker.models), TIER_RANK.get(worker.tier, 0))


def assign(ready: list[ReadyStage], workers: list[WorkerView]) -> list[tuple[str, str]]:
    """Greedy: every idle worker gets a ready stage if one exists (no GPU idles while work waits);
    the most urgent stage picks first, taking the idle worker that holds its model, then the best tier.
    A failed stage waits for a worker it has not failed on (even a busy one); only when it has failed on
    every worker in the pool may it go back to one of them."""
    idle = [w for w in workers if w.idle]
    everyone = {w.id for w in workers}
    out: list[tuple[str, str]] = []
    for stage in order(ready):
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


def assign_fifo(ready: list[ReadyStage], workers: list[WorkerView]) -> list[tuple[str, str]]:
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
