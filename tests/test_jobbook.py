"""The job book and the worker book, without Ray, torch or a clock: every rule the director follows."""

from __future__ import annotations

import pytest
from helpers import base_manifest, write_png

from farm.contract import EncodeResult, FailureKind, JobState, StageKind, StageResult
from farm.jobbook import (
    CacheRecord,
    CancelStage,
    Descend,
    Emit,
    FailJob,
    Ignore,
    JobBook,
    LedgerRow,
    Requeue,
    Retry,
    RetryPolicy,
    SaveStage,
    SetJobState,
    WriteKeyframe,
)
from farm.jobsetup import setup_job
from farm.plan import Stage
from farm.pool import PoolPolicy, WorkerBook
from farm.schemas import JobView, KeptViews, job_status
from farm.store import JobRow


def book_of(shots=None, policy=None, **over):
    data = base_manifest(**over)
    if shots is not None:
        data["shots"] = shots
    setup = setup_job(data, "/nonexistent")
    return JobBook("j", setup, "/out", policy=policy or RetryPolicy(max_attempts=3, backoff_s=1.0, backoff_cap_s=3.0,
                                                                     max_worker_losses=2))


def result(worker="w1", tier="mid"):
    return StageResult(worker, tier, "cpu", "p", {}, {"peak_vram_bytes": 123}, 0.5, output_sha="sha")


def run(book, stage, now=0.0, worker="w1", tier="mid"):
    """Dispatch `stage` the way the director does: the request, then the book's record of it."""
    req = book.request(stage, tier)
    book.dispatched(stage, worker, tier, req.preset, req.output_key, now, 10.0, req.params)
    return req


def finish(book, stage, now=1.0, worker="w1", tier="mid"):
    run(book, stage, now - 1.0, worker, tier)
    book.on_success(stage, result(worker, tier), now)


def kinds(effects, cls):
    return [e for e in effects if isinstance(e, cls)]


ONE_SHOT = [{"id": "a", "prompt": "valley", "duration": 1.875}]  # 15 frames at 8 fps: two 8-frame tiny calls


# --- readiness, requests, keys -------------------------------------------------------------------


def test_ready_follows_dependencies_running_stages_and_back_off():
    book = book_of(ONE_SHOT)
    assert [s.id for s in book.ready(0)] == ["keyframe:a"]
    run(book, "keyframe:a")
    assert book.ready(0) == []  # running is not ready
    book.on_success("keyframe:a", result(), 1.0)
    assert [s.id for s in book.ready(1)] == ["video:a:0"]
    run(book, "video:a:0", 1.0)
    assert isinstance(book.on_failure("video:a:0", FailureKind.ERROR, "boom", 2.0, workers=["w1", "w2"]), Retry)
    assert book.ready(2.5) == [] and [s.id for s in book.ready(3.0)] == ["video:a:0"]  # back-off of 1 s


def test_request_carries_the_effective_params_and_chains_cache_keys():
    book = book_of(ONE_SHOT)
    kf = book.request("keyframe:a", "mid")
    assert kf.kind == StageKind.KEYFRAME and kf.params["prompt"] == "valley" and kf.params["num_inference_steps"] == 2
    assert kf.ident == "j/keyframe:a" and kf.model.key == book.model_key(book.stage("keyframe:a"))
    finish(book, "keyframe:a")
    video = book.request("video:a:0", "mid")
    assert video.input_key == kf.output_key and video.kind == StageKind.VIDEO
    assert video.params["num_frames"] == 8 and "decode_chunk_size" not in video.params  # the decode's
    assert book.request("video:a:0", "mid") == video  # pure: asking again changes nothing
    assert book.request("video:a:0", "low").preset != video.preset  # the tier's preset
    finish(book, "video:a:0")
    decode = book.request("decode:a:0", "mid")
    assert decode.kind == StageKind.DECODE and decode.input_key == video.output_key  # the latents
    assert (decode.drop, decode.kept) == (0, 8) and decode.params["decode_chunk_size"] == 10
    # the chunk changes the temporal VAE's pixels, so it keys the decode (issue 13.5)
    assert book.request("decode:a:0", "low").output_key != decode.output_key
    finish(book, "decode:a:0")
    assert book.request("video:a:1", "mid").input_key == book.done["decode:a:0"].key  # the next starts from it


