"""The simulated farm: the job books, the worker book and the dispatch policy the director uses,
with a cost model instead of GPUs and an event clock instead of a wall clock.

What the simulator predicts is what the farm does: readiness, ranks, priorities across jobs,
retries with back-off, quarantine, the OOM ladder and cache hits all come from `farm.jobbook`,
`farm.pool` and `farm.schedule`; this module only advances time.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from farm.contract import EncodeResult, FailureKind, StageResult
from farm.jobbook import FailJob, JobBook, LedgerRow
from farm.plan import Plan
from farm.pool import PoolPolicy, WorkerBook
from farm.presets import TIERS
from farm.schedule import Policy, assign
from farm.sim.costs import (
    DEFAULT_COSTS,
    TierCost,
    cost_table,
    load_seconds,
    params_seconds,
    price,
    stage_pixels,
    stage_seconds,
)


class StageRun(NamedTuple):
    job: str
    stage_id: str
    worker: str
    start: float
    end: float
    outcome: str  # an Outcome value


@dataclass(frozen=True)
class Faults:
    """Failures to simulate, drawn per GPU attempt from a seeded generator: `error_rate` of attempts
    fail halfway through, `oom_rate` run out of memory right after their model is resident."""

    error_rate: float = 0.0
    oom_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "oom_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")


@dataclass
class SimResult:
    makespan: float
    lower_bound: float  # 0.0 where simulate(bound=False) skipped it
    ratio: float  # makespan / lower_bound: 1.0 is a provably optimal schedule
    busy: dict[str, float]  # worker -> seconds busy (model loads and failed attempts included)
    runs: list[StageRun]
    tiers: dict[str, str] = field(default_factory=dict)  # worker -> tier ("cpu" for encoders)
    loads: int = 0  # model loads paid by GPU workers
    outcomes: dict[str, int] = field(default_factory=dict)  # ledger outcomes: succeeded, failed, oom, ...
    cache_hits: int = 0
    jobs: dict[str, str] = field(default_factory=dict)  # job -> final state
    finished: dict[str, float] = field(default_factory=dict)  # job -> when it ended

    @property
    def retries(self) -> int:
        return self.outcomes.get("failed", 0) + self.outcomes.get("oom", 0) + self.outcomes.get("worker_lost", 0)


@dataclass
class _Gpu:
    id: str
    tier: str
    models: set[str] = field(default_factory=set)


def total_backlog(books: Iterable[JobBook]) -> dict[str, float]:
    """model -> GPU seconds left over every active job: what the policy's model-awareness weighs."""
    out: dict[str, float] = {}
    for book in books:
        for model, seconds in book.backlog().items():
            out[model] = out.get(model, 0.0) + seconds
    return out


def cluster_tiers(cluster: Mapping[str, int]) -> list[str]:
    for tier, n in cluster.items():
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
        if n < 0:
            raise ValueError(f"cluster: {tier} has a negative GPU count ({n})")
    return [t for t in TIERS if cluster.get(t, 0) > 0]


