"""Carrying out what a job book decided: store rows, ledger rows, events, cancels, keyframe PNGs.

The book only writes effects into its outbox (`farm.jobbook.Effect`); the director hands each batch
to `Effects.apply`, the one place that turns them into writes and actor calls.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from actors.fleet import Fleet
from farm import jobbook as jb
from farm.artifacts import promote_take, write_job_ledger
from farm.cache import ArtifactCache
from farm.contract import JobState
from farm.jobbook import JobBook
from farm.store import Store
from farm.webhook import deliver_later


class Effects:
    def __init__(self, store: Store, cache: ArtifactCache, fleet: Fleet) -> None:
        self.store, self.cache, self.fleet = store, cache, fleet
        self.streams: dict[str, list[dict[str, Any]]] = {}  # job -> its events so far (SSE, progress bars)
        self.side: dict[str, list[Any]] = {}  # job -> pending keyframe PNG writes
        self.webhooks: Counter[str] = Counter()  # delivery outcomes (their threads add to it)
        self._webhooks_lock = threading.Lock()

    def _delivered(self, outcome: str) -> None:
        with self._webhooks_lock:
            self.webhooks[outcome] += 1

    def apply(self, book: JobBook) -> None:
        for effect in book.drain():
            self.carry_out(book, effect)

    def carry_out(self, book: JobBook, effect: jb.Effect) -> None:
        if isinstance(effect, jb.Emit):
            self.streams.setdefault(book.id, []).append(effect.event)
            row = self.store.job(book.id)
            if effect.event["type"] == "job_finished" and row is not None and row.webhook:
                deliver_later(row.webhook, {"id": book.id, "title": row.title, "state": effect.event["state"],
                                            "error": effect.event.get("error"), "out_dir": row.out_dir},
                              done=self._delivered)
        elif isinstance(effect, jb.LedgerRow):
            self.store.add_attempt(effect.row)
        elif isinstance(effect, jb.SaveStage):
            self.store.set_stage(book.id, effect.stage, effect.state, worker=effect.worker, tier=effect.tier,
                                 cache_key=effect.key, record=effect.record)
        elif isinstance(effect, jb.SetJobState):
            self.store.set_job_state(book.id, effect.state, effect.error)
            if effect.state in (JobState.FAILED, JobState.CANCELLED):
                write_job_ledger(book.layout.ledger, self.store.attempts(book.id))
        elif isinstance(effect, jb.CancelStage):
            self.fleet.cancel(effect.worker, f"{book.id}/{effect.stage}")
        elif isinstance(effect, jb.CacheRecord):
            self.cache.put_json(effect.key, effect.record)
        elif isinstance(effect, jb.PromoteTake):
            promote_take(book.layout, effect.shot, effect.take)
        elif isinstance(effect, jb.WriteKeyframe):
            self.side.setdefault(book.id, []).append(self.fleet.encoder.write_keyframe.remote(
                str(book.layout.keyframe(effect.shot)), effect.params, effect.key))