def test_users_own_first_frame_feeds_the_first_segment(tmp_path):
    write_png(tmp_path / "images" / "x.png")
    data = base_manifest(shots=[{"id": "a", "prompt": "own", "duration": 1.0, "keyframe": "images/x.png"}])
    book = JobBook("j", setup_job(data, tmp_path), "/out", image_keys={"a": "image-key"})
    assert [s.id for s in book.ready(0)] == ["video:a:0"]  # no keyframe stage: the user's image is the first frame
    assert book.request("video:a:0", "mid").input_key == "image-key"


# --- failures --------------------------------------------------------------------------------------


def test_errors_back_off_exponentially_up_to_the_cap_then_fail_the_job():
    book = book_of(ONE_SHOT, policy=RetryPolicy(max_attempts=5, backoff_s=1.0, backoff_cap_s=3.0))
    delays = []
    now = 0.0
    for attempt in range(5):
        run(book, "keyframe:a", now, worker=f"w{attempt}")
        decision = book.on_failure("keyframe:a", FailureKind.ERROR, "boom", now + 1, workers=["w9"])
        if isinstance(decision, Retry):
            delays.append(decision.after - (now + 1))
            now = decision.after
    assert delays == [1.0, 2.0, 3.0, 3.0]  # 1, 2, 4 capped at 3, 8 capped at 3
    assert isinstance(decision, FailJob) and "failed 5 times: boom" in decision.reason
    assert book.state == JobState.FAILED and not book.active and book.ready(100) == []
    effects = book.drain()
    assert [e.row["outcome"] for e in kinds(effects, LedgerRow)] == ["failed"] * 5
    assert [e.row["attempt"] for e in kinds(effects, LedgerRow)] == [1, 2, 3, 4, 5]
    assert kinds(effects, SetJobState)[-1] == SetJobState(JobState.FAILED, decision.reason)
    assert kinds(effects, Emit)[-1].event["type"] == "job_finished"


def test_a_failed_stage_avoids_the_worker_it_failed_on():
    book = book_of(ONE_SHOT)
    run(book, "keyframe:a", worker="bad")
    book.on_failure("keyframe:a", FailureKind.ERROR, "boom", 1.0, workers=["bad", "ok"])
    ready = book.ready_stage(book.stage("keyframe:a"))
    assert ready.avoid == frozenset({"bad"}) and ready.id == "j/keyframe:a"


def test_no_usable_worker_left_fails_the_job_instead_of_waiting_forever():
    book = book_of(ONE_SHOT)
    run(book, "keyframe:a")
    decision = book.on_failure("keyframe:a", FailureKind.ERROR, "model not found", 1.0, workers=[])
    assert isinstance(decision, FailJob) and "no worker is left" in decision.reason


@pytest.mark.parametrize("stage, first, second", [
    ("decode:a:0", "mid/chunk10+vae_slicing", "mid/chunk8+vae_slicing"),  # halve the chunk to the floor first
    ("video:a:0", "mid+vae_slicing", "mid+cpu_offload+forward_chunking+vae_slicing"),  # no chunk to halve
    ("keyframe:a", "mid+vae_slicing", "mid+cpu_offload+vae_slicing"),
])
def test_out_of_memory_descends_the_stage_ladder(stage, first, second):
    book = book_of(ONE_SHOT)
    for before in ("keyframe:a", "video:a:0"):
        if book.plan.topological().index(before) < book.plan.topological().index(stage):
            finish(book, before)
    req = run(book, stage)
    assert req.preset == first
    decision = book.on_failure(stage, FailureKind.OOM, "CUDA out of memory", 2.0, workers=["w1"])
    assert isinstance(decision, Descend) and decision.preset.label() == second
    assert book.request(stage, "mid").preset == second  # the next attempt runs one rung lower, on any tier
    assert book.errors.get(stage, 0) == 0  # an OOM spends no attempt
    assert kinds(book.drain(), Emit)[-1].event["type"] == "stage_oom"


def test_an_oom_in_the_decode_retries_the_decode_alone_from_the_cached_latents():
    """Hours lost to a decode OOM after all the denoising steps (issue 13.17): the retry is the decode."""
    book = book_of(ONE_SHOT)
    finish(book, "keyframe:a")
    finish(book, "video:a:0")
    latents = book.done["video:a:0"].key
    first = run(book, "decode:a:0")
    decision = book.on_failure("decode:a:0", FailureKind.OOM, "CUDA out of memory", 2.0, workers=["w1"])
    assert isinstance(decision, Descend)
    assert "video:a:0" in book.done and [s.id for s in book.ready(2.0)] == ["decode:a:0"]  # only the decode
    retry = book.request("decode:a:0", "mid")
    assert retry.input_key == latents and retry.params["decode_chunk_size"] < first.params["decode_chunk_size"]
    assert retry.output_key != first.output_key  # other pixels, another key


