"""The director: owns jobs, hands ready stages to workers, and keeps the books.

A named, detached, restartable Ray actor. Its state lives in SQLite and its stage outputs in the
content-addressed cache, so a restarted director reloads queued and running jobs and finds every
finished stage by key instead of redoing it. Decisions come from plain functions (`farm.schedule`,
`farm.pool`, `farm.presets`, `farm.effective`, `farm.cache`); this module moves keys between actors.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, TaskCancelledError

from farm import cache as keys
from farm.artifacts import load_image, write_ledger, write_lockfile
from farm.cache import ArtifactCache
from farm.effective import keyframe_params, video_params
from farm.encode import EncodeSettings
from farm.faults import StageCancelled
from farm.lockfile import build_lock
from farm.manifest import Manifest, ManifestError, inside_root, validate_data
from farm.models import ModelSpec
from farm.paths import OutputLayout
from farm.plan import Plan, ShotPlan, Stage, build_plan
from farm.pool import PoolConfig, Slot, desired_slots
from farm.presets import VideoPreset, base_preset, memory_knobs, next_lower_preset
from farm.render import encode_identity, encode_settings, merge_options, resolve_models
from farm.schedule import ReadyStage, WorkerView, assign
from farm.simulate import rank_costs
from farm.store import ACTIVE, JobRow, Store
from farm.webhook import deliver
from farm.worker import OutOfMemory

log = logging.getLogger("farm.director")
DIRECTOR_NAME = "farm-director"
HEAD = {"node:__internal_head__": 0.001}  # Ray's marker resource of the head node
NAMESPACE = "farm"


@dataclass
class Policy:
    max_attempts: int = 3  # per stage, errors only (OOM walks the ladder, lost workers requeue)
    backoff_s: float = 1.0  # retry n waits backoff_s * 2**(n-1)
    backoff_cap_s: float = 60.0
    quarantine_after: int = 3  # consecutive failures that take a worker out of rotation
    max_worker_losses: int = 5  # per stage: a stage that kills every worker it touches fails
    reconcile_s: float = 2.0


@dataclass
class WorkerSlot:
    id: str
    handle: Any
    tier: str
    slot: Slot
    models: set[str] = field(default_factory=set)
    busy: str | None = None  # "job/stage" it runs
    failures: int = 0
    freed_at: float = 0.0  # monotonic time its last stage's result arrived


@dataclass
class Flight:
    job: str
    stage: Stage
    worker: str | None
    started: float
    key: str
    detail: dict[str, Any]


@dataclass
class JobRun:
    row: JobRow
    manifest: Manifest
    root: Path
    plan: Plan
    specs: dict[str, ModelSpec]
    identity: dict[str, dict[str, Any]]
    layout: OutputLayout
    encode: EncodeSettings
    merge_options: dict[str, Any]
    tails: dict[str, float]
    seq: dict[str, int]
    done: set[str] = field(default_factory=set)
    keys: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    losses: dict[str, int] = field(default_factory=dict)
    avoid: dict[str, set[str]] = field(default_factory=dict)
    not_before: dict[str, float] = field(default_factory=dict)
    ladder: dict[str, VideoPreset] = field(default_factory=dict)
    cache_checked: set[str] = field(default_factory=set)
    shots: dict[str | None, ShotPlan] = field(default_factory=dict)
    running: dict[str, str] = field(default_factory=dict)  # stage -> worker ("encoder" for CPU stages)
    side: list[Any] = field(default_factory=list)  # keyframe PNG writes
    events: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: str = "queued"
    error: str | None = None

    def shot(self, shot_id: str | None) -> ShotPlan:
        return self.shots[shot_id]

    @property
    def use_cache(self) -> bool:
        """`--no-cache` renders every stage again (outputs are still stored for later jobs)."""
        return self.row.options.get("cache", True)

    @property
    def id(self) -> str:
        return self.row.id

    @property
    def priority(self) -> int:
        return self.row.priority


def job_key(manifest: dict[str, Any], out_dir: str, options: dict[str, Any]) -> str:
    """Identity of a local render: the same storyboard, output and options is the same job, so a
    `farm render` run again after a crash attaches to the job it started instead of a duplicate."""
    return keys.content_hash({"manifest": manifest, "out": out_dir, "options": options})


class Director:
    def __init__(self, pool: PoolConfig | None = None, store_path: str | None = None, cache_dir: str | None = None,
                 policy: Policy | None = None, backend: type | None = None,
                 backend_args: dict[str, Any] | None = None, threads: int | None = None,
                 encoder_backend: type | None = None, encoder_args: dict[str, Any] | None = None,
                 assign_fn: Callable[[list[ReadyStage], list[WorkerView]], list[tuple[str, str]]] = assign,
                 name: str = DIRECTOR_NAME) -> None:
        """`backend`/`encoder_backend` swap in classes with the same methods (the simulator's, for the
        scheduler benchmark); `assign_fn` swaps the dispatch policy (a FIFO baseline, same benchmark)."""
        self.name = name  # jobs it owns in the store carry this name
        self.pool_config = pool or PoolConfig()
        self.policy = policy or Policy()
        self.store = Store(store_path)
        self.cache = ArtifactCache(cache_dir)
        self.backend, self.backend_args, self.threads = backend, backend_args, threads
        self.lock = threading.RLock()
        self.workers: dict[str, WorkerSlot] = {}
        self.quarantined: set[str] = set()
        self.jobs: dict[str, JobRun] = {}
        self.inflight: dict[Any, Flight] = {}
        self.dispatch_latency: list[float] = []  # seconds from ready stage + free worker to dispatch
        self.ready_since: dict[tuple[str, str], float] = {}
        self._last_reconcile = 0.0
        self._faults: dict[str, list[dict[str, Any]]] = {}

        self.assign_fn = assign_fn
        self._encoder_spec = (encoder_backend, encoder_args)
        self.encoder = self._start_encoder()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="director", daemon=True)
        self._thread.start()

    def _start_encoder(self) -> Any:
        """The CPU encoder, on the head node beside the director (GPU nodes come and go)."""
        from actors.encoder import EncoderActor

        backend, args = self._encoder_spec
        cls = EncoderActor if backend is None else ray.remote(num_cpus=0, max_concurrency=2)(backend)
        if backend is None:
            args = {"yield_cpu": not ray.cluster_resources().get("GPU")}
        return cls.options(resources=HEAD).remote(str(self.cache.root), **(args or {}))

    # --- API (called from other processes) ----------------------------------------------------

    def submit(self, manifest: dict[str, Any], root: str, out_dir: str | None = None, *,
               options: dict[str, Any] | None = None, priority: int = 0, idempotency_key: str | None = None,
               webhook: str | None = None) -> dict[str, Any]:
        """Validate and queue a job. Raises ManifestError (with field paths) for bad input. Without an
        `out_dir` the outputs go to <state dir>/outputs/<job id>."""
        validated = validate_data(manifest, Path(root))
        self._specs(validated, Path(root), (options or {}).get("models"))  # refuse bad models now
        job_id = uuid.uuid4().hex[:12]
        out = out_dir or str(Path(self.store.path).parent / "outputs" / job_id)
        row, _ = self.store.add_job(job_id, validated.title, validated.model_dump(mode="json"), root, out,
                                    priority=priority, options=options or {}, idempotency_key=idempotency_key,
                                    webhook=webhook or validated.webhook, director=self.name)
        return self.status(row.id)

    def status(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            row = self.store.job(job_id)
            if row is None:
                raise KeyError(job_id)
            run = self.jobs.get(job_id)
            stages = self.store.stage_rows(job_id)
            shots = []
            plan = run.plan if run else None
            if plan is not None:
                for sp in plan.shots:
                    ids = [s.id for s in plan.stages.values() if s.shot == sp.shot.id]
                    active = [sid for sid in ids if sid in run.running]
                    finished = all(sid in run.done for sid in ids)
                    current = active[0] if active else None
                    shots.append({"id": sp.shot.id,
                                  "state": "succeeded" if finished else ("running" if active else "queued"),
                                  "stage": current, "worker": run.running.get(current) if current else None,
                                  "tier": self._tier_of(run.running.get(current)) if current else None})
                total, done = len(plan.stages), len(run.done)
            else:
                total = len(stages) or 1
                done = sum(1 for r in stages.values() if r["state"] == "succeeded")
            progress = 1.0 if row.state == "succeeded" else done / max(total, 1)
            return {"id": row.id, "title": row.title, "state": row.state, "priority": row.priority,
                    "progress": round(progress, 4), "shots": shots, "created": row.created, "started": row.started,
                    "finished": row.finished, "error": row.error, "out_dir": row.out_dir}

    def list_jobs(self) -> list[dict[str, Any]]:
        return [self.status(row.id) for row in self.store.jobs()]

    def events(self, job_id: str, since: int = 0) -> tuple[list[dict[str, Any]], str]:
        with self.lock:
            run = self.jobs.get(job_id)
            row = self.store.job(job_id)
            if row is None:
                raise KeyError(job_id)
            return (run.events[since:] if run else []), row.state

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Nothing more is dispatched; running stages stop at their next denoising step."""
        with self.lock:
            row = self.store.job(job_id)
            if row is None:
                raise KeyError(job_id)
            if row.state in ACTIVE:
                self.store.set_job_state(job_id, "cancelled", "cancelled by request")
                run = self.jobs.get(job_id)
                if run is not None:
                    run.state = "cancelled"
                    for stage_id, worker in run.running.items():
                        slot = self.workers.get(worker)
                        if slot is not None:
                            slot.handle.cancel.remote(f"{job_id}/{stage_id}")
                    self._event(run, {"type": "job_finished", "state": "cancelled"})
        return self.status(job_id)

    def requeue(self, job_id: str) -> dict[str, Any]:
        """Run a finished job again (failed, cancelled, or succeeded but its outputs are wanted anew);
        finished stages come back from the cache."""
        with self.lock:
            row = self.store.job(job_id)
            if row is None:
                raise KeyError(job_id)
            if row.state in ("failed", "cancelled", "succeeded"):
                if job_id in self.jobs and not self.jobs[job_id].running:
                    del self.jobs[job_id]
                self.store.set_job_state(job_id, "queued")
        return self.status(job_id)

    def workers_info(self) -> list[dict[str, Any]]:
        with self.lock:
            slots = list(self.workers.values())
        infos = []
        for slot in slots:
            try:
                info = ray.get(slot.handle.info.remote(), timeout=10)
            except (RayActorError, GetTimeoutError):
                info = {"id": slot.id, "tier": slot.tier}
            info.update(id=slot.id, state="busy" if slot.busy else "idle", node_id=slot.slot.node_id,
                        failures=slot.failures)
            infos.append(info)
        return infos

    def set_faults(self, worker_id: str, faults: list[dict[str, Any]]) -> None:
        """Arm faults on one worker (tests and drills); kept across the worker being recreated."""
        with self.lock:
            self._faults[worker_id] = faults
            slot = self.workers.get(worker_id)
        if slot is not None:
            ray.get(slot.handle.set_faults.remote(faults))

    def stats(self) -> dict[str, Any]:
        with self.lock:
            lat = sorted(self.dispatch_latency)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: 0.0)
        return {"dispatches": len(lat), "dispatch_latency_p50": pick(0.5), "dispatch_latency_p99": pick(0.99),
                "workers": len(self.workers), "quarantined": sorted(self.quarantined)}

    def metrics_snapshot(self) -> dict[str, Any]:
        """Plain data for /metrics (farm.metrics turns it into Prometheus text)."""
        with self.lock:
            queue: dict[str, int] = {}
            for run in self.jobs.values():
                if run.state in ACTIVE:
                    for stage in run.plan.ready(run.done, set(run.running)):
                        queue[stage.kind] = queue.get(stage.kind, 0) + 1
            workers = [{"id": w.id, "tier": w.tier, "state": "busy" if w.busy else "idle"}
                       for w in self.workers.values()]
            quarantined = sorted(self.quarantined)
        return {"jobs": self.store.job_counts(), "attempts": self.store.attempt_summary(), "queue": queue,
                "workers": workers, "quarantined": quarantined}

    def metrics_data(self) -> tuple[dict[str, Any], list[tuple[str, str, float]], list[dict[str, Any]]]:
        return self.metrics_snapshot(), self.store.attempt_seconds(), self.workers_info()

    def ping(self) -> bool:
        return True

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """The job's ledger so far: one row per stage attempt."""
        return self.store.attempts(job_id)

    def encoder_handle(self) -> Any:
        return self.encoder

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.lock:
                    self._reconcile()
                    self._admit()
                    self._dispatch()
                    self._complete_jobs()  # a job served wholly from the cache never has a stage in flight
                    pending = list(self.inflight)
                if not pending:
                    time.sleep(0.05)
                    continue
                finished, _ = ray.wait(pending, num_returns=1, timeout=0.1)
                if finished:  # collect everything that is already done in one go
                    finished, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
                with self.lock:
                    for ref in finished:
                        self._finish(ref)
                    self._complete_jobs()
            except Exception:  # the loop must survive anything one job does
                log.error("director loop error:\n%s", traceback.format_exc())
                time.sleep(0.5)

    def _reconcile(self) -> None:
        """Follow nodes joining and leaving: create missing workers, drop those on dead nodes."""
        now = time.monotonic()
        if now - self._last_reconcile < self.policy.reconcile_s and self.workers:
            return
        self._last_reconcile = now
        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n["Alive"]}
        wanted = {s.id: s for s in desired_slots(nodes, self.pool_config)}
        for wid, slot in list(self.workers.items()):
            if wid not in wanted or (slot.slot.node_id and slot.slot.node_id not in alive):
                self._drop_worker(wid, requeue=True)
        from actors.worker import start_worker

        cpu_slots = [s for s in wanted.values() if not s.gpu]
        for wid, slot in wanted.items():
            if wid in self.workers or wid in self.quarantined:
                continue
            handle = start_worker(wid, slot.tier, gpu=slot.gpu, threads=self._threads(slot, cpu_slots, nodes),
                                  node_id=slot.node_id, backend=self.backend, backend_args=self.backend_args)
            try:
                info = ray.get(handle.info.remote(), timeout=120)
            except (RayActorError, GetTimeoutError):
                continue  # the node went away while we placed it; the next round tries again
            if self._faults.get(wid):
                ray.get(handle.set_faults.remote(self._faults[wid]))
            self.workers[wid] = WorkerSlot(wid, handle, info["tier"], slot)
        self._request_resources()

    def _threads(self, slot: Slot, cpu_slots: list[Slot], nodes: list[dict[str, Any]]) -> int | None:
        """Torch threads for a worker. Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPUs, which
        leaves a CPU-only worker on one core: CPU workers split their node's cores instead."""
        if self.threads or slot.gpu:
            return self.threads
        cpus = sum(n["Resources"].get("CPU", 0) for n in nodes
                   if n["Alive"] and (slot.node_id is None or n["NodeID"] == slot.node_id))
        sharing = [s for s in cpu_slots if s.node_id == slot.node_id]
        return max(1, int(cpus) // max(1, len(sharing)))

    def _request_resources(self) -> None:
        """Tell the autoscaler about GPU work that waits (one bundle per queued GPU stage)."""
        waiting = sum(1 for run in self.jobs.values() if run.state in ACTIVE
                      for s in run.plan.stages.values() if s.gpu and s.id not in run.done and s.id not in run.running)
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"GPU": 1}] * min(waiting, 1000) if waiting else [])
        except Exception:  # local clusters without an autoscaler
            pass

    def _drop_worker(self, wid: str, *, requeue: bool) -> None:
        slot = self.workers.pop(wid, None)
        if slot is None:
            return
        for ref, flight in list(self.inflight.items()):
            if flight.worker == wid and requeue:
                self.inflight.pop(ref)
                run = self.jobs.get(flight.job)
                if run is not None:
                    run.running.pop(flight.stage.id, None)
                    self._ledger(run, flight, "worker_lost", error=f"worker {wid} left the pool")
        ray.kill(slot.handle, no_restart=True)

    def _admit(self) -> None:
        for job_id in self.store.job_ids(ACTIVE, director=self.name):
            if job_id in self.jobs:
                continue
            row = self.store.job(job_id)
            if row is None:
                continue
            try:
                self.jobs[row.id] = self._load(row)
            except (ManifestError, ValueError) as exc:
                self.store.set_job_state(row.id, "failed", str(exc))

    def _specs(self, manifest: Manifest, root: Path, models: str | None) -> dict[str, ModelSpec]:
        return resolve_models(manifest, root, models)

    def _load(self, row: JobRow) -> JobRun:
        from farm.preview import preview

        root = Path(row.root)
        manifest = validate_data(row.manifest, root)
        if row.options.get("preview"):
            manifest = preview(manifest)
        specs = self._specs(manifest, root, row.options.get("models"))
        plan = build_plan(manifest, specs["video"].frames_per_call)
        costs = rank_costs(plan, manifest, sorted({w.tier for w in self.workers.values()}) or ["mid"])
        run = JobRun(row, manifest, root, plan, specs, {r: keys.model_identity(s) for r, s in specs.items()},
                     OutputLayout(row.out_dir), encode_settings(manifest), merge_options(manifest, plan.fps),
                     plan.tail_lengths(costs), {sid: i for i, sid in enumerate(plan.stages)},
                     shots={sp.shot.id: sp for sp in plan.shots})
        size = manifest.output.size
        for sp in plan.shots:
            if sp.first_frame_from == "image":
                path = inside_root(root, sp.shot.keyframe)
                key = keys.image_key(path, size)
                if not self.cache.has(key, "npz"):
                    self.cache.put_arrays(key, last=load_image(path, size))
                run.keys[f"image:{sp.shot.id}"] = key
        self._event(run, {"type": "job_started", "stages": len(plan.stages),
                          "frames": sum(sp.frames for sp in plan.shots)})
        return run

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        now = time.time()
        ready_gpu: list[tuple[JobRun, Stage]] = []
        for run in sorted(self.jobs.values(), key=lambda r: (-r.priority, r.row.created)):
            if run.state not in ACTIVE:
                continue
            for stage in run.plan.ready(run.done, set(run.running)):
                if run.not_before.get(stage.id, 0) > now:
                    continue
                self.ready_since.setdefault((run.id, stage.id), time.monotonic())
                if stage.gpu:
                    if stage.id not in run.cache_checked:  # once per stage: keys are hashes of params
                        run.cache_checked.add(stage.id)
                        if self._try_cache_gpu(run, stage):
                            continue
                    ready_gpu.append((run, stage))
                else:
                    self._dispatch_cpu(run, stage)
        if not ready_gpu or not self.workers:
            return
        by_id = {(run.id, stage.id): (run, stage) for run, stage in ready_gpu}
        wanted = [ReadyStage(f"{run.id}/{stage.id}", self._model_key(run, stage), run.priority, run.tails[stage.id],
                             run.seq[stage.id], frozenset(run.avoid.get(stage.id, ())))
                  for run, stage in ready_gpu]
        views = [WorkerView(w.id, w.tier, frozenset(w.models), w.busy is None) for w in self.workers.values()]
        for ident, worker_id in self.assign_fn(wanted, views):
            job_id, stage_id = ident.split("/", 1)
            self._dispatch_gpu(*by_id[(job_id, stage_id)], self.workers[worker_id])

    def _model_key(self, run: JobRun, stage: Stage) -> str:
        spec = run.specs[stage.kind]
        return f"{spec.family}:{spec.location}"

    def _gpu_request(self, run: JobRun, stage: Stage, tier: str) -> tuple[dict[str, Any], str, str]:
        """(request, cache key, preset label) of a GPU stage on a worker of `tier`."""
        sp = run.shot(stage.shot)
        if stage.kind == "keyframe":
            params = keyframe_params(run.manifest, sp)
            extra = overrides(run)
            key = keys.keyframe_key(run.identity["keyframe"], params, extra)
            req = {"kind": "keyframe", "params": params, "knobs": memory_knobs(tier), **extra}
            label = tier
        else:
            assert stage.segment is not None and stage.seed is not None
            preset = run.ladder.get(stage.id) or base_preset(run.manifest.quality, sp.shot.scene, tier)
            params = video_params(run.manifest, sp, stage.segment, stage.seed, run.specs["video"].family, preset,
                                  run.plan.fps)
            input_key = run.keys[stage.deps[0]] if stage.deps else run.keys[f"image:{stage.shot}"]
            key = keys.video_key(run.identity["video"], params, input_key, stage.segment.drop, stage.segment.kept)
            req = {"kind": "video", "params": params, "knobs": preset.knobs, "input_key": input_key,
                   "drop": stage.segment.drop, "kept": stage.segment.kept}
            label = preset.label()
        req.update(stage=f"{run.id}/{stage.id}", model=run.specs[stage.kind], preset=label, output_key=key,
                   cache_dir=str(self.cache.root))
        return req, key, label

    def _try_cache_gpu(self, run: JobRun, stage: Stage) -> bool:
        if not run.use_cache:
            return False
        tiers = sorted({w.tier for w in self.workers.values()}) or ["cpu"]
        for tier in tiers:
            _, key, _ = self._gpu_request(run, stage, tier)
            if self.cache.has(key, "npz") and self.cache.has(key, "json"):
                record = self.cache.get_json(key) | {"cache_hit": True}
                self._succeed(run, stage, key, record, cache_hit=True, started=time.time(), worker="cache",
                              tier=record.get("tier"), preset=record.get("preset"))
                return True
        return False

    def _dispatch_gpu(self, run: JobRun, stage: Stage, slot: WorkerSlot) -> None:
        req, key, label = self._gpu_request(run, stage, slot.tier)
        slot.busy = req["stage"]
        slot.models.add(self._model_key(run, stage))
        ref = slot.handle.run.remote(req)
        run.running[stage.id] = slot.id
        since = self.ready_since.pop((run.id, stage.id), None)
        if since is not None:
            # The scheduler's own delay: from the later of "stage ready" and "worker free" to dispatch.
            self.dispatch_latency.append(time.monotonic() - max(since, slot.freed_at))
        self.inflight[ref] = Flight(run.id, stage, slot.id, time.time(), key,
                                    {"params": req["params"], "preset": label, "tier": slot.tier})
        self._start_running(run)
        self._event(run, {"type": "stage_started", "stage": stage.id, "kind": stage.kind, "shot": stage.shot,
                          "worker": slot.id, "tier": slot.tier})

    def _dispatch_cpu(self, run: JobRun, stage: Stage) -> None:
        encode = encode_identity(run.encode)
        if stage.kind == "clip":
            assert stage.shot is not None
            key = keys.clip_key([run.keys[d] for d in stage.deps], run.plan.fps, encode)
            dest = run.layout.shot_clip(stage.shot)
        else:
            clips = [run.keys[f"clip:{sp.shot.id}"] for sp in run.plan.shots]
            key = keys.merge_key(clips, run.merge_options, encode)
            dest = run.layout.final
        started = time.time()
        if run.use_cache and self.cache.has(key, "mp4"):
            self.cache.get_file(key, dest, "mp4")
            self._succeed(run, stage, key, {"cache_hit": True}, cache_hit=True, started=started, worker="cache",
                          tier="cpu", preset="encode")
            return
        if stage.kind == "clip":
            segments = [run.keys[d] for d in stage.deps]
            ref = self.encoder.encode_clip.remote(str(dest), run.plan.fps, run.encode, segments, key)
        else:
            clips = [str(run.layout.shot_clip(sp.shot.id)) for sp in run.plan.shots]
            ref = self.encoder.merge.remote(clips, str(dest), run.encode, run.merge_options, key)
        run.running[stage.id] = "encoder"
        self.ready_since.pop((run.id, stage.id), None)
        self.inflight[ref] = Flight(run.id, stage, None, started, key, {"preset": "encode", "tier": "cpu"})
        self._start_running(run)
        self._event(run, {"type": "stage_started", "stage": stage.id, "kind": stage.kind, "shot": stage.shot,
                          "worker": "encoder", "tier": "cpu"})

    def _start_running(self, run: JobRun) -> None:
        if run.state == "queued":
            run.state = "running"
            self.store.set_job_state(run.id, "running")

    # --- results -------------------------------------------------------------------------------

    def _finish(self, ref: Any) -> None:
        flight = self.inflight.pop(ref, None)
        if flight is None:
            return
        run = self.jobs.get(flight.job)
        slot = self.workers.get(flight.worker) if flight.worker else None
        if slot is not None:
            slot.busy = None
            slot.freed_at = time.monotonic()
        if run is not None:
            run.running.pop(flight.stage.id, None)
        try:
            result = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - sorted by kind below
            if run is not None:
                self._failed(run, flight, exc)
            return
        if slot is not None:
            slot.failures = 0
        if run is None or run.state not in ACTIVE:
            return  # a cancelled job's stage that finished anyway: its output is cached all the same
        stage = flight.stage
        if stage.gpu:
            record = {"tier": result["tier"], "worker": result["worker"], "preset": result["preset"],
                      "params": flight.detail["params"], "observed": result["observed"], "knobs": result["knobs"],
                      "device": result["device"], "input_sha": result.get("input_sha"),
                      "output_sha": result["output_sha"], "cache_key": flight.key}
            self.cache.put_json(flight.key, record)
            frames = stage.segment.kept if stage.segment else 0
            self._succeed(run, stage, flight.key, record, cache_hit=False, started=flight.started,
                          worker=result["worker"], tier=result["tier"], preset=result["preset"],
                          peak=result["observed"]["peak_vram_bytes"], frames=frames)
        else:
            record = {"frames": result} if stage.kind == "clip" else {}
            self._succeed(run, stage, flight.key, record, cache_hit=False, started=flight.started, worker="encoder",
                          tier="cpu", preset="encode")

    def _succeed(self, run: JobRun, stage: Stage, key: str, record: dict[str, Any], *, cache_hit: bool,
                 started: float, worker: str | None, tier: str | None, preset: str | None,
                 peak: int | None = None, frames: int = 0) -> None:
        run.done.add(stage.id)
        run.keys[stage.id] = key
        run.records[stage.id] = record
        self.ready_since.pop((run.id, stage.id), None)
        self.store.set_stage(run.id, stage.id, "succeeded", worker=worker, tier=tier, cache_key=key, record=record)
        end = time.time()
        self.store.add_attempt({"job": run.id, "shot": stage.shot, "stage": stage.id,
                                "attempt": run.attempts.get(stage.id, 0) + 1, "worker": worker, "tier": tier,
                                "preset": preset, "start": started, "end": end, "seconds": end - started,
                                "peak_vram_bytes": peak, "outcome": "succeeded", "cache_hit": int(cache_hit),
                                "error": None, "frames": frames})
        if stage.kind == "keyframe" and stage.shot is not None:
            params = {**record.get("params", {}), "model": run.specs["keyframe"].source}
            run.side.append(self.encoder.write_keyframe.remote(str(run.layout.keyframe(stage.shot)), params, key))
        self._event(run, {"type": "stage_finished", "stage": stage.id, "kind": stage.kind, "shot": stage.shot,
                          "worker": worker, "tier": tier, "seconds": end - started, "cache_hit": cache_hit,
                          "frames": frames if not cache_hit else (stage.segment.kept if stage.segment else 0)})

    def _failed(self, run: JobRun, flight: Flight, exc: BaseException) -> None:
        stage, cause = flight.stage, getattr(exc, "cause", None)
        if run.state not in ACTIVE or isinstance(exc, TaskCancelledError) or isinstance(cause, StageCancelled):
            self._ledger(run, flight, "cancelled", error="job cancelled")
            return
        if isinstance(exc, RayActorError) and flight.worker is None:
            self.encoder = self._start_encoder()  # the encoder died: a new one, and the stage runs again
            self._ledger(run, flight, "worker_lost", error=_short(exc))
            return
        if isinstance(exc, RayActorError) and flight.worker:
            # The worker died (process crash, node gone): requeue without spending an attempt.
            self._drop_worker(flight.worker, requeue=False)
            self._ledger(run, flight, "worker_lost", error=_short(exc))
            run.losses[stage.id] = run.losses.get(stage.id, 0) + 1
            if run.losses[stage.id] >= self.policy.max_worker_losses:
                self._fail_job(run, f"stage {stage.id} lost {run.losses[stage.id]} workers")
            return
        # By type, not by text: Ray's error text carries source lines, which may mention any exception.
        if isinstance(cause, OutOfMemory):
            self._ledger(run, flight, "oom", error=_short(exc))
            self._event(run, {"type": "stage_oom", "stage": stage.id, "preset": flight.detail["preset"]})
            if stage.kind == "video":
                sp = run.shot(stage.shot)
                current = run.ladder.get(stage.id) or base_preset(run.manifest.quality, sp.shot.scene,
                                                                    flight.detail["tier"])
                lower = next_lower_preset(current, run.manifest.quality, sp.shot.scene)
                if lower is not None:
                    run.ladder[stage.id] = lower
                    return
            self._fail_job(run, f"stage {stage.id} ran out of GPU memory on the lowest preset")
            return
        run.attempts[stage.id] = run.attempts.get(stage.id, 0) + 1
        self._ledger(run, flight, "failed", error=_short(exc))
        self._event(run, {"type": "stage_failed", "stage": stage.id, "error": _short(exc)})
        slot = self.workers.get(flight.worker) if flight.worker else None
        if slot is not None:
            slot.failures += 1
            run.avoid.setdefault(stage.id, set()).add(slot.id)
            if slot.failures >= self.policy.quarantine_after:
                self.quarantined.add(slot.id)
                self._drop_worker(slot.id, requeue=True)
        if run.attempts[stage.id] >= self.policy.max_attempts:
            self._fail_job(run, f"stage {stage.id} failed {run.attempts[stage.id]} times: {_short(exc)}")
            return
        delay = min(self.policy.backoff_s * 2 ** (run.attempts[stage.id] - 1), self.policy.backoff_cap_s)
        run.not_before[stage.id] = time.time() + delay

    def _ledger(self, run: JobRun, flight: Flight, outcome: str, error: str | None) -> None:
        end = time.time()
        self.store.add_attempt({"job": run.id, "shot": flight.stage.shot, "stage": flight.stage.id,
                                "attempt": run.attempts.get(flight.stage.id, 0) + (outcome != "failed"),
                                "worker": flight.worker or "encoder", "tier": flight.detail.get("tier"),
                                "preset": flight.detail.get("preset"), "start": flight.started, "end": end,
                                "seconds": end - flight.started, "peak_vram_bytes": None, "outcome": outcome,
                                "cache_hit": 0, "error": error})

    def _fail_job(self, run: JobRun, error: str) -> None:
        run.state, run.error = "failed", error
        self.store.set_job_state(run.id, "failed", error)
        for stage_id, worker in run.running.items():
            slot = self.workers.get(worker)
            if slot is not None:
                slot.handle.cancel.remote(f"{run.id}/{stage_id}")
        self._write_ledger(run)
        self._event(run, {"type": "job_finished", "state": "failed", "error": error})

    def _complete_jobs(self) -> None:
        for run in list(self.jobs.values()):
            if run.state in ACTIVE and len(run.done) == len(run.plan.stages):
                self._start_running(run)  # started (and finished) even if nothing had to be dispatched
                try:
                    ray.get(run.side)
                    self._write_ledger(run)
                    encode = encode_identity(run.encode) | {k: v for k, v in run.merge_options.items()
                                                            if k != "fps"}
                    lock = build_lock(run.id, run.manifest, run.plan, run.specs, run.records, encode)
                    lock["preview"] = bool(run.row.options.get("preview"))
                    write_lockfile(run.layout.lockfile, lock)
                except (RayTaskError, OSError) as exc:
                    self._fail_job(run, f"writing outputs failed: {_short(exc)}")
                    continue
                run.state = "succeeded"
                self.store.set_job_state(run.id, "succeeded")
                self._event(run, {"type": "job_finished", "state": "succeeded"})
            if run.state not in ACTIVE and not run.running and len(self.jobs) > 200:
                del self.jobs[run.id]  # keep recent finished jobs for their events, not all of them

    def _write_ledger(self, run: JobRun) -> None:
        from datetime import UTC, datetime

        rows = []
        for row in self.store.attempts(run.id):
            rows.append(row | {"start": datetime.fromtimestamp(row["start"], UTC),
                               "end": datetime.fromtimestamp(row["end"], UTC), "cache_hit": bool(row["cache_hit"])})
        write_ledger(run.layout.ledger, rows)

    def _event(self, run: JobRun, event: dict[str, Any]) -> None:
        run.events.append({"job": run.id, "time": time.time(), **event})
        if event["type"] == "job_finished" and run.row.webhook:
            payload = {"id": run.id, "title": run.row.title, "state": event["state"], "error": event.get("error"),
                       "out_dir": run.row.out_dir}
            # Its own thread: a slow or dead receiver must never stall dispatch.
            threading.Thread(target=deliver, args=(run.row.webhook, payload), daemon=True).start()

    def _tier_of(self, worker: str | None) -> str | None:
        if worker == "encoder":
            return "cpu"
        slot = self.workers.get(worker or "")
        return slot.tier if slot else None


def overrides(run: JobRun) -> dict[str, str | None]:
    """The keyframe model's LoRA and VAE overrides as absolute paths (validated inside the root)."""
    models = run.manifest.models
    return {"lora": models.lora and str(inside_root(run.root, models.lora)),
            "vae": models.vae and str(inside_root(run.root, models.vae))}


def _short(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]


DirectorActor = ray.remote(max_restarts=-1, max_concurrency=16, num_cpus=0)(Director)


def get_director(pool: PoolConfig | None = None, *, name: str = DIRECTOR_NAME, **kwargs: Any) -> Any:
    """The cluster's director, created on first use. Detached and restartable: it outlives the
    client that created it, and Ray restarts it (it reloads its state from SQLite) if it dies."""
    return DirectorActor.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                 resources=HEAD).remote(pool, name=name, **kwargs)


