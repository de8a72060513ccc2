"""The director: a named, detached, restartable Ray actor that moves data between the store, the job
books, the dispatch policy and the workers.

Every decision is made in plain code over plain data: what is ready, what a worker is sent and what a
result means (`farm.jobbook`), which worker runs what (`farm.schedule`), quarantine
(`farm.pool.WorkerBook`), which workers the cluster should have (`farm.pool`, through
`actors.fleet`). This loop admits jobs, asks, dispatches, waits, hands results back and carries out
the books' effects. Its state lives in SQLite and the content-addressed cache, so a restarted
director reloads its jobs and finds every finished stage by key.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray

from actors.effects import Effects
from actors.fleet import HEAD, Fleet, failure_kind, short
from actors.remote import actor_class, untracked
from farm import jobbook as jb
from farm.artifacts import from_cache, ingest_images, write_outputs
from farm.cache import ArtifactCache
from farm.config import FarmConfig, PolicyConfig, current, install
from farm.contract import ACTIVE_STATES, FailureKind, JobState, StageResult, Submission
from farm.jobbook import JobBook
from farm.jobsetup import JobSetup, adapter_errors, setup_job
from farm.manifest import FieldError, ManifestError
from farm.metrics import snapshot
from farm.models import ModelSpec
from farm.paths import folder_room, output_problem
from farm.plan import Stage
from farm.pool import PoolConfig, PoolPolicy, WorkerBook
from farm.schedule import Policy, assign
from farm.schemas import JobView, KeptViews, job_status
from farm.sim.costs import TierCost, load_seconds, price, stage_seconds
from farm.sim.engine import total_backlog
from farm.store import NewJob, Store

log = logging.getLogger("farm.director")
DIRECTOR_NAME = "farm-director"
NAMESPACE = "farm"
ENCODER = "encoder"  # what CPU stages run on, in the ledger and events
# A worker's next stage goes to it this many seconds (by the cost model) before its current one should
# end: long enough to cover the director's loop (<= 0.1 s wait) and the request's transfer, short enough
# that little is committed early (a prefetched stage is no longer re-planned).
PREFETCH_S = 1.0
# How often the loop asks the store whether another process wrote to it, and if one did, looks there
# for queued jobs it was not told about (another process's insert or requeue); what this director
# queues itself it admits on the next pass. A full look, written or not, every FULL_RESCAN_S, for what
# only a write of its own that failed could hide (a queue of thousands costs a look milliseconds).
ADMIT_RESCAN_S = 1.0
FULL_RESCAN_S = 30.0
# How often the loop looks at every job for one to publish or forget, not only those whose books
# changed since it last looked (every change to a book is carried out through Effects, which notes it).
FINISH_SWEEP_S = 0.5
# How many finished jobs keep their status's shots and their events in the director (~25-40 KiB each
# for a few shots, mostly events); older ones answer from the store.
KEEP_FINISHED = 200


class Director:
    def __init__(self, pool: PoolConfig | None = None, store_path: str | None = None, cache_dir: str | None = None,
                 policy: PolicyConfig | None = None, threads: int | None = None, assign_fn: Policy = assign,
                 name: str = DIRECTOR_NAME, config: FarmConfig | None = None,
                 costs: Mapping[str, TierCost] | None = None, prefetch_s: float | None = PREFETCH_S,
                 **backends: Any) -> None:
        """`assign_fn` swaps the dispatch policy, `backends` the worker and encoder classes (a FIFO
        baseline and simulated workers, for bench/scheduler.py); `costs` the cost model it plans with
        (default: the config's calibrated file, else the assumed figures); `prefetch_s` how soon before
        a busy worker frees its next stage is sent to it (None: never; a policy without prefetch)."""
        self.config = install(config or current())
        self.name = name  # jobs it owns in the store carry this name
        self.policy = policy or self.config.policy
        self.store = Store(store_path or self.config.store_path)
        self.outputs = Path(self.store.path).parent / "outputs"  # a job's own, unless its submit names one
        self.cache = ArtifactCache(cache_dir or self.config.cache_path)
        self.assign_fn = assign_fn
        self.costs = dict(costs) if costs is not None else self.config.cost_model()
        self.prefetch_s = prefetch_s
        self.prefetched = 0  # stages sent to a worker ahead of its current one ending
        self.deadline_demand: dict[str, dict[str, int]] = {}  # job -> GPUs per tier its deadline needs
        self.sized_at: dict[str, float] = {}  # job -> when its last sizing began
        self.sizing: set[str] = set()  # jobs being sized now
        self.sizings = 0  # sizings done
        self.sent_ahead: set[str] = set()  # those still in flight
        self.lock = threading.RLock()
        self.pool = WorkerBook(PoolPolicy(self.policy.quarantine_after, self.policy.quarantine_s))
        self.fleet = Fleet(pool or PoolConfig(), self.pool, self.config, str(self.cache.root),
                           reconcile_s=self.policy.reconcile_s, threads=threads, **backends)
        self.books: dict[str, JobBook] = {}  # active jobs, and finished ones with stages still running
        # The latest KEEP_FINISHED finished jobs: what their status shows of their book (their events
        # are kept in `streams` as long); older ones answer from the store alone.
        self.kept = KeptViews(KEEP_FINISHED)
        self.effects = Effects(self.store, self.cache, self.fleet, self.config.cache_cap_bytes)
        self.streams = self.effects.streams  # job -> its events so far
        self.inflight: dict[Any, tuple[str, str, str]] = {}  # ref -> (job, stage, worker or ENCODER)
        # seconds from ready stage + free worker to dispatch; the latest only (a farm runs for months)
        self.dispatch_latency: deque[float] = deque(maxlen=20_000)
        # A worker's own gap between stages (farm.observed.IdleClock), kept where work was waiting for it
        # when it freed: the time its GPU waited on the farm. And what reading its inputs took.
        self.gap_watch: set[str] = set()
        self.gaps: dict[str, deque[float]] = {}
        self.input_waits: deque[float] = deque(maxlen=20_000)
        self.last_end: dict[str, float] = {}  # worker -> when the ledger says its last stage ended
        self.ready_since: dict[str, float] = {}
        self.publishing: dict[str, Any] = {}  # job -> the encoder's publish of its last outputs
        self.held = False  # drained for maintenance: jobs are accepted and queued, nothing new starts
        # Jobs queued through this director since its loop last admitted: admitting them costs a pass what
        # they number, not what the whole queue does (which a rescan still walks for jobs another process
        # queued in the store: when one wrote there, and every FULL_RESCAN_S).
        self.inbox: deque[tuple[str, JobSetup]] = deque()  # with the setup its submit made
        self.rescan_at = self.full_rescan_at = 0.0
        self.sweep_at = 0.0
        self.incarnation = uuid.uuid4().hex[:8]  # event ids are per incarnation (event_page)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="director", daemon=True)
        self._thread.start()

    # --- API (called from other processes) ----------------------------------------------------

    def submit(self, manifest: dict[str, Any], root: str, out_dir: str | None = None, *,
               options: dict[str, Any] | None = None, priority: int = 0, idempotency_key: str | None = None,
               webhook: str | None = None) -> dict[str, Any]:
        """Validate and queue a job. Raises ManifestError (with field paths) or ModelError for bad input.
        Without an `out_dir` the outputs go to <state dir>/outputs/<job id>."""
        got = self.submit_many([Submission(manifest, root, out_dir, options or {}, priority, idempotency_key,
                                           webhook)])[0]
        if isinstance(got, Exception):
            raise got
        return got

    @untracked
    def submit_many(self, submissions: list[Submission]) -> list[dict[str, Any] | Exception]:
        """`submit` for the storyboards the API received together: one call and one store transaction
        for all (a commit's fsync is most of a submit's cost here). Each answer in order: the job's
        status, or what `submit` would have raised for it alone."""
        out: list[dict[str, Any] | Exception] = [ValueError("not queued")] * len(submissions)
        ready: list[tuple[int, JobSetup, NewJob]] = []
        rooms: dict[Path, tuple[str | None, int]] = {}  # one look per output folder in the batch
        absent: dict[tuple[ModelSpec, ...], dict[str, str]] = {}  # and one question per set of models
        for i, sub in enumerate(submissions):
            try:
                setup = self._setup(sub, rooms, absent)
                job_id = uuid.uuid4().hex[:12]
                out_dir = sub.out_dir or str(self.outputs / job_id)
                ready.append((i, setup, NewJob(job_id, setup.manifest.title, sub.manifest, sub.root, out_dir,
                                               sub.priority, dict(sub.options), sub.idempotency_key,
                                               sub.webhook or setup.manifest.webhook, self.name)))
            except Exception as exc:  # noqa: BLE001 - refused alone, as a submit of its own would be
                out[i] = exc
        added = self.store.add_jobs([job for _, _, job in ready])
        for (i, setup, _), got in zip(ready, added, strict=True):
            if isinstance(got, Exception):
                out[i] = got
                continue
            row, created = got
            if created:
                self.inbox.append((row.id, setup))
            try:  # queued now, whatever its answer: a failure here is this submission's alone
                # A new job has no book yet: its status needs no lock (the dispatch loop holds it as it works).
                status = job_status(row, None, []).model_dump(mode="json") if created else self.status(row.id)
                status["warnings"] = [{"loc": list(w.loc), "msg": w.msg} for w in setup.warnings]  # before its book
                out[i] = status
            except Exception as exc:  # noqa: BLE001
                out[i] = exc
        return out

    def _setup(self, sub: Submission, rooms: dict[Path, tuple[str | None, int]],
               absent: dict[tuple[ModelSpec, ...], dict[str, str]]) -> JobSetup:
        """A submission validated and planned, or the ManifestError / ModelError that refuses it.
        `rooms`: the output folders already looked at, and what was found; `absent`: the same for the
        models a worker was asked about (a worker that does not answer costs its timeout once a batch,
        not once a submission). Both filled in here."""
        setup = setup_job(sub.validated or sub.manifest, Path(sub.root), dict(sub.options))
        if not setup.tiny:
            specs = tuple(setup.specs.values())
            if specs not in absent:
                absent[specs] = self.fleet.missing_models(list(specs))
            if absent[specs]:
                raise ManifestError([FieldError(("models", role), why) for role, why in sorted(absent[specs].items())])
            unready = adapter_errors(setup.manifest, setup.specs["keyframe"])  # named by path in the farm config
            if unready:
                raise ManifestError(unready)
        # Not after the GPU work. The folder of all outputs stands for a job's own, so an idempotent
        # replay (which returns the first job) leaves no empty folder behind.
        folder = Path(sub.out_dir) if sub.out_dir else self.outputs
        if folder not in rooms:
            rooms[folder] = folder_room(folder)
        problem = output_problem(folder, setup.output_bytes(), rooms[folder])
        if problem:
            raise ManifestError([FieldError(("output",), problem)])
        return setup

    @untracked
    def status(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            row = self._row(job_id)
            book = self.books.get(job_id)
            view = JobView.of(book) if book is not None else self.kept.get(job_id)
            stored = None if view else [r["state"] for r in self.store.stage_rows(job_id).values()]
            return job_status(row, view, stored).model_dump(mode="json")

    @untracked
    def list_jobs(self) -> list[dict[str, Any]]:
        return [self.status(row.id) for row in self.store.jobs()]

    def events(self, job_id: str, since: int = 0) -> tuple[list[dict[str, Any]], str]:
        with self.lock:
            return self.streams.get(job_id, [])[since:], self._row(job_id).state

    @untracked
    def event_page(self, job_id: str, since: int = 0) -> tuple[list[dict[str, Any]], str, str]:
        """`events`, and this director's incarnation: a restarted director numbers its (new) event
        lists from 0 again, so an event id only means something with the incarnation that gave it."""
        events, state = self.events(job_id, since)
        return events, state, self.incarnation

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Nothing more is dispatched; running stages stop at their next denoising step."""
        with self.lock:
            row, book = self._row(job_id), self.books.get(job_id)
            self.publishing.pop(job_id, None)  # a requeue publishes anew, not from this outcome
            if book is not None:
                book.cancel(time.time())
                self.effects.apply(book)
            elif JobState(row.state) in ACTIVE_STATES:
                if row.director == self.name:
                    self.effects.finish_unbooked(job_id, JobState.CANCELLED, "cancelled by request")
                else:  # another director's: its webhook is for it to send
                    self.store.set_job_state(job_id, JobState.CANCELLED, "cancelled by request")
        return self.status(job_id)

    def set_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        """A job's new priority: its queued stages go before (or after) other jobs' from the next
        dispatch on; running stages are not preempted."""
        with self.lock:
            self._row(job_id)
            self.store.set_priority(job_id, priority)
            book = self.books.get(job_id)
            if book is not None:
                book.priority = priority
        return self.status(job_id)

    def requeue(self, job_id: str) -> dict[str, Any]:
        """Run a finished job again (failed, cancelled, or succeeded but its outputs are wanted anew);
        finished stages come back from the cache."""
        with self.lock:
            row, book = self._row(job_id), self.books.get(job_id)
            if JobState(row.state) not in ACTIVE_STATES:
                self.publishing.pop(job_id, None)
                if book is not None:
                    self.streams[job_id] = []
                    book.requeue()
                    book.announce(time.time())
                    self.effects.apply(book)
                else:  # retired: planned again from its stored manifest, as after a restart, here and now
                    self.store.set_job_state(job_id, JobState.QUEUED)
                    self._open(self._row(job_id))
        return self.status(job_id)

    def _size_deadlines(self) -> None:
        """Size the cluster for each job with a deadline, and again every `policy.resize_s` on the work
        it has left against the time it has left: the GPUs per tier, within `autoscale_max`, that the
        plan needs to finish in time (a job past its deadline asks for as many as still shorten it). In
        the background: a sizing simulates the job many times."""
        if not self.config.autoscale_max:
            return
        now = time.time()
        for job_id, book in self.books.items():
            deadline_s = book.setup.manifest.deadline_s
            if deadline_s is None or not book.active or job_id in self.sizing:
                continue
            if now - self.sized_at.get(job_id, -math.inf) < self.policy.resize_s:
                continue
            self.sized_at[job_id] = now
            self.sizing.add(job_id)
            threading.Thread(target=self._size, args=(job_id, book.rest(), book.created + deadline_s - now),
                             name=f"size-{job_id}", daemon=True).start()

    def _size(self, job_id: str, rest: JobBook, left_s: float) -> None:
        from farm.sim.sizing import size_for_deadline

        sized = None
        try:
            sized = size_for_deadline(rest.rest, self.config.autoscale_max, left_s, self.config.prices, self.costs)
        except Exception:  # noqa: BLE001 - sizing is advice; the job runs either way
            log.error("sizing job %s for its deadline failed:\n%s", job_id, traceback.format_exc())
        with self.lock:
            self.sizing.discard(job_id)
            if sized is not None and job_id in self.books and self.books[job_id].active:
                self.deadline_demand[job_id] = sized.cluster
                self.sizings += 1

    def tier_demand(self) -> dict[str, int]:
        """GPUs per tier the active jobs' deadlines need (what the autoscaler is asked for by tier)."""
        with self.lock:
            for job_id in [j for j in self.sized_at if j not in self.books or not self.books[j].active]:
                self.deadline_demand.pop(job_id, None)
                del self.sized_at[job_id]
            out: dict[str, int] = {}
            for cluster in self.deadline_demand.values():
                for tier, n in cluster.items():
                    out[tier] = out.get(tier, 0) + n
            return out

    def hold(self, held: bool) -> bool:
        """Drain the farm (before maintenance, or while a fuzzer submits thousands of jobs): what runs
        finishes, submits still queue (and are admitted: their status lists their shots), nothing new
        starts until released. Returns the old setting."""
        with self.lock:
            before, self.held = self.held, held
        return before

    @untracked
    def workers_info(self) -> list[dict[str, Any]]:
        return self.fleet.infos(time.time())

    def set_faults(self, worker_id: str, faults: list[dict[str, Any]]) -> None:
        self.fleet.set_faults(worker_id, faults)

    def stats(self) -> dict[str, Any]:
        def quantile(xs: list[float], q: float, empty: float | None = None) -> float | None:
            return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else empty

        with self.lock:
            lat = sorted(self.dispatch_latency)
            quarantined = self.pool.quarantined(time.time())
        gaps = sorted(g for per in self.gaps.values() for g in per)
        return {"dispatches": len(lat), "dispatch_latency_p50": quantile(lat, 0.5, 0.0),
                "dispatch_latency_p99": quantile(lat, 0.99, 0.0),
                "gap_p50": quantile(gaps, 0.5), "gap_p99": quantile(gaps, 0.99),
                "gap_worker_p50": {w: quantile(sorted(g), 0.5) for w, g in self.gaps.items()},
                "input_p50": quantile(sorted(self.input_waits), 0.5), "prefetched": self.prefetched,
                "sizings": self.sizings, "workers": len(self.pool.workers), "quarantined": quarantined}

    @untracked
    def metrics_data(self) -> tuple[dict[str, Any], list[tuple[str, str, float]], list[dict[str, Any]]]:
        """Plain data for /metrics (farm.metrics turns it into Prometheus text)."""
        with self.lock:
            data = snapshot(list(self.books.values()), self.pool, self.store, time.time())
        data["webhooks"] = dict(self.effects.webhooks)
        data["cache_evicted"] = dict(self.effects.evicted)
        return data, self.store.attempt_seconds(), self.workers_info()

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        """Its process, for a soak test's memory samples."""
        return os.getpid()

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """The job's ledger so far: one row per stage attempt."""
        return self.store.attempts(job_id)

    def encoder_handle(self) -> Any:
        return self.fleet.encoder

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def paths(self) -> tuple[str, str]:
        """The store and cache this director works on (a local render checks it is its config's)."""
        return str(self.store.path), str(self.cache.root)

    def retire(self) -> bool:
        """Stop, releasing its workers and encoder, if no job is active (the caller then kills the
        actor); False, changing nothing, while one is."""
        with self.lock:
            if any(book.active for book in self.books.values()):
                return False
            self._stop.set()
            for wid in list(self.fleet.handles):
                self.fleet.drop(wid)
            if self.fleet.encoder is not None:
                ray.kill(self.fleet.encoder, no_restart=True)
        return True

    def _row(self, job_id: str) -> Any:
        row = self.store.job(job_id)
        if row is None:
            raise KeyError(job_id)
        return row

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.lock:
                    self.fleet.reconcile(lambda: sum(b.waiting_gpu() for b in self.books.values()), self.tier_demand)
                    self._admit()
                    self._size_deadlines()
                    self._dispatch()
                    self._finish_jobs()  # a job served wholly from the cache never has a stage in flight
                    pending = list(self.inflight)
                if not pending:
                    time.sleep(0.05)
                    continue
                finished, _ = ray.wait(pending, num_returns=1, timeout=0.1)
                if finished:  # collect everything that is already done in one go
                    finished, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
                with self.lock:
                    for ref in finished:
                        self._result(ref)
                    self._finish_jobs()
            except Exception:  # noqa: BLE001 - the loop must survive anything one job does
                log.error("director loop error:\n%s", traceback.format_exc())
                self.full_rescan_at = 0.0  # what the inbox held past the failure is in the store: look there
                time.sleep(0.5)

    def _admit(self) -> None:
        news: list[tuple[str, JobSetup | None]]
        now, rescan = time.monotonic(), False
        if now >= self.rescan_at:  # a restart's first pass looks: full_rescan_at starts at 0
            self.rescan_at = now + ADMIT_RESCAN_S
            rescan = self.store.written_elsewhere() or now >= self.full_rescan_at
        if rescan:
            self.full_rescan_at = now + FULL_RESCAN_S
            self.inbox.clear()
            news = [(job_id, None) for job_id in
                    self.store.job_ids((JobState.QUEUED, JobState.RUNNING), director=self.name)]
        else:
            news = [self.inbox.popleft() for _ in range(len(self.inbox))]
        for job_id, made in news:
            # A book, even a finished one, still has the job: the stages it left running come back to it,
            # and once it is retired the next rescan admits the job anew (another process requeued it).
            if job_id in self.books:
                continue
            row = self._row(job_id)
            if not JobState(row.state).active:
                continue  # cancelled between its submit and this pass
            self._open(row, made)

    def _open(self, row: Any, made: JobSetup | None = None) -> JobBook | None:
        """A queued job's book, announced: from the setup its submit made, else from its stored
        manifest (a restart, a requeue of a retired job, another process's insert). A manifest that no
        longer plans (a model or a first frame gone since) fails the job instead: None. Either way
        an earlier run's kept view goes: its status is the new book's, or the store's with the error."""
        self.kept.pop(row.id)
        try:
            setup = made or setup_job(row.manifest, row.root, row.options)
            p = self.policy
            book = JobBook(row.id, setup, row.out_dir, priority=row.priority, created=row.created,
                           use_cache=row.options.get("cache", True), image_keys=ingest_images(setup, self.cache),
                           policy=jb.RetryPolicy(p.max_attempts, p.backoff_s, p.backoff_cap_s, p.max_worker_losses))
        except (ValueError, OSError) as exc:  # ManifestError and ModelError are ValueErrors
            self.effects.finish_unbooked(row.id, JobState.FAILED, str(exc))
            self.streams.pop(row.id, None)
            return None
        price(book, {w.tier for w in self.pool.workers.values()}, self.costs)
        self.books[row.id], self.streams[row.id] = book, []
        book.announce(time.time())
        self.effects.apply(book)
        return book

    def _dispatch(self) -> None:
        if self.held:
            return
        now = time.time()
        tiers = {w.tier for w in self.pool.workers.values()}
        ready: dict[str, tuple[JobBook, Stage]] = {}
        for book in sorted(self.books.values(), key=lambda b: (-b.priority, b.created)):
            for stage in book.ready(now):
                ident = f"{book.id}/{stage.id}"
                self.ready_since.setdefault(ident, now)
                try:
                    if book.needs_probe(stage) and from_cache(self.cache, book, stage, tiers, now):
                        continue
                except OSError as exc:  # the probe builds the stage's requests: see _unbuildable
                    self._unbuildable(book, stage, exc, now)
                    break
                if stage.gpu:
                    ready[ident] = (book, stage)
                    continue
                encode = book.encode_request(stage.id)
                book.dispatched(stage.id, ENCODER, "cpu", "encode", encode.output_key, now)
                self.inflight[self.fleet.encoder.run.remote(encode)] = (book.id, stage.id, ENCODER)
                self.ready_since.pop(ident, None)
            self.effects.apply(book)
        if not ready:
            return
        views = self.pool.views(now, load_seconds(self.costs))
        backlog = total_backlog(self.books.values())
        extra = {} if self.prefetch_s is None else {"prefetch_s": self.prefetch_s}
        for ident, wid in self.assign_fn([b.ready_stage(s) for b, s in ready.values()], views, backlog, **extra):
            book, stage = ready[ident]
            if not book.active:  # an earlier stage of this pass failed it
                continue
            worker = self.pool.workers[wid]
            try:
                req = book.request(stage.id, worker.tier, str(self.cache.root))
            except OSError as exc:
                self._unbuildable(book, stage, exc, now)
                continue
            expected = stage_seconds(book, stage.id, worker.tier, self.costs)
            if book.model_key(stage) not in worker.models:
                expected += self.costs[worker.tier].load_s
            ready_at = self.ready_since.pop(ident, now)
            if worker.busy is None:
                # The scheduler's own delay: from the later of "stage ready" and "worker free" to dispatch.
                self.dispatch_latency.append(now - max(ready_at, worker.freed_at))
                if ready_at <= worker.freed_at and worker.freed_at > 0:  # work was waiting when it freed
                    self.gap_watch.add(ident)
                ends = now + expected
            else:  # prefetched: it starts in the worker the moment its current stage ends
                self.gap_watch.add(ident)
                self.sent_ahead.add(ident)
                self.prefetched += 1
                ends = max(worker.expected_end or now, now) + expected
            book.dispatched(stage.id, wid, worker.tier, req.preset, req.output_key, now, ends - now, req.params)
            self.pool.dispatched(wid, ident, book.model_key(stage), ends, expected)
            self.inflight[self.fleet.run(wid, req)] = (book.id, stage.id, wid)
            self.effects.apply(book)

    def _unbuildable(self, book: JobBook, stage: Stage, exc: OSError, now: float) -> None:
        """A file a stage's request hashes went away since submit (an adapter, say): fail the job with
        it, rather than raise in every dispatch pass."""
        book.fail(f"{stage.id}: {short(exc)}", now)
        self.effects.apply(book)
        self._forget_ready(book.id)

    def _forget_ready(self, job_id: str) -> None:
        """Drop the clocks of a job's stages that were ready and will not be dispatched now."""
        for ident in [i for i in self.ready_since if i.startswith(f"{job_id}/")]:
            del self.ready_since[ident]

    def _result(self, ref: Any) -> None:
        job, stage_id, wid = self.inflight.pop(ref)
        book, now = self.books.get(job), time.time()
        self.pool.freed(wid, now, f"{job}/{stage_id}")
        if book is None:  # a book is retired only with nothing in flight: never, but not a reason to stop
            log.error("a result for %s/%s, whose job has no book", job, stage_id)
            self.gap_watch.discard(f"{job}/{stage_id}")
            self.sent_ahead.discard(f"{job}/{stage_id}")
            return
        try:
            result = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - sorted by kind below
            kind = failure_kind(exc, job_active=book.active)
            if kind == FailureKind.LOST and wid == ENCODER:
                self.fleet.start_encoder()  # a new one, and the stage runs again
            elif kind == FailureKind.LOST:
                self.fleet.drop(wid)
            elif kind == FailureKind.ERROR:
                self.pool.failed(wid, f"{job}/{stage_id}", now)
            usable = [w.id for w in self.pool.usable(now)]
            if isinstance(book.on_failure(stage_id, kind, short(exc), now, workers=usable), jb.FailJob):
                self.pool.forgive(f"{job}/{stage_id}", now)
        else:
            self.pool.succeeded(wid)
            if isinstance(result, StageResult):
                if f"{job}/{stage_id}" in self.sent_ahead:
                    # On the director's clock, never before the previous stage's ledger end: the result
                    # before may have been read later after its end than this one (a busy loop), and a
                    # worker runs one stage at a time.
                    book.began(stage_id, max(now - result.wall_seconds, self.last_end.get(wid, 0.0)))
                self.last_end[wid] = now
                if f"{job}/{stage_id}" in self.gap_watch and result.idle_before_s is not None:
                    self.gaps.setdefault(wid, deque(maxlen=2_000)).append(result.idle_before_s)
                self.input_waits.append(result.input_s)
            book.on_success(stage_id, result, now)
        self.gap_watch.discard(f"{job}/{stage_id}")
        self.sent_ahead.discard(f"{job}/{stage_id}")
        self.effects.apply(book)

    def _finish_jobs(self) -> None:
        # In priority order, as dispatch: jobs done in the same pass publish, and succeed, highest first.
        # A pass runs 20 times a second over a queue that may hold thousands: it looks at the jobs that
        # changed, and at all of them every FINISH_SWEEP_S.
        if time.monotonic() >= self.sweep_at:
            self.sweep_at = time.monotonic() + FINISH_SWEEP_S
            candidates = list(self.books.values())
        else:
            changed = self.effects.touched | set(self.publishing)  # a publish ends without a change
            candidates = [self.books[j] for j in changed if j in self.books]
        self.effects.touched.clear()
        done = [b for b in candidates if b.complete or not b.active]
        for book in sorted(done, key=lambda b: (-b.priority, b.created)):
            if book.active and book.complete:
                # The ledger and lockfile here, then the encoder tags, draws the timeline and the report
                # while this loop goes on; the job succeeds once that is done too.
                try:
                    ref = self.publishing.get(book.id)
                    if ref is None:
                        ray.get(self.effects.side.pop(book.id, []))
                        self.publishing[book.id] = self.fleet.encoder.publish.remote(
                            write_outputs(book, self.store.attempts(book.id)))
                        continue
                    if not ray.wait([ref], timeout=0)[0]:
                        continue
                    del self.publishing[book.id]
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a failed write fails the job, never the farm
                    self.publishing.pop(book.id, None)
                    book.fail(f"writing outputs failed: {short(exc)}", time.time())
                else:
                    book.succeed(time.time())
                self.effects.apply(book)
            if not book.active and not book.running:
                self._retire(book)

    def _retire(self, book: JobBook) -> None:
        """A finished job with nothing left running: its book goes, what its status shows stays
        (`kept`), with its events, for the latest KEEP_FINISHED jobs (a farm runs for months). What a
        cancel or failure left behind goes with the book: its ready stages' clocks, pending side
        writes. A requeue opens it again from the store."""
        del self.books[book.id]
        for job_id in self.kept.add(book.id, JobView.of(book)):  # a job with a book is never kept (_open)
            self.streams.pop(job_id, None)
        self.effects.side.pop(book.id, None)
        self._forget_ready(book.id)


DirectorActor = actor_class(Director, max_restarts=-1, max_concurrency=16, num_cpus=0)


def get_director(pool: PoolConfig | None = None, *, name: str = DIRECTOR_NAME, **kwargs: Any) -> Any:
    """The cluster's director, created on first use. Detached and restartable: it outlives the
    client that created it, and Ray restarts it (it reloads its state from SQLite) if it dies."""
    return DirectorActor.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                 resources=HEAD).remote(pool, name=name, **kwargs)
