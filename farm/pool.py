"""Which worker actors the cluster should have: a plain function of the alive nodes and the config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from farm.presets import GPU_TIERS, TIERS
from farm.schedule import WorkerView


@dataclass(frozen=True)
class PoolConfig:
    tier: str = "auto"  # auto: one worker per GPU (tier read from the card) or per tier-labelled slot
    workers: int | None = None  # forced-tier/CPU mode: how many workers


@dataclass(frozen=True)
class Slot:
    node_id: str | None  # None: anywhere the tier's resource is
    tier: str  # a tier name, or "auto"
    gpu: bool
    index: int

    @property
    def id(self) -> str:
        node = (self.node_id or "any")[:8]
        return f"{self.tier}-{node}-{self.index}"


def desired_slots(nodes: list[dict], config: PoolConfig) -> list[Slot]:
    """nodes: ray.nodes() entries (NodeID, Alive, Resources).

    - A forced tier (a laptop exercising the low tier's presets, `farm render --tier low`) gives
      `workers` workers placed through that tier's resource, wherever it is.
    - Otherwise each alive node gets one worker per tier slot it advertises (cluster.yaml gives a node
      type `farm_tier_mid: 1` per GPU), or one per GPU with the tier read from the card.
    - A cluster with neither gets `workers` (default 1) CPU workers.
    """
    if config.tier != "auto":
        gpu = any(n["Resources"].get("GPU", 0) for n in nodes if n["Alive"])
        return [Slot(None, config.tier, gpu, i) for i in range(config.workers or 1)]
    slots: list[Slot] = []
    for node in nodes:
        if not node["Alive"]:
            continue
        res, nid = node["Resources"], node["NodeID"]
        gpus = int(res.get("GPU", 0))
        labelled = {t: int(res.get(f"farm_tier_{t}", 0)) for t in GPU_TIERS}
        if any(labelled.values()):
            slots += [Slot(nid, t, gpus > 0, i) for t in GPU_TIERS for i in range(labelled[t])]
        elif gpus:
            slots += [Slot(nid, "auto", True, i) for i in range(gpus)]
    if not slots:
        slots = [Slot(None, "cpu", False, i) for i in range(config.workers or 1)]
    return slots


def worker_threads(slot: Slot, slots: list[Slot], nodes: list[dict], forced: int | None = None) -> int | None:
    """Torch threads for a worker. Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPUs, which
    leaves a CPU-only worker on one core: CPU workers split their node's cores instead."""
    if forced or slot.gpu:
        return forced
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes
               if n["Alive"] and (slot.node_id is None or n["NodeID"] == slot.node_id))
    sharing = [s for s in slots if not s.gpu and s.node_id == slot.node_id]
    return max(1, int(cpus) // max(1, len(sharing)))


def autoscaler_bundles(waiting_gpu_stages: int, per_tier: Mapping[str, int] | None = None,
                       cap: int = 1000) -> list[dict[str, float]]:
    """What to tell the autoscaler: first the GPUs per tier that jobs with a deadline need (their
    sizing: a GPU of that tier each), then one GPU bundle per other waiting GPU stage; capped."""
    tiered = [{"GPU": 1.0, f"farm_tier_{tier}": 1.0} for tier, n in sorted((per_tier or {}).items())
              for _ in range(max(n, 0))]
    rest = [{"GPU": 1.0}] * max(0, waiting_gpu_stages - len(tiered))
    return (tiered + rest)[:cap]


def resources_for_local(config: PoolConfig) -> dict[str, float]:
    """Resources a local Ray should advertise so a forced tier's workers can be placed."""
    if config.tier in TIERS:
        return {f"farm_tier_{config.tier}": float(config.workers or 1)}
    return {}


# --- the workers the director has, and which of them may take work ------------------------------


@dataclass(frozen=True)
class PoolPolicy:
    quarantine_after: int = 3  # failures since its last success that take a worker out of rotation
    quarantine_s: float = 300.0  # cool-down: then it gets another chance


@dataclass
class WorkerState:
    id: str
    tier: str
    models: set[str] = field(default_factory=set)  # model keys it holds resident
    busy: str | None = None  # `job/stage` it runs
    blame: list[str] = field(default_factory=list)  # stages that failed here since its last success
    quarantined_until: float | None = None
    freed_at: float = 0.0  # when its last stage ended (the dispatch-latency clock starts there)
    expected_end: float | None = None  # when the stage it runs should end, by the cost model
    queued: str | None = None  # `job/stage` handed to it ahead, to start when `busy` ends (prefetch)
    queued_s: float = 0.0  # that stage's expected seconds


class WorkerBook:
    """Quarantine and residency of the pool's workers: a pure book, like the job book.

    A worker that fails `quarantine_after` times without a success in between leaves the rotation
    for `quarantine_s`. Failures of a stage that then fails everywhere (the job fails) are the
    stage's fault, not the workers': `forgive` takes them back and lifts a quarantine they caused,
    so a poison job can never empty the farm."""

    def __init__(self, policy: PoolPolicy | None = None) -> None:
        self.policy = policy or PoolPolicy()
        self.workers: dict[str, WorkerState] = {}

    def add(self, wid: str, tier: str) -> WorkerState:
        state = self.workers[wid] = WorkerState(wid, tier)
        return state

    def remove(self, wid: str) -> WorkerState | None:
        return self.workers.pop(wid, None)

    def quarantined(self, now: float) -> list[str]:
        return sorted(w.id for w in self.workers.values() if self._out(w, now))

    def usable(self, now: float) -> list[WorkerState]:
        return [w for w in self.workers.values() if not self._out(w, now)]

    def views(self, now: float, loads: Mapping[str, float] | None = None) -> list[WorkerView]:
        """The workers that may take work, as the dispatch policy sees them: a busy one with when it
        should free (one already past its expected end is taken to need as long again as it has
        overrun: the cost model was wrong for it), `loads` what a model load costs per tier."""
        out = []
        for w in self.usable(now):
            free_in = None if w.expected_end is None else abs(w.expected_end - now)
            out.append(WorkerView(w.id, w.tier, frozenset(w.models), w.busy is None, free_in,
                                  (loads or {}).get(w.tier, 0.0), w.busy is not None and w.queued is None))
        return out

    def dispatched(self, wid: str, ident: str, model: str, expected_end: float | None = None,
                   seconds: float = 0.0) -> None:
        """`ident` runs on `wid` from now, or, handed to a busy worker, next in its queue (`seconds`
        long once it starts)."""
        worker = self.workers[wid]
        worker.models.add(model)
        if worker.busy is None:
            worker.busy, worker.expected_end = ident, expected_end
        else:
            worker.queued, worker.queued_s = ident, seconds

    def freed(self, wid: str, now: float, ident: str | None = None) -> None:
        """`ident` (default: the running stage) ended on `wid`; a stage in its queue starts now."""
        worker = self.workers.get(wid)
        if worker is None:
            return
        if ident is not None and ident == worker.queued:  # the queued one ended first (its worker was lost)
            worker.queued = None
            return
        worker.freed_at = now
        if worker.queued is not None:
            worker.busy, worker.expected_end, worker.queued = worker.queued, now + worker.queued_s, None
        else:
            worker.busy, worker.expected_end = None, None

    def succeeded(self, wid: str) -> None:
        worker = self.workers.get(wid)
        if worker is not None:
            worker.blame.clear()

    def failed(self, wid: str, ident: str, now: float) -> bool:
        """A stage failed on `wid` with an error; True if that takes the worker out of rotation."""
        worker = self.workers.get(wid)
        if worker is None:
            return False
        worker.blame.append(ident)
        if len(worker.blame) >= self.policy.quarantine_after and not self._out(worker, now):
            worker.quarantined_until = now + self.policy.quarantine_s
            return True
        return False

    def forgive(self, ident: str, now: float) -> list[str]:
        """The stage `ident` failed everywhere: its failures blame no worker. Returns the workers
        whose quarantine this lifts."""
        lifted = []
        for worker in self.workers.values():
            worker.blame = [b for b in worker.blame if b != ident]
            if self._out(worker, now) and len(worker.blame) < self.policy.quarantine_after:
                worker.quarantined_until = None
                lifted.append(worker.id)
        return lifted

    def _out(self, worker: WorkerState, now: float) -> bool:
        until = worker.quarantined_until
        if until is not None and now >= until:  # cool-down over: back in rotation, with a clean slate
            worker.quarantined_until = None
            worker.blame.clear()
        return worker.quarantined_until is not None
