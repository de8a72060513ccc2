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


# --- the planning policy on hand-checkable cases (costs in seconds per tier) ------------------------

def costs(high, low):
    return (("high", float(high)), ("low", float(low)))


def test_a_slow_worker_waits_when_a_fast_one_frees_soon_near_the_end():
    """One stage left: 10 s on the high GPU (free in 5 s), 100 s on the idle low one. Waiting ends
    it at 15 s, taking the low GPU at 100 s: the optimum is to wait."""
    workers = [WorkerView("fast", "high", frozenset({"svd"}), idle=False, free_in=5.0),
               WorkerView("slow", "low", frozenset({"svd"}))]
    stage = ReadyStage("s", "svd", costs=costs(10, 100))
    assert assign([stage], workers, {"svd": 10.0}) == []
    # with hours of work still to come, the slow worker's 100 s cannot delay the end: it takes it
    assert assign([stage], workers, {"svd": 3600.0}) == [("s", "slow")]


def test_the_critical_chain_gets_the_fast_worker_and_the_rest_fills_in():
    """A heads a long chain (rank 100), B is a leaf; both take 10 s on high, 30 s on low. A goes to
    the high GPU. At the end of the work B waits for it (ends at 20 s, not 30 s); with much work
    left the idle low GPU takes B."""
    workers = [WorkerView("fast", "high", frozenset({"svd"})), WorkerView("slow", "low", frozenset({"svd"}))]
    ready = [ReadyStage("b", "svd", rank=10, costs=costs(10, 30)),
             ReadyStage("a", "svd", rank=100, costs=costs(10, 30))]
    assert assign(ready, workers, {"svd": 20.0}) == [("a", "fast")]
    assert sorted(assign(ready, workers, {"svd": 2000.0})) == [("a", "fast"), ("b", "slow")]


def test_a_second_model_is_loaded_only_when_it_wins():
    """The video model has most of the work left. A keyframe (2 s) on the worker that is fresh
    would cost it the keyframe model's load now and the video model's after (2 x 20 s); the worker
    that already holds the keyframe model frees in 10 s: the keyframe waits for it."""
    workers = [WorkerView("kf", "high", frozenset({"sdxl"}), idle=False, free_in=10.0),
               WorkerView("fresh", "high", frozenset(), load_s=20.0)]
    keyframe = ReadyStage("k", "sdxl", costs=(("high", 2.0),))
    assert assign([keyframe], [workers[0], workers[1]], {"svd": 500.0, "sdxl": 4.0}) == []
    # a video stage on the fresh worker pays one load (22 s) and starts now: it goes
    video = ReadyStage("v", "svd", costs=(("high", 2.0),))
    assert assign([video], workers, {"svd": 500.0}) == [("v", "fresh")]


def test_a_higher_priority_job_claims_the_fast_worker_first():
    workers = [WorkerView("fast", "high", frozenset({"svd"})), WorkerView("slow", "low", frozenset({"svd"}))]
    ready = [ReadyStage("long", "svd", rank=500, costs=costs(10, 30)),
             ReadyStage("urgent", "svd", priority=5, rank=1, costs=costs(10, 30))]
    assert assign(ready, workers, {"svd": 20.0})[0] == ("urgent", "fast")


def test_a_chain_stays_on_the_worker_that_rendered_its_previous_segment():
    workers = [WorkerView("a", "high", frozenset({"svd"})), WorkerView("b", "high", frozenset({"svd"}))]
    assert assign([ReadyStage("next", "svd", costs=(("high", 5.0),), prefer="b")], workers, {"svd": 5.0}) == [
        ("next", "b")]


def test_decodes_go_before_long_video_stages():
    """A decode is short and hands a shot to the encoders: it is dispatched first."""
    workers = [WorkerView("w", "high", frozenset({"svd"}))]
    ready = [ReadyStage("video", "svd", rank=300, costs=(("high", 50.0),), kind="video"),
             ReadyStage("decode", "svd", rank=5, costs=(("high", 2.0),), kind="decode")]
    assert assign(ready, workers, {"svd": 500.0}) == [("decode", "w")]


def test_prefetch_hands_a_worker_about_to_free_its_next_stage():
    """With a prefetch window the director sends a busy worker the stage reserved for it when it
    frees within the window and its queue is empty; one per worker per call; never otherwise."""
    soon = WorkerView("soon", "high", frozenset({"svd"}), idle=False, free_in=0.5, queue_free=True)
    later = WorkerView("later", "high", frozenset({"svd"}), idle=False, free_in=30.0, queue_free=True)
    full = WorkerView("full", "high", frozenset({"svd"}), idle=False, free_in=0.2, queue_free=False)
    ready = [ReadyStage(f"s{i}", "svd", seq=i, costs=(("high", 5.0),)) for i in range(3)]
    assert assign(ready, [soon, later, full], {"svd": 15.0}) == []  # no window: every stage waits
    # s0 waits for "full" (it frees first, but its queue is taken); s1 goes into "soon"'s queue
    assert assign(ready, [soon, later, full], {"svd": 15.0}, prefetch_s=1.0) == [("s1", "soon")]
    assert assign(ready, [later, full], {"svd": 15.0}, prefetch_s=1.0) == []


def test_worker_book_runs_a_queued_stage_when_the_current_one_ends():
    from farm.pool import WorkerBook

    pool = WorkerBook()
    pool.add("w", "high")
    pool.dispatched("w", "j/a", "svd", expected_end=10.0, seconds=10.0)
    view = pool.views(0.0)[0]
    assert not view.idle and view.queue_free and view.free_in == 10.0
    pool.dispatched("w", "j/b", "svd", expected_end=14.0, seconds=4.0)
    assert not pool.views(0.0)[0].queue_free
    pool.freed("w", 9.0, "j/a")  # b starts now, 4 s long
    worker = pool.workers["w"]
    assert worker.busy == "j/b" and worker.queued is None and worker.expected_end == 13.0
    pool.freed("w", 13.0, "j/b")
    assert pool.views(13.0)[0].idle
