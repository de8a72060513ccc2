"""The director's actors: one GPU worker per slot the cluster offers, and the CPU encoder.

Which slots there should be is `farm.pool.desired_slots`, and which workers may take work is the
worker book's (`farm.pool.WorkerBook`); this module starts and stops the actors to match, and is the
only place that holds their handles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, TaskCancelledError

from actors.remote import actor_class
from farm.config import FarmConfig
from farm.contract import FailureKind
from farm.faults import OutOfMemory, StageCancelled
from farm.models import ModelSpec, missing
from farm.paths import disk_trouble
from farm.pool import PoolConfig, WorkerBook, autoscaler_bundles, desired_slots, worker_threads
from farm.schemas import WorkerInfo

HEAD = {"node:__internal_head__": 0.001}  # Ray's marker resource of the head node
# A worker answers which models it lacks in milliseconds (its actor runs three calls at once, a stage
# among them). One that does not answer within MODEL_CHECK_S is hung or swamped: submits ask the next
# worker, and do not ask it again for SILENT_S (the API sends one director call at a time, and every
# submit behind a question waits for its answer).
MODEL_CHECK_S = 10.0
SILENT_S = 60.0


def failure_kind(exc: BaseException, *, job_active: bool) -> FailureKind:
    """By type, not by text: Ray's error text carries source lines, which may mention any exception."""
    cause = getattr(exc, "cause", None)
    if not job_active or isinstance(exc, TaskCancelledError) or isinstance(cause, StageCancelled):
        return FailureKind.CANCELLED
    if isinstance(exc, RayActorError):
        return FailureKind.LOST
    if _disk(exc):
        return FailureKind.DISK
    return FailureKind.OOM if isinstance(cause, OutOfMemory) else FailureKind.ERROR


def _disk(exc: BaseException) -> str | None:
    """A full or read-only disk under a stage's error (Ray keeps the worker's exception in `cause`)."""
    cause = getattr(exc, "cause", None)
    return disk_trouble(cause if isinstance(cause, BaseException) else exc)


def short(exc: BaseException) -> str:
    trouble = _disk(exc)
    if trouble:
        return trouble
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]