def simulate(jobs: JobBook | Sequence[JobBook], cluster: Mapping[str, int], *,
             costs: Mapping[str, TierCost] = DEFAULT_COSTS, policy: Policy = assign, encoders: int = 2,
             faults: Faults = Faults(), cached: Iterable[str] = (), pool_policy: PoolPolicy | None = None,
             submitted: Mapping[str, float] | None = None, bound: bool = True) -> SimResult:
    """Discrete-event simulation of `jobs` on `cluster` (GPU count per tier), cold start.

    At each event time every active book says what is ready; GPU stages go to `policy` with the
    worker book's view of the workers, exactly as the director hands them over. A worker without the
    stage's model loads it first (load_s) and keeps it. Clip and merge stages queue FIFO for
    `encoders` CPU encoder slots. `cached` holds cache keys that count as already rendered;
    `submitted` gives a job's arrival time (default 0)."""
    books = [jobs] if isinstance(jobs, JobBook) else list(jobs)
    tiers = cluster_tiers(cluster)
    if not tiers:
        raise ValueError("cluster has no GPU workers")
    if encoders < 1:
        raise ValueError("need at least one encoder")
    arrival = dict(submitted or {})
    for book in books:
        price(book, tiers, costs)
    gpus = {f"{tier}-{i}": _Gpu(f"{tier}-{i}", tier) for tier in tiers for i in range(cluster[tier])}
    pool = WorkerBook(pool_policy)
    for gpu in gpus.values():
        pool.add(gpu.id, gpu.tier)
    free_encoders = deque(f"encoder-{i}" for i in range(encoders))
    busy = {name: 0.0 for name in [*gpus, *free_encoders]}
    hits = set(cached)
    rng = random.Random(faults.seed)
    # (end, tie-break, job, stage, worker, failure kind or "" for success)
    events: list[tuple[float, int, str, str, str, str]] = []
    runs: list[StageRun] = []
    result = SimResult(0.0, 0.0, 1.0, busy, runs)
    by_id = {book.id: book for book in books}
    now = 0.0

    def start(book: JobBook, sid: str, worker: str, seconds: float, failure: str = "") -> None:
        heapq.heappush(events, (now + seconds, len(runs), book.id, sid, worker, failure))
        runs.append(StageRun(book.id, sid, worker, now, now + seconds, failure or "succeeded"))
        busy[worker] += seconds

    def settle(book: JobBook) -> None:
        for effect in book.drain():
            if isinstance(effect, LedgerRow):
                outcome = effect.row["outcome"]
                result.outcomes[outcome] = result.outcomes.get(outcome, 0) + 1
                result.cache_hits += int(effect.row["cache_hit"])

    cpu_ready: deque[tuple[JobBook, str]] = deque()
    queued_cpu: set[tuple[str, str]] = set()
    while True:
        live = [b for b in books if b.active and arrival.get(b.id, 0.0) <= now + 1e-9]
        gpu_ready: list[tuple[JobBook, str]] = []
        for book in sorted(live, key=lambda b: (-b.priority, arrival.get(b.id, 0.0), b.created)):
            hit = True
            while hit:  # a cache hit can make its dependents ready at this same instant
                hit = False
                for stage in book.ready(now):
                    if book.needs_probe(stage):
                        found = next((k for k in book.probe_keys(stage, tiers) if k in hits), None)
                        if found is not None:
                            book.on_cache_hit(stage.id, found, {"tier": tiers[0]}, now)
                            hit = True
                            continue
                    if stage.gpu:
                        gpu_ready.append((book, stage.id))
                    elif (book.id, stage.id) not in queued_cpu:
                        queued_cpu.add((book.id, stage.id))
                        cpu_ready.append((book, stage.id))
            gpu_ready = list(dict.fromkeys(gpu_ready))
            if book.active and book.complete:
                book.succeed(now)
                result.finished[book.id] = now
            settle(book)
        while cpu_ready and free_encoders:
            book, sid = cpu_ready.popleft()
            queued_cpu.discard((book.id, sid))
            if not book.active:
                continue
            encode = book.encode_request(sid)
            worker, seconds = free_encoders.popleft(), stage_seconds(book, sid, "cpu", costs)
            book.dispatched(sid, worker, "cpu", "encode", encode.output_key, now, seconds)
            start(book, sid, worker, seconds)
            settle(book)
        views = pool.views(now, load_seconds(costs))
        if gpu_ready and any(v.idle for v in views):
            wanted = {f"{book.id}/{sid}": (book, sid) for book, sid in gpu_ready}
            backlog = total_backlog(books)
            for ident, wid in policy([book.ready_stage(book.stage(sid)) for book, sid in wanted.values()], views,
                                     backlog):
                if ident not in wanted or wid not in gpus or pool.workers[wid].busy is not None:
                    raise ValueError(f"policy assigned {ident!r} to {wid!r}, which is not a ready stage "
                                     "on an idle worker")
                book, sid = wanted.pop(ident)
                gpu = gpus[wid]
                req = book.request(sid, gpu.tier)
                model = book.model_key(book.stage(sid))
                load = 0.0 if model in gpu.models else costs[gpu.tier].load_s
                result.loads += model not in gpu.models
                gpu.models.add(model)
                work = params_seconds(req.kind, req.params, costs[gpu.tier], req.model.family,
                                      stage_pixels(book, req.kind))
                failure, seconds = "", load + work
                draw = rng.random()
                if draw < faults.oom_rate:
                    failure, seconds = FailureKind.OOM.value, load
                elif draw < faults.oom_rate + faults.error_rate:
                    failure, seconds = FailureKind.ERROR.value, load + work / 2
                pool.dispatched(wid, ident, model, now + load + work)
                book.dispatched(sid, wid, gpu.tier, req.preset, req.output_key, now, seconds, req.params)
                start(book, sid, wid, seconds, failure)
                settle(book)
        wake = [events[0][0]] if events else []
        wake += [t for b in books if b.active for t in b.not_before.values() if t > now + 1e-9]
        wake += [t for t in arrival.values() if t > now + 1e-9]
        if not wake:
            break
        now = min(wake)
        # Everything that ends at this instant frees its worker before the next dispatch.
        while events and events[0][0] <= now + 1e-9:
            _, _, job, sid, worker, failure = heapq.heappop(events)
            book = by_id[job]
            if worker in gpus:
                pool.freed(worker, now)
            else:
                free_encoders.append(worker)
            if not failure:
                if worker in gpus:
                    pool.succeeded(worker)
                run = book.running[sid]
                sim = StageResult(worker, gpus[worker].tier if worker in gpus else "cpu", "sim", run.preset, {}, {},
                                  now - run.started, output_sha="sim")
                book.on_success(sid, sim if worker in gpus else EncodeResult(), now)
            else:
                kind = FailureKind(failure)
                ident = f"{job}/{sid}"
                if kind == FailureKind.ERROR:
                    pool.failed(worker, ident, now)
                decision = book.on_failure(sid, kind, f"simulated {kind.value}", now,
                                           workers=[v.id for v in pool.views(now)])
                if isinstance(decision, FailJob):
                    pool.forgive(ident, now)
                    result.finished[job] = now
            settle(book)
    stuck = [b.id for b in books if b.active]
    if stuck:
        raise RuntimeError(f"simulation stalled: jobs {', '.join(stuck)} still have stages no worker was given")
    result.jobs = {b.id: b.state.value for b in books}
    result.makespan = max((r.end for r in runs), default=0.0)
    if bound:  # a sizing, which simulates a job many times for its makespan alone, skips the bound's LP
        result.lower_bound = lower_bound(books, cluster, costs, encoders=encoders)  # later arrivals only add
        result.ratio = result.makespan / result.lower_bound if result.lower_bound > 0 else 1.0
    result.tiers = {g.id: g.tier for g in gpus.values()} | {e: "cpu" for e in busy if e not in gpus}
    return result