def test_out_of_memory_on_the_lowest_rung_fails_the_job():
    book = book_of(ONE_SHOT)
    presets = []
    while True:
        req = run(book, "keyframe:a", tier="low")
        presets.append(req.preset)
        decision = book.on_failure("keyframe:a", FailureKind.OOM, "oom", 1.0, workers=["w1"])
        if not isinstance(decision, Descend):
            break
    assert presets == ["low+cpu_offload+forward_chunking+vae_slicing"]  # low starts with every knob on
    assert isinstance(decision, FailJob) and "lowest preset" in decision.reason


def test_lost_workers_requeue_without_spending_attempts_up_to_the_cap():
    book = book_of(ONE_SHOT)
    run(book, "keyframe:a", worker="w1")
    assert isinstance(book.on_failure("keyframe:a", FailureKind.LOST, "died", 1.0, workers=["w2"]), Requeue)
    assert [s.id for s in book.ready(1.0)] == ["keyframe:a"] and book.errors == {}  # at once, no back-off
    run(book, "keyframe:a", worker="w2")
    decision = book.on_failure("keyframe:a", FailureKind.LOST, "died", 2.0, workers=["w3"])
    assert isinstance(decision, FailJob) and "lost 2 workers" in decision.reason
    assert [e.row["outcome"] for e in kinds(book.drain(), LedgerRow)] == ["worker_lost", "worker_lost"]


# --- cancel and requeue ------------------------------------------------------------------------------


def test_cancel_stops_running_stages_and_ignores_what_comes_back():
    book = book_of(ONE_SHOT)
    run(book, "keyframe:a", worker="w7")
    book.drain()
    book.cancel(1.0)
    effects = book.drain()
    assert CancelStage("keyframe:a", "w7") in effects
    assert SetJobState(JobState.CANCELLED, "cancelled by request") in effects
    assert book.ready(5) == [] and book.state == JobState.CANCELLED
    decision = book.on_failure("keyframe:a", FailureKind.CANCELLED, "job cancelled", 2.0)
    assert isinstance(decision, Ignore)
    assert kinds(book.drain(), LedgerRow)[0].row["outcome"] == "cancelled"


def test_requeue_while_a_stage_still_runs_runs_it_again():
    """Requeued before the cancelled stage came back: the job must not stay queued forever."""
    book = book_of(ONE_SHOT)
    run(book, "keyframe:a")
    book.cancel(1.0)
    book.requeue()
    assert book.state == JobState.QUEUED and "keyframe:a" in book.running and book.ready(2) == []
    decision = book.on_failure("keyframe:a", FailureKind.CANCELLED, "job cancelled", 2.0, workers=["w1"])
    assert isinstance(decision, Requeue)
    assert [s.id for s in book.ready(2)] == ["keyframe:a"]


def test_requeue_of_a_finished_job_starts_over_from_the_cache():
    book = book_of(ONE_SHOT)
    finish(book, "keyframe:a")
    run(book, "video:a:0")
    book.on_failure("video:a:0", FailureKind.ERROR, "x", 1, workers=["w1"])
    book.fail("given up", 2.0)
    book.requeue()
    assert book.done == {} and book.errors == {} and book.probed == set()
    assert book.active and [s.id for s in book.ready(3)] == ["keyframe:a"]


# --- cache hits, completion, progress ----------------------------------------------------------------


def test_cache_hits_are_probed_once_and_finish_the_stage():
    book = book_of(ONE_SHOT)
    stage = book.stage("keyframe:a")
    assert book.needs_probe(stage)
    keys = book.probe_keys(stage, {"mid", "low"})
    assert len(keys) == 1  # keyframe params do not depend on the tier
    assert not book.needs_probe(stage)
    book.on_cache_hit("keyframe:a", keys[0], {"tier": "high", "params": {"seed": 1}}, 5.0)
    effects = book.drain()
    row = kinds(effects, LedgerRow)[0].row
    assert row["cache_hit"] == 1 and row["worker"] == "cache" and row["outcome"] == "succeeded"
    assert kinds(effects, WriteKeyframe)[0].key == keys[0]
    assert SetJobState(JobState.RUNNING) in effects and book.state == JobState.RUNNING
    assert not kinds(effects, CacheRecord)  # nothing new to store
    no_cache = book_of(ONE_SHOT)
    no_cache.use_cache = False
    assert not no_cache.needs_probe(no_cache.stage("keyframe:a"))


