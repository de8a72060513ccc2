"""The dispatch policy, as a plain function."""

from __future__ import annotations

from farm.schedule import ReadyStage, WorkerView, assign


def test_prefers_resident_model_then_best_tier():
    workers = [WorkerView("low", "low", frozenset({"svd"})), WorkerView("high", "high", frozenset()),
               WorkerView("mid", "mid", frozenset({"sdxl"}))]
    got = dict(assign([ReadyStage("kf", "sdxl"), ReadyStage("vid", "svd", rank=10)], workers))
    assert got == {"vid": "low", "kf": "mid"}


def test_every_idle_worker_gets_work_when_enough_is_ready():
    workers = [WorkerView(f"w{i}", "mid", frozenset()) for i in range(3)]
    ready = [ReadyStage(f"s{i}", "svd", seq=i) for i in range(5)]
    got = assign(ready, workers)
    assert len(got) == 3 and {w for _, w in got} == {"w0", "w1", "w2"}
    assert [s for s, _ in got] == ["s0", "s1", "s2"]  # FIFO among equals


def test_busy_workers_get_nothing():
    workers = [WorkerView("a", "high", frozenset(), idle=False), WorkerView("b", "low", frozenset())]
    assert assign([ReadyStage("s", "svd")], workers) == [("s", "b")]


def test_priority_then_longest_chain_first():
    workers = [WorkerView("w", "mid", frozenset())]
    ready = [ReadyStage("short", "svd", rank=1), ReadyStage("long", "svd", rank=9),
             ReadyStage("urgent", "svd", priority=5, rank=0)]
    assert assign(ready, workers) == [("urgent", "w")]
    assert assign(ready[:2], workers) == [("long", "w")]


def test_failed_worker_avoided_unless_it_is_the_only_one():
    workers = [WorkerView("bad", "high", frozenset({"svd"})), WorkerView("ok", "low", frozenset())]
    assert assign([ReadyStage("s", "svd", avoid=frozenset({"bad"}))], workers) == [("s", "ok")]
    assert assign([ReadyStage("s", "svd", avoid=frozenset({"bad"}))], workers[:1]) == [("s", "bad")]


def test_failed_stage_waits_for_another_worker_even_if_busy():
    workers = [WorkerView("bad", "high", frozenset()), WorkerView("ok", "low", frozenset(), idle=False)]
    retry = ReadyStage("s", "svd", avoid=frozenset({"bad"}))
    assert assign([retry, ReadyStage("t", "svd")], workers) == [("t", "bad")]  # s waits for "ok"
    everywhere = ReadyStage("s", "svd", avoid=frozenset({"bad", "ok"}))
    assert assign([everywhere], workers) == [("s", "bad")]