class Fleet:
    def __init__(self, pool: PoolConfig, book: WorkerBook, config: FarmConfig, cache_root: str, *,
                 reconcile_s: float, threads: int | None = None, backend: type | None = None,
                 backend_args: dict[str, Any] | None = None, encoder_backend: type | None = None,
                 encoder_args: dict[str, Any] | None = None) -> None:
        """`backend`/`encoder_backend` swap in classes with the same methods (the simulator's, for the
        scheduler benchmark)."""
        self.pool, self.book, self.config, self.cache_root = pool, book, config, cache_root
        self.reconcile_s, self.threads = reconcile_s, threads
        self.backend, self.backend_args = backend, backend_args
        self.encoder_spec = (encoder_backend, encoder_args)
        self.handles: dict[str, Any] = {}
        self.node_of: dict[str, str | None] = {}  # worker -> the node it was placed on
        self.faults: dict[str, list[dict[str, Any]]] = {}  # armed per worker id, kept across restarts
        self.silent_until: dict[str, float] = {}  # workers that did not answer a model check, not asked till
        self.last_reconcile = 0.0
        self.encoder = self.start_encoder()

    def start_encoder(self) -> Any:
        """The CPU encoder, on the head node beside the director (GPU nodes come and go)."""
        from actors.encoder import EncoderActor

        backend, args = self.encoder_spec
        cls = EncoderActor if backend is None else actor_class(backend, num_cpus=0, max_concurrency=2)
        if backend is None:
            args = {"yield_cpu": not ray.cluster_resources().get("GPU")}
        self.encoder = cls.options(resources=HEAD).remote(self.cache_root, **(args or {}))
        return self.encoder

    def reconcile(self, gpu_demand: Callable[[], int],
                  tier_demand: Callable[[], Mapping[str, int]] | None = None) -> None:
        """Follow nodes joining and leaving: create missing workers, drop those on dead nodes, and tell
        the autoscaler about `gpu_demand()` waiting GPU stages and the GPUs per tier deadlines need.
        The demands are functions: counting them walks every queued job, so only a round that is due
        (every `reconcile_s`) pays for it, not every pass of the director's loop."""
        from actors.worker import start_worker

        now = time.monotonic()
        if now - self.last_reconcile < self.reconcile_s and self.handles:
            return
        self.last_reconcile = now
        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n["Alive"]}
        wanted = {s.id: s for s in desired_slots(nodes, self.pool)}
        for wid in list(self.handles):
            node = self.node_of.get(wid)
            if wid not in wanted or (node and node not in alive):
                self.drop(wid)
        for wid, slot in wanted.items():
            if wid in self.handles:
                continue
            threads = worker_threads(slot, list(wanted.values()), nodes, self.threads)
            handle = start_worker(wid, slot.tier, gpu=slot.gpu, threads=threads, node_id=slot.node_id,
                                  backend=self.backend, backend_args=self.backend_args, config=self.config)
            try:
                info = ray.get(handle.info.remote(), timeout=120)
                if self.faults.get(wid):
                    ray.get(handle.set_faults.remote(self.faults[wid]))
            except (RayActorError, GetTimeoutError):
                continue  # the node went away while we placed it; the next round tries again
            self.book.add(wid, info["tier"])
            self.handles[wid], self.node_of[wid] = handle, slot.node_id
        bundles = autoscaler_bundles(gpu_demand(), tier_demand() if tier_demand else None)
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
        except Exception:  # noqa: BLE001 - local clusters have no autoscaler
            pass

    def drop(self, wid: str) -> None:
        """A worker that died or whose node left; a stage it ran comes back as a lost-worker failure."""
        self.book.remove(wid)
        self.silent_until.pop(wid, None)
        handle = self.handles.pop(wid, None)
        if handle is not None:
            ray.kill(handle, no_restart=True)

    def run(self, wid: str, request: Any) -> Any:
        return self.handles[wid].run.remote(request)

    def cancel(self, wid: str, ident: str) -> None:
        handle = self.handles.get(wid)
        if handle is not None:
            handle.cancel.remote(ident)

    def set_faults(self, wid: str, faults: list[dict[str, Any]]) -> None:
        """Arm faults on one worker (tests and drills); kept across the worker being recreated."""
        self.faults[wid] = faults
        handle = self.handles.get(wid)
        if handle is not None:
            ray.get(handle.set_faults.remote(faults))

    def missing_models(self, specs: list[ModelSpec]) -> dict[str, str]:
        """Ask a worker which of `specs` it could not load (models are checked where they will load);
        with no worker yet, or none answering, this node answers."""
        for wid, handle in list(self.handles.items()):
            if self.silent_until.get(wid, 0.0) > time.monotonic():
                continue
            try:
                found: dict[str, str] = ray.get(handle.missing_models.remote(specs), timeout=MODEL_CHECK_S)
                return found
            except GetTimeoutError:
                self.silent_until[wid] = time.monotonic() + SILENT_S
            except RayActorError:
                continue
        return {s.role: why for s in specs if (why := missing(s, self.config.models.allow_download)) is not None}

    def infos(self, now: float) -> list[dict[str, Any]]:
        """Every worker as /v1/workers shows it: what it reports itself, and the book's view of it."""
        quarantined = set(self.book.quarantined(now))
        out = []
        for wid, handle in list(self.handles.items()):
            worker = self.book.workers.get(wid)
            if worker is None:
                continue
            try:
                info = ray.get(handle.info.remote(), timeout=10)
                state = "quarantined" if wid in quarantined else ("busy" if worker.busy else "idle")
            except (RayActorError, GetTimeoutError):
                info, state = {}, "unreachable"
            info |= {"id": wid, "tier": worker.tier, "state": state, "failures": len(worker.blame),
                     "node_id": self.node_of.get(wid), "stage": worker.busy}
            out.append(WorkerInfo(**info).model_dump(mode="json"))
        return out