def lower_bound(jobs: JobBook | Sequence[JobBook], cluster: Mapping[str, int],
                costs: Mapping[str, TierCost] = DEFAULT_COSTS, *, encoders: int = 2) -> float:
    """No schedule of these jobs (all submitted at once) on this cluster finishes sooner, from a
    cold start:

        c*(s)    = min over the cluster's tiers of stage s's cost   (the "fastest tier" per stage)
        W        = the least time in which n_T workers of each tier T can do all the GPU work, each
                   stage split between tiers at will and each worker starting after its first model
                   load (`gpu_work_bound`, a small linear program)
        LB = max( W + tail,                                          GPU work over the cluster
                  critical_path(c*, clips and merge included) + min_T load_s(T),
                  sum_CPU c(s) / encoders )                         encoder pool's work
        tail = min over shots of (its CPU stages after its last GPU stage) + the merge

    The work term holds because a real schedule is one such split, and whichever GPU stage ends last
    still has its shot's clip and QC and then the merge after it; the chain term because the chain's
    first stage waits for its worker's first model load. Over several jobs the sums run over all of
    them, the chain and tail terms take the longest and the shortest job's."""
    books = [jobs] if isinstance(jobs, JobBook) else list(jobs)
    tiers = cluster_tiers(cluster)
    if not tiers:
        raise ValueError("cluster has no GPU workers")
    cpu_work = chain = 0.0
    tail = math.inf
    gpu_costs: list[tuple[float, ...]] = []  # each GPU stage's cost on each tier, in `tiers` order
    for book in books:
        plan = book.plan
        table = cost_table(book, tiers, costs)
        best = {sid: min(table[t][sid] for t in tiers) for sid in plan.stages}
        gpu_costs += [tuple(table[t][sid] for t in tiers) for sid, s in plan.stages.items() if s.gpu]
        cpu_work += sum(c for sid, c in best.items() if not plan.stages[sid].gpu)
        chain = max(chain, plan.critical_path(best) + min(costs[t].load_s for t in tiers))
        tail = min(tail, cpu_tail(plan, best))
    # A GPU that works loaded a model first (cold start); the last GPU stage ends no sooner than the
    # first load plus the longest GPU stage, so no tier's load is counted past that.
    first_end = min(costs[t].load_s for t in tiers) + max((min(row) for row in gpu_costs), default=0.0)
    ready = [min(costs[t].load_s, first_end) for t in tiers]
    work = gpu_work_bound(gpu_costs, [cluster[t] for t in tiers], ready)
    return max(work + tail if gpu_costs else 0.0, chain, cpu_work / max(encoders, 1))


