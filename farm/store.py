"""Durable farm state in SQLite: jobs, stage states and the ledger of stage attempts.

One file in the farm's state dir. WAL mode so readers (status, the API) never block the director.
If the director restarts it reloads queued and running jobs from here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.paths import state_dir

# One row per stage attempt: the attempts table and OUT/ledger.parquet (farm.artifacts) share these.
LEDGER_COLUMNS = ("job", "shot", "stage", "attempt", "worker", "tier", "preset", "start", "end", "seconds",
                  "peak_vram_bytes", "outcome", "cache_hit", "error", "note", "qc")
SCHEMA_VERSION = 4  # bump with a step in Store._migrate
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    manifest TEXT NOT NULL,          -- validated manifest, JSON
    root TEXT NOT NULL,              -- folder relative paths resolve against
    out_dir TEXT NOT NULL,
    options TEXT NOT NULL,           -- models override, preview, ...: JSON
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    idempotency_key TEXT UNIQUE,
    webhook TEXT,
    director TEXT NOT NULL DEFAULT ''  -- the director that owns it: several may share one store
);
CREATE TABLE IF NOT EXISTS stages (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    stage_id TEXT NOT NULL,
    state TEXT NOT NULL,             -- pending, running, succeeded, failed
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    tier TEXT,
    cache_key TEXT,
    record TEXT,                     -- effective params and observations, JSON (feeds the lockfile)
    updated REAL NOT NULL,
    PRIMARY KEY (job_id, stage_id)
);
CREATE TABLE IF NOT EXISTS attempts (
    job TEXT NOT NULL, shot TEXT, stage TEXT NOT NULL, attempt INTEGER NOT NULL, worker TEXT, tier TEXT,
    preset TEXT, start REAL NOT NULL, "end" REAL NOT NULL, seconds REAL NOT NULL, peak_vram_bytes INTEGER,
    outcome TEXT NOT NULL, cache_hit INTEGER NOT NULL, error TEXT, frames INTEGER NOT NULL DEFAULT 0,
    note TEXT,                       -- how it ran, where that matters (the merge: stream copy or re-encode)
    qc TEXT                          -- a QC stage's take: its metrics and verdict, as JSON (farm.qc)
);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts(job);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, priority);
"""


@dataclass(frozen=True)
class JobRow:
    id: str
    title: str
    priority: int
    state: str
    manifest: dict[str, Any]
    root: str
    out_dir: str
    options: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    error: str | None
    idempotency_key: str | None
    webhook: str | None
    director: str = ""


def default_path() -> Path:
    return state_dir() / "farm.sqlite"


