"""Carrying out what a job book decided: store rows, ledger rows, events, cancels, keyframe PNGs.

The book only writes effects into its outbox (`farm.jobbook.Effect`); the director hands each batch
to `Effects.apply`, the one place that turns them into writes and actor calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from actors.fleet import Fleet
from farm import jobbook as jb
from farm.artifacts import promote_take, write_job_ledger
from farm.cache import ArtifactCache
from farm.contract import JobState
from farm.jobbook import JobBook
from farm.paths import disk_trouble
from farm.store import Store
from farm.webhook import deliver_later

log = logging.getLogger(__name__)


class Effects:
    def __init__(self, store: Store, cache: ArtifactCache, fleet: Fleet, cache_cap: int | None = None) -> None:
        self.store, self.cache, self.fleet = store, cache, fleet
        self.cache_cap = cache_cap  # bytes (FarmConfig.cache_cap_gb); None: no cap
        self.evicted: Counter[str] = Counter()  # files and bytes the cache's gc removed
        self._tidying: threading.Thread | None = None
        self.streams: dict[str, list[dict[str, Any]]] = {}  # job -> its events so far (SSE, progress bars)
        self.side: dict[str, list[Any]] = {}  # job -> pending keyframe PNG writes
        self.touched: set[str] = set()  # jobs whose books changed since the director last looked
        self.webhooks: Counter[str] = Counter()  # delivery outcomes (their threads add to it)
        self._webhooks_lock = threading.Lock()

    def _delivered(self, outcome: str) -> None:
        with self._webhooks_lock:
            self.webhooks[outcome] += 1

    def tidy_cache(self) -> None:
        """Bring the cache under its cap in the background (a scan of a big cache takes a while), sparing
        what queued and running jobs need; one tidy at a time."""
        if self.cache_cap is None or (self._tidying is not None and self._tidying.is_alive()):
            return
        cap = self.cache_cap

        def tidy() -> None:
            try:
                report = self.cache.gc(cap, self.store.pinned_keys())
            except OSError as exc:  # a cache that cannot be tidied still serves
                log.warning("cache gc failed: %s", exc)
                return
            self.evicted["files"] += report.removed
            self.evicted["bytes"] += report.freed
            if report.over_cap:
                log.warning("the cache is over its cap of %d bytes with %d bytes queued and running jobs need",
                            cap, report.left)

        self._tidying = threading.Thread(target=tidy, name="cache-gc", daemon=True)
        self._tidying.start()

    def apply(self, book: JobBook) -> None:
        """Carry out the book's effects. A write that fails for want of disk (full, read-only) fails
        the job with that message instead of leaving it hanging; the farm goes on serving."""
        while effects := book.drain():
            self.touched.add(book.id)
            for effect in effects:
                try:
                    self.carry_out(book, effect)
                except Exception as exc:
                    trouble = disk_trouble(exc)
                    if trouble is None:
                        raise
                    log.error("job %s: %s", book.id, trouble)
                    if book.active:
                        book.fail(trouble, time.time())  # its effects come round in the next drain

    def finish_unbooked(self, job_id: str, state: JobState, error: str | None) -> None:
        """A job that ends without ever having had a book here (its stored manifest no longer plans
        after a restart, a cancel before its first admission): its state, and its webhook, as a job
        that finished through its book gets."""
        self.store.set_job_state(job_id, state, error)
        self._notify(job_id, state.value, error)

    def _notify(self, job_id: str, state: str, error: str | None) -> None:
        """The job's webhook, where it has one: the row is read only now (events are many)."""
        row = self.store.job(job_id)
        if row is not None and row.webhook:
            deliver_later(row.webhook, {"id": job_id, "title": row.title, "state": state, "error": error,
                                        "out_dir": row.out_dir}, done=self._delivered)

    def carry_out(self, book: JobBook, effect: jb.Effect) -> None:
        if isinstance(effect, jb.Emit):
            self.streams.setdefault(book.id, []).append(effect.event)
            if effect.event["type"] != "job_finished":
                return
            self._notify(book.id, effect.event["state"], effect.event.get("error"))
        elif isinstance(effect, jb.LedgerRow):
            self.store.add_attempt(effect.row)
        elif isinstance(effect, jb.SaveStage):
            self.store.set_stage(book.id, effect.stage, effect.state, worker=effect.worker, tier=effect.tier,
                                 cache_key=effect.key, record=effect.record)
        elif isinstance(effect, jb.SetJobState):
            self.store.set_job_state(book.id, effect.state, effect.error)
            if effect.state in (JobState.FAILED, JobState.CANCELLED):
                write_job_ledger(book.layout.ledger, self.store.attempts(book.id))
            if effect.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
                self.tidy_cache()
        elif isinstance(effect, jb.CancelStage):
            self.fleet.cancel(effect.worker, f"{book.id}/{effect.stage}")
        elif isinstance(effect, jb.CacheRecord):
            self.cache.put_json(effect.key, effect.record)
        elif isinstance(effect, jb.PromoteTake):
            promote_take(book.layout, effect.shot, effect.take)
        elif isinstance(effect, jb.WriteKeyframe):
            self.side.setdefault(book.id, []).append(self.fleet.encoder.write_keyframe.remote(
                str(book.layout.keyframe(effect.shot)), effect.params, effect.key))