def gpu_work_bound(stage_costs: Sequence[tuple[float, ...]], workers: Sequence[int],
                   ready: Sequence[float] | None = None) -> float:
    """The least time T in which `workers[i]` GPUs of tier i do all these stages, any stage split
    between tiers at will (stage_costs[s][i]: its seconds on tier i), none of tier i starting before
    ready[i] (its first model load): the linear program

        minimise T  subject to  sum_i x[k,i] = W_k,
                                sum_k x[k,i] * r[k,i] <= workers[i] * (T - ready[i]),   x >= 0

    over classes k of stages whose costs are proportional across tiers (W_k: their total cost on
    the fastest tier, r[k,i]: tier i's slowdown on them). No schedule does better, since every real
    schedule is such a split and a GPU that does any work loaded a model first; `ready[i]` must not
    exceed a time every schedule's last GPU stage ends after (the caller's bound), so a tier left idle
    cannot make it wrong. Without loads and with tiers uniformly slower than one another it is
    "work over capacity"; it is tighter where they are not (a tier fast at keyframes, slow at video)."""
    present = [i for i, n in enumerate(workers) if n > 0]  # a tier with no workers takes no work
    if not present:
        raise ValueError("cluster has no GPU workers")
    classes: dict[tuple[float, ...], float] = {}
    for full in stage_costs:
        row = [full[i] for i in present]
        fastest = min(row)
        if fastest <= 0:
            continue
        ratios = tuple(round(c / fastest, 9) for c in row)
        classes[ratios] = classes.get(ratios, 0.0) + fastest
    if not classes:
        return 0.0
    keys = list(classes)
    n = [workers[i] for i in present]
    start = [ready[i] if ready is not None else 0.0 for i in present]
    if len(keys) == 1 and not any(start):  # work over capacity, no solver needed
        return classes[keys[0]] / sum(n[i] / keys[0][i] for i in range(len(n)))
    from scipy.optimize import linprog

    nk, nt = len(keys), len(n)
    objective = [0.0] * (nk * nt) + [1.0]  # x[k, i] for each class and tier, then T
    equal = [[1.0 if k == j else 0.0 for j in range(nk) for _ in range(nt)] + [0.0] for k in range(nk)]
    capacity = [[keys[k][i] if i == col else 0.0 for k in range(nk) for col in range(nt)] + [-n[i]] for i in range(nt)]
    solved = linprog(objective, A_ub=capacity, b_ub=[-n[i] * start[i] for i in range(nt)], A_eq=equal,
                     b_eq=[classes[k] for k in keys], bounds=[(0, None)] * (nk * nt + 1), method="highs")
    if not solved.success:  # never seen; the uniform-speed relaxation without loads is always valid
        speeds = [max(1.0 / keys[k][i] for k in range(nk)) for i in range(nt)]
        return sum(classes.values()) / sum(n[i] * speeds[i] for i in range(nt))
    return float(solved.fun) * (1 - 1e-6)  # past HiGHS's ~1e-7 tolerance: never lifts a bound above the truth


def cpu_tail(plan: Plan, cost: Mapping[str, float]) -> float:
    """The least CPU work that must follow the last GPU stage to end. That stage has no GPU stage
    after it, so it is one of the GPU stages without GPU descendants (a shot's last decode); after it
    come the longest chain of stages below it (its clip and QC, then the merge): the least of those."""
    after = plan.dependents()
    tail: dict[str, float] = {}
    gpu_below: dict[str, bool] = {}
    for sid in reversed(plan.topological()):
        tail[sid] = (0.0 if plan.stages[sid].gpu else cost[sid]) + max((tail[d] for d in after[sid]), default=0.0)
        gpu_below[sid] = any(plan.stages[d].gpu or gpu_below[d] for d in after[sid])
    return min((tail[sid] for sid, s in plan.stages.items() if s.gpu and not gpu_below[sid]), default=0.0)
