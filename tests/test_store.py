"""The SQLite store: jobs, idempotency, stage rows, the ledger, and upgrades of old state dirs."""

from __future__ import annotations

import json
import sqlite3
import threading

from farm.store import SCHEMA_VERSION, Store


def test_jobs_stages_and_attempts_round_trip(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    job, created = store.add_job("j1", "title", {"a": 1}, "/root", "/out", priority=3, options={"models": "tiny"})
    assert created and job.state == "queued" and job.manifest == {"a": 1} and job.options == {"models": "tiny"}
    store.set_job_state("j1", "running")
    store.set_stage("j1", "video:a:0", "succeeded", worker="w0", tier="low", cache_key="k", record={"x": 1})
    store.add_attempt({"job": "j1", "stage": "video:a:0", "attempt": 1, "start": 1.0, "end": 2.0, "seconds": 1.0,
                       "outcome": "succeeded", "cache_hit": 0, "frames": 8})
    row = store.stage_rows("j1")["video:a:0"]
    assert row["state"] == "succeeded" and json.loads(row["record"]) == {"x": 1} and row["cache_key"] == "k"
    assert store.attempts("j1")[0]["frames"] == 8
    assert store.job_counts()["running"] == 1 and store.job_ids(("running",)) == ["j1"]
    store.set_job_state("j1", "succeeded")
    assert store.job("j1").finished is not None


def test_idempotency_key_is_atomic_under_concurrency(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    ids = []

    def add(i):
        job, _ = store.add_job(f"j{i}", "t", {}, "/", "/o", idempotency_key="same")
        ids.append(job.id)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(store.jobs()) == 1


def test_directors_sharing_a_store_see_only_their_jobs(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.add_job("a", "t", {}, "/", "/o", director="local")
    store.add_job("b", "t", {}, "/", "/o", director="api")
    assert store.job_ids(("queued",), director="local") == ["a"]
    assert store.job_ids(("queued",), director="api") == ["b"]
    assert store.job_ids(("queued",)) == ["a", "b"]


def test_a_director_looks_again_only_when_another_process_wrote(tmp_path):
    """Store.written_elsewhere: a director's own inserts do not make it rescan its queue; another
    connection's do, once."""
    mine, other = Store(tmp_path / "s.sqlite"), Store(tmp_path / "s.sqlite")
    assert mine.written_elsewhere()  # the first ask always looks
    mine.add_job("a", "t", {}, "/", "/o", director="local")
    assert not mine.written_elsewhere()
    other.add_job("b", "t", {}, "/", "/o", director="local")
    assert mine.written_elsewhere() and not mine.written_elsewhere()
    other.set_job_state("a", "cancelled")
    assert mine.written_elsewhere()


def test_store_from_an_older_farm_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the attempts table as the first release wrote it
        db.execute("CREATE TABLE attempts (job TEXT NOT NULL, shot TEXT, stage TEXT NOT NULL, attempt INTEGER "
                   "NOT NULL, worker TEXT, tier TEXT, preset TEXT, start REAL NOT NULL, \"end\" REAL NOT NULL, "
                   "seconds REAL NOT NULL, peak_vram_bytes INTEGER, outcome TEXT NOT NULL, cache_hit INTEGER "
                   "NOT NULL, error TEXT)")
        db.execute("INSERT INTO attempts VALUES ('j', 's', 'clip:s', 1, 'e', 'cpu', 'encode', 1, 2, 1, NULL, "
                   "'succeeded', 0, NULL)")
    store = Store(path)
    store.add_attempt({"job": "j", "stage": "video:s:0", "attempt": 1, "start": 3.0, "end": 4.0, "seconds": 1.0,
                       "outcome": "succeeded", "cache_hit": 0, "frames": 5})
    assert [r["frames"] for r in store.attempts("j")] == [0, 5]
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_an_idempotency_key_reused_for_another_request_is_a_conflict(tmp_path):
    import pytest

    from farm.store import IdempotencyConflict, Store

    store = Store(tmp_path / "farm.db")
    job, created = store.add_job("j1", "t", {"a": 1}, "/", "/o", idempotency_key="k")
    assert created and store.add_job("j2", "t", {"a": 1}, "/", "/o", idempotency_key="k") == (job, False)
    with pytest.raises(IdempotencyConflict, match="j1"):
        store.add_job("j3", "t", {"a": 2}, "/", "/o", idempotency_key="k")
    with pytest.raises(IdempotencyConflict):
        store.add_job("j4", "t", {"a": 1}, "/", "/o", priority=3, idempotency_key="k")


def test_jobs_inserted_together_commit_once_and_refuse_a_conflict_alone(tmp_path):
    import pickle

    from farm.store import IdempotencyConflict, NewJob, Store

    store = Store(tmp_path / "farm.db")
    commits = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    got = store.add_jobs([NewJob("j1", "t", {"a": 1}, "/", "/o1", idempotency_key="k"),
                          NewJob("j2", "t", {"a": 2}, "/", "/o2", idempotency_key="k"),  # the key, another body
                          NewJob("j3", "t", {"a": 1}, "/", "/o3", idempotency_key="k"),  # the key, the same body
                          NewJob("j4", "t", {"a": 4}, "/", "/o4")])
    assert commits == ["COMMIT"]
    assert got[0][1] and got[3][1] and isinstance(got[1], IdempotencyConflict) and got[2] == (got[0][0], False)
    assert sorted(store.job_ids()) == ["j1", "j4"]
    again = pickle.loads(pickle.dumps(got[1]))  # how it crosses Ray to the API
    assert again.job_id == "j1" and str(again) == str(got[1])