class Store:
    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, shared by the director's threads
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._data_version: int | None = None  # what written_elsewhere last saw

    def _migrate(self) -> None:
        """Bring a store written by an older farm up to SCHEMA_VERSION, one step at a time, so a state
        dir survives upgrades (CREATE TABLE IF NOT EXISTS never adds a column to an existing table)."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(attempts)")}
        if version < 1 and "frames" not in columns:
            self._db.execute("ALTER TABLE attempts ADD COLUMN frames INTEGER NOT NULL DEFAULT 0")
        job_columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if version < 2 and "director" not in job_columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN director TEXT NOT NULL DEFAULT ''")
        if version < 3 and "note" not in columns:
            self._db.execute("ALTER TABLE attempts ADD COLUMN note TEXT")
        if version < 4 and "qc" not in columns:
            self._db.execute("ALTER TABLE attempts ADD COLUMN qc TEXT")
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._db.close()

    # --- jobs ----------------------------------------------------------------------------------

    def add_job(self, job_id: str, title: str, manifest: dict[str, Any], root: str, out_dir: str, *,
                priority: int = 0, options: dict[str, Any] | None = None, idempotency_key: str | None = None,
                webhook: str | None = None, director: str = "") -> tuple[JobRow, bool]:
        """Insert a queued job; with an idempotency key already used for the same request, return that
        job instead; for another request (manifest, options or priority), raise IdempotencyConflict.
        Returns (job, created)."""
        got = self.add_jobs([NewJob(job_id, title, manifest, root, out_dir, priority, options or {},
                                    idempotency_key, webhook, director)])[0]
        if isinstance(got, IdempotencyConflict):
            raise got
        return got

    def add_jobs(self, jobs: list[NewJob]) -> list[tuple[JobRow, bool] | IdempotencyConflict]:
        """`add_job` for many in one transaction (one commit, so one fsync, however many arrive
        together: the API's submits under load). Each job's answer in order; a conflict refuses that
        job alone. A key used twice in one batch behaves as two submits in turn."""
        out: list[tuple[JobRow, bool] | IdempotencyConflict] = []
        with self.tx() as db:
            for job in jobs:
                if job.idempotency_key is not None:
                    row = db.execute("SELECT * FROM jobs WHERE idempotency_key=?", (job.idempotency_key,)).fetchone()
                    if row is not None:
                        first = _job(row)
                        same = (first.manifest, first.options, first.priority) == (
                            json.loads(json.dumps(job.manifest)), json.loads(json.dumps(job.options)), job.priority)
                        out.append((first, False) if same else IdempotencyConflict(first.id))
                        continue
                db.execute(
                    "INSERT INTO jobs (id, title, priority, state, manifest, root, out_dir, options, created, "
                    "idempotency_key, webhook, director) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.title, job.priority, json.dumps(job.manifest), job.root, job.out_dir,
                     json.dumps(job.options), time.time(), job.idempotency_key, job.webhook, job.director))
                out.append((_job(db.execute("SELECT * FROM jobs WHERE id=?", (job.id,)).fetchone()), True))
        return out

    def job(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, states: tuple[str, ...] = JOB_STATES) -> list[JobRow]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created", states)
            return [_job(r) for r in rows.fetchall()]

    def job_ids(self, states: tuple[str, ...] = JOB_STATES, director: str | None = None) -> list[str]:
        """Ids only: cheap enough to ask on every pass of the director's loop. With `director`, only the
        jobs that director owns (another director sharing the store must not run them too)."""
        marks = ",".join("?" * len(states))
        query = f"SELECT id FROM jobs WHERE state IN ({marks})"
        args: tuple[Any, ...] = states
        if director is not None:
            query += " AND director=?"
            args = (*states, director)
        with self._lock:
            return [r[0] for r in self._db.execute(query + " ORDER BY created", args).fetchall()]

    def written_elsewhere(self) -> bool:
        """Whether another connection (another process) committed to the store since the last ask;
        True the first time. SQLite's data_version moves only for other connections' commits, so a
        director's own writes do not make it look again."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
        changed, self._data_version = version != self._data_version, version
        return changed

    def set_priority(self, job_id: str, priority: int) -> None:
        with self.tx() as db:
            db.execute("UPDATE jobs SET priority=? WHERE id=?", (priority, job_id))

    def set_job_state(self, job_id: str, state: str, error: str | None = None) -> None:
        assert state in JOB_STATES, state
        now = time.time()
        with self.tx() as db:
            if state == "running":
                db.execute("UPDATE jobs SET state=?, started=COALESCE(started, ?), error=NULL WHERE id=?",
                           (state, now, job_id))
            elif state == "queued":
                db.execute("UPDATE jobs SET state=?, finished=NULL, error=NULL WHERE id=?", (state, job_id))
            else:
                db.execute("UPDATE jobs SET state=?, finished=?, error=? WHERE id=?", (state, now, error, job_id))

    # --- stages --------------------------------------------------------------------------------

    def stage_rows(self, job_id: str) -> dict[str, sqlite3.Row]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM stages WHERE job_id=?", (job_id,)).fetchall()
        return {r["stage_id"]: r for r in rows}

    def set_stage(self, job_id: str, stage_id: str, state: str, *, attempts: int | None = None,
                  worker: str | None = None, tier: str | None = None, cache_key: str | None = None,
                  record: dict[str, Any] | None = None) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO stages (job_id, stage_id, state, attempts, worker, tier, cache_key, record, updated) "
                "VALUES (?, ?, ?, COALESCE(?, 0), ?, ?, ?, ?, ?) ON CONFLICT(job_id, stage_id) DO UPDATE SET "
                "state=excluded.state, attempts=COALESCE(?, attempts), worker=COALESCE(excluded.worker, worker), "
                "tier=COALESCE(excluded.tier, tier), cache_key=COALESCE(excluded.cache_key, cache_key), "
                "record=COALESCE(excluded.record, record), updated=excluded.updated",
                (job_id, stage_id, state, attempts, worker, tier, cache_key,
                 json.dumps(record, default=str) if record is not None else None, time.time(), attempts))

    def pinned_keys(self) -> set[str]:
        """Cache keys a queued or running job has made and still needs (its later stages read them);
        the cache's gc never evicts these."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.cache_key FROM stages s JOIN jobs j ON j.id = s.job_id "
                f"WHERE s.cache_key IS NOT NULL AND j.state IN ({', '.join('?' * len(ACTIVE))})", ACTIVE).fetchall()
        return {r[0] for r in rows}

    # --- ledger --------------------------------------------------------------------------------

    def add_attempt(self, row: dict[str, Any]) -> None:
        cols = (*LEDGER_COLUMNS, "frames")  # frames feed the metrics; the parquet ledger leaves them out
        with self.tx() as db:
            db.execute(f"INSERT INTO attempts ({', '.join(repr(c) if c == 'end' else c for c in cols)}) "
                       f"VALUES ({', '.join('?' * len(cols))})", tuple(row.get(c, 0 if c == "frames" else None)
                                                                      for c in cols))

    def job_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in JOB_STATES} | {r[0]: r[1] for r in rows}

    def attempt_summary(self) -> list[dict[str, Any]]:
        """Stage attempts grouped for metrics: kind, tier, outcome, cache hit, count, seconds."""
        query = ("SELECT substr(stage, 1, instr(stage || ':', ':') - 1) AS kind, tier, outcome, cache_hit, "
                 "count(*) AS n, sum(seconds) AS seconds, sum(frames) AS frames FROM attempts "
                 "GROUP BY kind, tier, outcome, cache_hit")
        with self._lock:
            return [dict(r) for r in self._db.execute(query).fetchall()]

    def qc_takes(self) -> list[dict[str, Any]]:
        """Every judged QC take (job, shot, and its verdict's JSON), for the farm_qc_* metrics."""
        query = "SELECT job, shot, qc FROM attempts WHERE qc IS NOT NULL AND outcome='succeeded'"
        with self._lock:
            rows = self._db.execute(query).fetchall()
        return [{"job": r[0], "shot": r[1]} | json.loads(r[2]) for r in rows]

    def attempt_seconds(self) -> list[tuple[str, str, float]]:
        """(kind, tier, seconds) of every executed, successful attempt: the stage latency histogram."""
        query = ("SELECT substr(stage, 1, instr(stage || ':', ':') - 1), tier, seconds FROM attempts "
                 "WHERE outcome='succeeded' AND cache_hit=0")
        with self._lock:
            return [tuple(r) for r in self._db.execute(query).fetchall()]

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM attempts WHERE job=? ORDER BY start", (job_id,)).fetchall()
        return [dict(r) for r in rows]


@dataclass(frozen=True)
class NewJob:
    """A job to insert (Store.add_jobs)."""

    id: str
    title: str
    manifest: dict[str, Any]
    root: str
    out_dir: str
    priority: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    webhook: str | None = None
    director: str = ""


class IdempotencyConflict(ValueError):
    """An Idempotency-Key reused with a different request: answering with the first job would hide
    that the second was never queued."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"this Idempotency-Key was used for job {job_id} with a different request")

    def __reduce__(self) -> tuple[type, tuple[str]]:  # rebuilt from its job id across Ray, not its message
        return IdempotencyConflict, (self.job_id,)


def _job(row: sqlite3.Row) -> JobRow:
    data = dict(row)
    data["manifest"] = json.loads(data["manifest"])
    data["options"] = json.loads(data["options"])
    return JobRow(**data)