def test_success_files_the_record_and_completes_the_job():
    book = book_of(ONE_SHOT)
    for stage in ("keyframe:a", "video:a:0", "decode:a:0", "video:a:1", "decode:a:1"):
        finish(book, stage)
    effects = book.drain()
    record = kinds(effects, CacheRecord)[0].record
    assert record["params"]["prompt"] == "valley" and record["output_sha"] == "sha"
    assert kinds(effects, SaveStage)[0].record == record
    assert book.progress == pytest.approx(5 / 8) and not book.complete
    clip = book.encode_request("clip:a")
    assert clip.inputs == (book.done["decode:a:0"].key, book.done["decode:a:1"].key)
    book.dispatched("clip:a", "encoder", "cpu", "encode", clip.output_key, 5.0)
    book.on_success("clip:a", EncodeResult(frames=15), 6.0)
    qc = book.encode_request("qc:a")  # the shot's frames, measured: from its keyframe, with the seam at frame 8
    assert qc.inputs == clip.inputs and qc.options == {"start_key": book.done["keyframe:a"].key, "seams": [8]}
    book.dispatched("qc:a", "encoder", "cpu", "encode", qc.output_key, 6.0)
    book.on_success("qc:a", EncodeResult(frames=15, metrics={"flicker": 0.99}), 6.0)
    merge = book.encode_request("merge")
    assert merge.inputs == ("/out/shots/a.mp4",) and merge.dest == "/out/final.mp4"
    book.dispatched("merge", "encoder", "cpu", "encode", merge.output_key, 6.0)
    book.on_success("merge", EncodeResult(note="stream copy"), 7.0)
    assert kinds(book.drain(), LedgerRow)[-1].row["note"] == "stream copy"
    assert book.complete and book.active
    book.succeed(8.0)
    assert book.progress == 1.0 and book.state == JobState.SUCCEEDED
    assert kinds(book.drain(), Emit)[-1].event == {"job": "j", "time": 8.0, "type": "job_finished",
                                                     "state": "succeeded"}



def test_a_finished_jobs_view_shows_what_its_book_showed_and_only_the_latest_are_kept():
    book = book_of(ONE_SHOT)
    for stage in ("keyframe:a", "video:a:0"):
        finish(book, stage)
    book.cancel(3.0)
    row = JobRow("j", "t", 0, JobState.CANCELLED, {}, "/", "/out", {}, 0.0, 1.0, 3.0, "cancelled", None, None)
    view = JobView.of(book)
    status = job_status(row, view)
    assert [(s.id, s.state) for s in status.shots] == [("a", "queued")] and status.progress == pytest.approx(2 / 8)
    assert job_status(row, None, ["succeeded", "failed"]).shots == []  # what the store alone knows
    kept = KeptViews(keep=2)
    assert kept.add("j1", view) == [] and kept.add("j2", view) == []
    assert kept.add("j1", view) == []  # kept again: now the newest
    assert kept.add("j3", view) == ["j2"] and kept.get("j2") is None and kept.get("j1") is view
    kept.pop("j1")
    assert len(kept) == 1 and kept.get("j1") is None

def test_priority_rank_and_order_reach_the_policy():
    book = book_of([{"id": "a", "prompt": "p", "duration": 2.0}, {"id": "b", "prompt": "p", "duration": 0.5}])
    book.priority = 7
    book.set_ranks({sid: 1.0 for sid in book.plan.stages})
    a, b = (book.ready_stage(book.stage(f"keyframe:{s}")) for s in "ab")
    assert a.priority == b.priority == 7
    assert a.rank > b.rank  # a's chain is longer (two video segments)
    assert a.seq < b.seq


def test_remaining_dag_shows_running_stages_with_their_expected_end():
    book = book_of(ONE_SHOT)
    finish(book, "keyframe:a")
    run(book, "video:a:0", now=4.0)
    pending = {p.id: p for p in book.remaining()}
    assert "keyframe:a" not in pending
    assert pending["video:a:0"].worker == "w1" and pending["video:a:0"].expected_end == 14.0
    assert pending["decode:a:0"].deps == ("video:a:0",) and pending["decode:a:0"].expected_end is None
    assert pending["video:a:1"].deps == ("decode:a:0",)


def test_stages_added_while_running_and_rewired_dependencies():
    book = book_of(ONE_SHOT)
    base = book.stage("video:a:1")
    retake = Stage("video:a:1~2", StageKind.VIDEO, "a", base.deps, base.segment, seed=99)
    book.add_stages([retake], rewire={"clip:a": ("video:a:0", "video:a:1~2")})
    assert book.stage("clip:a").deps == ("video:a:0", "video:a:1~2")
    assert book.plan.topological().index("video:a:1~2") < book.plan.topological().index("clip:a")
    with pytest.raises(ValueError, match="cycle"):
        book.add_stages([], rewire={"keyframe:a": ("merge",)})


def test_a_job_level_stage_several_shots_wait_for():
    book = book_of([{"id": "a", "prompt": "p", "duration": 0.5}, {"id": "b", "prompt": "p", "duration": 0.5}])
    ident = Stage("identity:mira", StageKind.KEYFRAME, None, ())
    book.add_stages([ident], rewire={"keyframe:a": ("identity:mira",), "keyframe:b": ("identity:mira",)})
    assert [s.id for s in book.ready(0)] == ["identity:mira"]
    book.set_ranks({sid: 1.0 for sid in book.plan.stages})
    assert book.ranks["identity:mira"] > book.ranks["keyframe:a"]


# --- the worker book ---------------------------------------------------------------------------------


def test_quarantine_after_repeated_failures_expires_after_the_cool_down():
    pool = WorkerBook(PoolPolicy(quarantine_after=2, quarantine_s=60.0))
    pool.add("w1", "mid")
    pool.add("w2", "mid")
    assert not pool.failed("w1", "j/a", 0.0)
    assert pool.failed("w1", "j/b", 1.0)
    assert pool.quarantined(2.0) == ["w1"] and [v.id for v in pool.views(2.0)] == ["w2"]
    assert pool.quarantined(61.0) == [] and {v.id for v in pool.views(61.0)} == {"w1", "w2"}
    assert pool.workers["w1"].blame == []  # a clean slate after the cool-down


def test_a_success_clears_a_workers_record():
    pool = WorkerBook(PoolPolicy(quarantine_after=2))
    pool.add("w1", "mid")
    pool.failed("w1", "j/a", 0.0)
    pool.succeeded("w1")
    assert not pool.failed("w1", "j/b", 1.0)


def test_a_stage_that_fails_everywhere_blames_no_worker():
    pool = WorkerBook(PoolPolicy(quarantine_after=2))
    for wid in ("w1", "w2"):
        pool.add(wid, "mid")
    pool.failed("w1", "j/poison", 0.0)
    pool.failed("w2", "j/poison", 1.0)
    assert pool.failed("w1", "j/poison", 2.0)  # w1 out...
    assert pool.forgive("j/poison", 3.0) == ["w1"]  # ...until the job failed: the stage was to blame
    assert pool.quarantined(3.0) == [] and all(not w.blame for w in pool.workers.values())


def test_busy_idle_and_residency_in_the_policy_view():
    pool = WorkerBook()
    pool.add("w1", "high")
    pool.dispatched("w1", "j/a", "sdxl:x")
    assert pool.views(0)[0].idle is False and pool.views(0)[0].models == frozenset({"sdxl:x"})
    pool.freed("w1", 5.0)
    assert pool.views(5)[0].idle and pool.workers["w1"].freed_at == 5.0


# --- the layers ---------------------------------------------------------------------------------------


def test_the_core_imports_neither_ray_nor_torch():
    """What the director, the API and `farm validate` load: no torch, no Ray (import-linter checks the
    same statically in scripts/test.sh)."""
    import subprocess
    import sys

    core = ["farm.jobbook", "farm.jobsetup", "farm.schedule", "farm.pool", "farm.contract", "farm.config",
            "farm.store", "farm.cache", "farm.manifest", "farm.plan", "farm.presets", "farm.effective",
            "farm.schemas", "farm.artifacts", "farm.metrics", "farm.sim.engine", "farm.sim.report",
            "farm.sim.worker", "farm.faults", "farm.lockfile"]
    code = (f"import sys; import {', '.join(core)}; "
            "bad = sorted(m for m in ('torch', 'ray', 'diffusers', 'transformers') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_worker_speaks_the_worker_protocol():
    from farm.contract import Worker
    from farm.sim.worker import SimWorker

    assert isinstance(SimWorker("w", "mid"), Worker)
    from farm.gpu.worker import StageWorker  # torch, but no model is loaded

    assert isinstance(StageWorker("w", tier="cpu"), Worker)
