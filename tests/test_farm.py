"""The farm as a shared service: cache, durable state, priorities, cancel, failures, chaos.

Real director actor, real tiny-model workers, real SQLite; faults come from the workers' own fault
hook, not from mocking Ray."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import Receiver, base_manifest

from farm.encode import read_frames

pytestmark = pytest.mark.slow


def wait_state(ray, director, job_id, states=("succeeded", "failed", "cancelled"), timeout=180):
    from ray.exceptions import ActorUnavailableError

    deadline = time.time() + timeout
    status = {"state": "unknown"}
    while time.time() < deadline:
        try:
            status = ray.get(director.status.remote(job_id))
        except ActorUnavailableError:  # restarting
            time.sleep(0.2)
            continue
        if status["state"] in states:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {status['state']} after {timeout}s")


def story(**over):
    data = base_manifest(**over)
    data["shots"] = over.get("shots", [
        {"id": "a", "prompt": "misty valley", "duration": 1.5},
        {"id": "b", "prompt": "river at dawn", "duration": 0.5, "continue_from": "previous"},
        {"id": "c", "prompt": "birds over water", "duration": 0.5},
    ])
    return data


@pytest.fixture(scope="module")
def farm(ray_session, tiny_models, tmp_path_factory):
    from actors.director import get_director
    from farm.config import PolicyConfig
    from farm.pool import PoolConfig

    root = tmp_path_factory.mktemp("farm")
    director = get_director(PoolConfig(tier="cpu", workers=2), name="test-farm",
                            store_path=str(root / "farm.sqlite"), cache_dir=str(root / "cache"),
                            policy=PolicyConfig(backoff_s=0.05, reconcile_s=0.3), threads=1)
    ray_session.get(director.ping.remote())
    deadline = time.time() + 120  # the fleet starts in the background: tests that count workers need both
    while len(ray_session.get(director.workers_info.remote())) < 2 and time.time() < deadline:
        time.sleep(0.2)
    yield ray_session, director, root
    ray_session.kill(director, no_restart=True)


def submit(farm, data, name, **kw):
    ray, director, root = farm
    out = root / name
    job = ray.get(director.submit.remote(data, str(root), str(out), options={"models": "tiny", **kw.pop("opts", {})},
                                         **kw))
    return job, out


def ledger(out):
    return pq.read_table(out / "ledger.parquet").to_pylist()


def executed(rows):
    return {r["stage"] for r in rows if r["outcome"] == "succeeded" and not r["cache_hit"]}


def test_rerender_after_prompt_edit_runs_only_that_shot(farm):
    ray, director, _ = farm
    data = story(seed=101)
    job, out = submit(farm, data, "edit1")
    assert wait_state(ray, director, job["id"])["state"] == "succeeded"
    first = ledger(out)
    assert not any(r["cache_hit"] for r in first)

    data["shots"][2]["prompt"] = "a heron over the water"  # only shot c changes
    job2, out2 = submit(farm, data, "edit2")
    assert wait_state(ray, director, job2["id"])["state"] == "succeeded"
    rows = ledger(out2)
    assert executed(rows) == {"keyframe:c", "video:c:0", "decode:c:0", "clip:c", "qc:c", "merge"}
    hits = {r["stage"] for r in rows if r["cache_hit"]}
    assert hits == {"keyframe:a", "video:a:0", "decode:a:0", "video:a:1", "decode:a:1", "video:b:0", "decode:b:0",
                    "clip:a", "clip:b", "qc:a", "qc:b"}
    # a cached clip has the first render's frames; its provenance tags name the job that wrote it
    assert np.array_equal(read_frames(out2 / "shots" / "a.mp4"), read_frames(out / "shots" / "a.mp4"))
    from farm.encode import read_tags

    assert read_tags(out2 / "shots" / "a.mp4")["farm_job"] == job2["id"]
    assert read_tags(out / "shots" / "a.mp4")["farm_job"] == job["id"]


def test_job_served_entirely_from_the_cache_completes(farm):
    ray, director, _ = farm
    data = story(seed=112)
    first, _ = submit(farm, data, "whole1")
    assert wait_state(ray, director, first["id"])["state"] == "succeeded"
    again, out = submit(farm, data, "whole2")
    status = wait_state(ray, director, again["id"], timeout=60)
    assert status["state"] == "succeeded" and status["started"] is not None
    rows = ledger(out)
    assert rows and all(r["cache_hit"] for r in rows) and (out / "final.mp4").is_file()


def test_idempotent_submit_returns_the_same_job(farm):
    ray, director, root = farm
    data = story(seed=102)
    a = ray.get(director.submit.remote(data, str(root), str(root / "idem"), options={"models": "tiny"},
                                       idempotency_key="same-key"))
    b = ray.get(director.submit.remote(data, str(root), str(root / "idem"), options={"models": "tiny"},
                                       idempotency_key="same-key"))
    assert a["id"] == b["id"]
    wait_state(ray, director, a["id"])


def test_submits_queued_together_are_answered_each_and_a_job_stored_elsewhere_is_found(farm):
    """The API hands the director what arrives together (Director.submit_many): each submission gets
    its own answer, a refused one refuses nothing else, and the accepted ones run without waiting for
    the loop's rescan of the store; a job another process put in the store is found by that rescan."""
    from farm.contract import Submission
    from farm.manifest import ManifestError
    from farm.store import IdempotencyConflict, Store

    ray, director, root = farm
    bad = story(seed=201)
    bad["shots"][0]["duration"] = -1
    opts = {"models": "tiny"}
    got = ray.get(director.submit_many.remote([
        Submission(story(seed=200), str(root), str(root / "many-a"), opts, idempotency_key="many"),
        Submission(bad, str(root), str(root / "many-b"), opts),
        Submission(story(seed=202), str(root), str(root / "many-c"), opts, idempotency_key="many"),
        Submission(story(seed=203), str(root), str(root / "many-d"), opts, priority=2)]))
    assert isinstance(got[1], ManifestError) and "duration" in str(got[1])
    assert isinstance(got[2], IdempotencyConflict) and got[2].job_id == got[0]["id"]
    for status in (got[0], got[3]):
        assert status["state"] == "queued"
        assert wait_state(ray, director, status["id"])["state"] == "succeeded"
    stored = Store(root / "farm.sqlite").add_job("elsewhere01", "t", story(seed=204), str(root), str(root / "many-e"),
                                                 options=opts, director="test-farm")[0]
    assert wait_state(ray, director, stored.id)["state"] == "succeeded"


def test_submits_of_one_batch_naming_a_model_no_worker_has_are_each_refused(farm):
    """Director.submit_many asks a worker about a set of models once a batch; every submission naming
    it gets the answer, naming the field, and one with other models is queued."""
    from farm.contract import Submission
    from farm.manifest import ManifestError

    ray, director, root = farm
    absent = {"keyframe": "stabilityai/stable-diffusion-xl-base-1.0", "video": "tiny"}
    got = ray.get(director.submit_many.remote([
        Submission(story(seed=210, models=absent), str(root), str(root / "absent-a"), {}),
        Submission(story(seed=211, models=absent), str(root), str(root / "absent-b"), {}),
        Submission(story(seed=212), str(root), str(root / "absent-c"), {"models": "tiny"}, priority=-5)]))
    for refused in got[:2]:
        assert isinstance(refused, ManifestError)
        assert [e.loc for e in refused.errors] == [("models", "keyframe")]
        assert "not in the local Hugging Face cache" in refused.errors[0].msg
    assert got[2]["state"] == "queued"
    ray.get(director.cancel.remote(got[2]["id"]))


def test_a_worker_that_does_not_answer_a_model_check_is_not_asked_again_for_a_while(ray_session, monkeypatch):
    """Fleet.missing_models: a hung worker costs one timeout, then the next worker answers (and the
    submits behind it, one director call at a time, do not wait that timeout again)."""
    import actors.fleet as fleet_module
    from farm.config import FarmConfig
    from farm.models import resolve_model

    @ray_session.remote
    class Checker:
        def __init__(self, delay):
            self.delay, self.asked = delay, 0

        def missing_models(self, specs):
            self.asked += 1
            time.sleep(self.delay)
            return {"keyframe": f"answered after {self.delay}"}

        def count(self):
            return self.asked

    monkeypatch.setattr(fleet_module, "MODEL_CHECK_S", 0.5)
    hung, fine = Checker.remote(3.0), Checker.remote(0.0)
    fleet = fleet_module.Fleet.__new__(fleet_module.Fleet)  # only what a model check uses: no workers started
    fleet.handles, fleet.silent_until, fleet.config = {"w0": hung, "w1": fine}, {}, FarmConfig()
    specs = [resolve_model("keyframe", "tiny")]
    started = time.monotonic()
    assert fleet.missing_models(specs) == {"keyframe": "answered after 0.0"}
    assert fleet.missing_models(specs) == {"keyframe": "answered after 0.0"}
    assert time.monotonic() - started < 3  # one timeout, not two
    assert ray_session.get(hung.count.remote()) == 1 and ray_session.get(fine.count.remote()) == 2
    for actor in (hung, fine):
        ray_session.kill(actor)


def test_a_stored_job_that_no_longer_plans_fails_and_its_webhook_says_so(farm):
    """A job found in the store (a restart, another process's insert) whose manifest this farm
    refuses fails at admission, never having had a book, and its webhook is delivered as a job that
    finished through its book gets."""
    from farm.store import Store

    ray, director, root = farm
    hook = Receiver()
    try:
        data = story(seed=206, webhook=f"http://localhost:{hook.port}/hook")
        data["shots"][0]["duration"] = -1
        stored = Store(root / "farm.sqlite").add_job("unplannable1", "t", data, str(root), str(root / "unplannable"),
                                                     options={"models": "tiny"}, webhook=data["webhook"],
                                                     director="test-farm")[0]
        status = wait_state(ray, director, stored.id, timeout=60)
        posts = hook.wait()
    finally:
        hook.close()
    assert status["state"] == "failed" and "duration" in status["error"]
    assert len(posts) == 1
    sent = json.loads(posts[0][1])
    assert sent["id"] == stored.id and sent["state"] == "failed" and "duration" in sent["error"]


def test_the_apis_frequent_calls_leave_no_task_events_in_the_gcs():
    """Each submit batch and each status or event poll would otherwise be a task event the GCS keeps."""
    from actors.director import Director

    for name in ("submit_many", "status", "list_jobs", "event_page", "workers_info", "metrics_data"):
        assert getattr(Director, name).__ray_enable_task_events__ is False, name
    assert not hasattr(Director.cancel, "__ray_enable_task_events__")  # rare calls keep theirs


def test_bad_manifest_is_refused_at_submit(farm):
    from farm.manifest import ManifestError

    ray, director, root = farm
    data = story()
    data["shots"][0]["duration"] = -1
    with pytest.raises(ManifestError) as info:
        ray.get(director.submit.remote(data, str(root), str(root / "bad"), options={"models": "tiny"}))
    assert "shots[0].duration" in str(info.value)


def test_error_is_retried_with_backoff_on_another_worker(farm):
    ray, director, _ = farm
    workers = ray.get(director.workers_info.remote())
    assert len(workers) == 2
    for w in workers:  # whichever worker takes video:a:0 first fails it once
        ray.get(director.set_faults.remote(w["id"], [{"match": "*/video:a:0", "kind": "error", "times": 1}]))
    job, out = submit(farm, story(seed=103), "retry")
    assert wait_state(ray, director, job["id"])["state"] == "succeeded"
    rows = sorted((r for r in ledger(out) if r["stage"] == "video:a:0"), key=lambda r: r["start"])
    # armed on both workers: the retry goes to the other worker (and fails there too), the third
    # attempt succeeds; each retry waits longer (back-off 0.05 s, then 0.1 s)
    assert [r["outcome"] for r in rows] == ["failed", "failed", "succeeded"]
    assert "injected fault" in rows[0]["error"]
    assert rows[0]["worker"] != rows[1]["worker"]
    gap1 = (rows[1]["start"] - rows[0]["end"]).total_seconds()
    gap2 = (rows[2]["start"] - rows[1]["end"]).total_seconds()
    assert gap1 >= 0.05 and gap2 >= 0.1, (gap1, gap2)
    for w in workers:
        ray.get(director.set_faults.remote(w["id"], []))


def test_oom_walks_down_the_preset_ladder(farm):
    ray, director, _ = farm
    for w in ray.get(director.workers_info.remote()):
        ray.get(director.set_faults.remote(w["id"], [{"match": "*/decode:c:0", "kind": "oom", "times": 2}]))
    job, out = submit(farm, story(seed=104), "oom")
    assert wait_state(ray, director, job["id"])["state"] == "succeeded"
    rows = [r for r in ledger(out) if r["stage"] == "decode:c:0"]
    assert [r["outcome"] for r in rows][-1] == "succeeded"
    ooms = [r for r in rows if r["outcome"] == "oom"]
    assert len(ooms) == 2
    presets = [r["preset"] for r in rows]
    assert presets[0] == "cpu/chunk10" and len(set(presets)) == 3, presets  # each retry one rung lower
    # the decode ran out of memory, after the denoising: that ran once, its latents were decoded again
    assert [r["outcome"] for r in ledger(out) if r["stage"] == "video:c:0"] == ["succeeded"]
    for w in ray.get(director.workers_info.remote()):
        ray.get(director.set_faults.remote(w["id"], []))


def retired(ray, director, job_id, timeout=30.0):
    """Wait until the director's loop has retired the finished job's book (its cancelled stages back)."""
    deadline = time.time() + timeout
    while ray.get(director.__ray_call__.remote(lambda d, j: j in d.books, job_id)):
        assert time.time() < deadline, f"the book of finished job {job_id} was never retired"
        time.sleep(0.1)


def test_failed_job_can_be_requeued(farm):
    ray, director, _ = farm
    workers = ray.get(director.workers_info.remote())
    for w in workers:
        ray.get(director.set_faults.remote(w["id"], [{"match": "*/keyframe:c", "kind": "error", "times": 2}]))
    job, out = submit(farm, story(seed=105), "requeue")
    status = wait_state(ray, director, job["id"])
    assert status["state"] == "failed" and "keyframe:c" in status["error"]
    retired(ray, director, job["id"])
    shots = {s["id"]: s["state"] for s in ray.get(director.status.remote(job["id"]))["shots"]}  # what it kept
    assert set(shots) == {"a", "b", "c"} and shots["c"] != "succeeded", shots
    # both workers failed keyframe:c once, then a third attempt... unless the budget (3) was spent
    again = ray.get(director.requeue.remote(job["id"]))  # a new book at once, from the stored manifest
    assert again["state"] in ("queued", "running") and again["progress"] < 1 and len(again["shots"]) == 3, again
    status = wait_state(ray, director, job["id"])
    assert status["state"] == "succeeded" and {s["state"] for s in status["shots"]} == {"succeeded"}
    assert (out / "final.mp4").is_file()
    events = ray.get(director.events.remote(job["id"]))[0]
    assert events[0]["type"] == "job_started" and events[-1]["type"] == "job_finished", events
    assert events[-1]["state"] == "succeeded"


def test_a_retired_job_that_no_longer_plans_fails_its_requeue_at_once(farm):
    """A requeue plans a retired job again from its stored manifest: a first frame deleted since fails
    it there and then, with the reason, and no earlier run's shots or events linger."""
    from helpers import write_png

    ray, director, root = farm
    first = write_png(root / "first-frame.png")
    data = story(seed=106, shots=[{"id": "a", "prompt": "from my photo", "duration": 0.5, "keyframe": first.name}])
    job, _ = submit(farm, data, "requeue-gone")
    assert wait_state(ray, director, job["id"])["state"] == "succeeded"
    retired(ray, director, job["id"])
    first.unlink()
    again = ray.get(director.requeue.remote(job["id"]))
    assert again["state"] == "failed" and "first-frame.png" in again["error"] and again["shots"] == [], again
    assert ray.get(director.events.remote(job["id"]))[0] == []


def test_farm_processes_keep_arrow_on_the_system_allocator(ray_session):
    """farm/rayenv.py ARROW_ENV reaches Ray's worker processes (the director's ledger writes)."""
    @ray_session.remote(num_cpus=0)
    def backend() -> str:
        import pyarrow

        return pyarrow.default_memory_pool().backend_name

    assert ray_session.get(backend.remote()) == "system"


def test_poison_job_fails_and_every_worker_stays_in_rotation(farm):
    """A stage that fails on every worker fails its job after max_attempts tries; the workers are not to
    blame, so none is quarantined and the next job renders."""
    ray, director, _ = farm
    workers = [w["id"] for w in ray.get(director.workers_info.remote())]
    for wid in workers:
        ray.get(director.set_faults.remote(wid, [{"match": "*/keyframe:p", "kind": "error", "times": 1000}]))
    poison = story(seed=113, shots=[{"id": "p", "prompt": "poison", "duration": 0.5}])
    job, out = submit(farm, poison, "poison")
    status = wait_state(ray, director, job["id"])
    assert status["state"] == "failed" and "keyframe:p failed 3 times" in status["error"]
    rows = [r for r in ledger(out) if r["stage"] == "keyframe:p"]
    assert [r["outcome"] for r in rows] == ["failed"] * 3 and len({r["worker"] for r in rows}) == 2
    assert ray.get(director.stats.remote())["quarantined"] == []
    assert {w["state"] for w in ray.get(director.workers_info.remote())} <= {"idle", "busy"}
    after, out = submit(farm, story(seed=114), "after-poison")
    assert wait_state(ray, director, after["id"])["state"] == "succeeded" and (out / "final.mp4").is_file()
    for wid in workers:
        ray.get(director.set_faults.remote(wid, []))


def test_cancel_stops_a_running_stage(farm):
    ray, director, _ = farm
    data = story(seed=106, shots=[{"id": "long", "prompt": "slow", "duration": 1.0, "steps": {"video": 400}}])
    job, out = submit(farm, data, "cancel")
    deadline = time.time() + 60
    while time.time() < deadline:
        status = ray.get(director.status.remote(job["id"]))
        if status["shots"] and status["shots"][0]["stage"] == "video:long:0":
            break
        time.sleep(0.05)
    time.sleep(0.5)  # let it denoise a few steps
    t0 = time.time()
    assert ray.get(director.cancel.remote(job["id"]))["state"] == "cancelled"
    # the worker stops at its next step: it is soon free for other work
    while any(w["state"] == "busy" for w in ray.get(director.workers_info.remote())):
        assert time.time() - t0 < 10, "the running stage did not stop"
        time.sleep(0.05)
    assert time.time() - t0 < 10
    status = ray.get(director.status.remote(job["id"]))
    assert status["state"] == "cancelled"
    assert not (out / "final.mp4").exists()


def test_higher_priority_job_goes_first(farm):
    ray, director, _ = farm
    shots = [{"id": f"s{i}", "prompt": f"shot {i}", "duration": 0.5} for i in range(3)]
    # held, so both queue before either starts: otherwise the low job's stages may already be running
    # when the high one is admitted (running work is never preempted), and the race decides the order
    ray.get(director.hold.remote(True))
    try:
        low, _ = submit(farm, story(seed=107, shots=shots), "prio-low", priority=0)
        high, _ = submit(farm, story(seed=108, shots=shots), "prio-high", priority=10)
        deadline = time.time() + 60
        while not all(ray.get(director.status.remote(j["id"]))["shots"] for j in (low, high)):
            assert time.time() < deadline, "both jobs are admitted while the farm is held"
            time.sleep(0.05)
    finally:
        ray.get(director.hold.remote(False))
    s_low, s_high = wait_state(ray, director, low["id"]), wait_state(ray, director, high["id"])
    assert s_low["state"] == s_high["state"] == "succeeded"
    # submitted second, the high-priority job still finishes first
    assert s_high["finished"] < s_low["finished"]


def test_director_restart_resumes_without_redoing_finished_stages(farm):
    ray, director, _ = farm
    shots = [{"id": f"r{i}", "prompt": f"resume {i}", "duration": 1.0} for i in range(4)]
    job, out = submit(farm, story(seed=109, shots=shots), "restart")
    deadline = time.time() + 60
    while len(ray.get(director.status.remote(job["id"]))["shots"]) == 0 or \
            ray.get(director.status.remote(job["id"]))["progress"] < 0.3:
        assert time.time() < deadline
        time.sleep(0.05)
    ray.kill(director, no_restart=False)  # Ray restarts it; it reloads the store
    status = wait_state(ray, director, job["id"], timeout=240)
    assert status["state"] == "succeeded"
    rows = ledger(out)
    done = [r for r in rows if r["outcome"] == "succeeded"]
    hits = [r for r in done if r["cache_hit"]]
    assert hits, "stages finished before the restart came back from the cache"
    # no stage was executed twice
    ran = [r["stage"] for r in done if not r["cache_hit"]]
    assert len(ran) == len(set(ran))
    assert set(ran) | {r["stage"] for r in hits} >= {"merge", "clip:r0", "clip:r3"}


def test_worker_failing_repeatedly_leaves_rotation(farm):
    ray, director, _ = farm
    workers = ray.get(director.workers_info.remote())
    bad = workers[0]["id"]
    ray.get(director.set_faults.remote(bad, [{"match": "*", "kind": "error", "times": 1000}]))
    shots = [{"id": f"q{i}", "prompt": f"quarantine {i}", "duration": 0.5} for i in range(4)]
    job, out = submit(farm, story(seed=111, shots=shots), "quarantine")
    assert wait_state(ray, director, job["id"])["state"] == "succeeded"
    assert bad in ray.get(director.stats.remote())["quarantined"]
    states = {w["id"]: w["state"] for w in ray.get(director.workers_info.remote())}
    assert states[bad] == "quarantined"  # out of rotation, still shown (and back after its cool-down)
    failed = [r for r in ledger(out) if r["outcome"] == "failed"]
    assert failed and {r["worker"] for r in failed} == {bad} and len(failed) <= 3
    ray.get(director.set_faults.remote(bad, []))


def test_one_worker_farm_survives_a_model_that_will_not_load(ray_session, tiny_models, tmp_path):
    """Validation only reads model_index.json; the weights are missing, so every load fails on the only
    worker. The job fails with the loader's error, and a valid job after it renders."""
    import json

    from actors.director import get_director
    from farm.config import PolicyConfig
    from farm.pool import PoolConfig

    broken = tmp_path / "broken-sdxl"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    director = get_director(PoolConfig(tier="cpu", workers=1), name="one-worker", store_path=str(tmp_path / "s.db"),
                            cache_dir=str(tmp_path / "cache"), policy=PolicyConfig(backoff_s=0.05, reconcile_s=0.3),
                            threads=1)
    try:
        bad = story(seed=115, shots=[{"id": "x", "prompt": "x", "duration": 0.5}],
                    models={"keyframe": "./broken-sdxl", "video": "tiny"})
        job = ray_session.get(director.submit.remote(bad, str(tmp_path), str(tmp_path / "bad")))
        status = wait_state(ray_session, director, job["id"])
        assert status["state"] == "failed" and "cannot load sdxl model" in status["error"]
        assert ray_session.get(director.stats.remote())["quarantined"] == []
        good = ray_session.get(director.submit.remote(story(seed=116), str(tmp_path), str(tmp_path / "good"),
                                                      options={"models": "tiny"}))
        assert wait_state(ray_session, director, good["id"])["state"] == "succeeded"
    finally:
        ray_session.kill(director, no_restart=True)


def test_chaos_killed_workers_do_not_change_the_film(farm):
    """Kill worker processes at random during a render: every shot completes, and the frames equal
    those of an undisturbed render with the same seeds."""
    ray, director, _ = farm
    shots = [{"id": f"k{i}", "prompt": f"chaos {i}", "duration": 1.0, "steps": {"video": 30}} for i in range(5)]
    calm, calm_out = submit(farm, story(seed=110, shots=shots), "calm", opts={"cache": False})
    assert wait_state(ray, director, calm["id"])["state"] == "succeeded"

    rng = np.random.default_rng(0)
    job, out = submit(farm, story(seed=110, shots=shots), "chaos", opts={"cache": False})
    kills = 0
    deadline = time.time() + 240
    while ray.get(director.status.remote(job["id"]))["state"] in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(float(rng.uniform(0.2, 0.6)))
        busy = [w for w in ray.get(director.workers_info.remote()) if w["state"] == "busy" and w.get("pid")]
        if busy and kills < 3:
            os.kill(busy[int(rng.integers(len(busy)))]["pid"], signal.SIGKILL)
            kills += 1
    assert kills >= 1
    assert ray.get(director.status.remote(job["id"]))["state"] == "succeeded"
    lost = [r for r in ledger(out) if r["outcome"] == "worker_lost"]
    assert lost, "the kills hit running stages"
    for i in range(5):
        assert np.array_equal(read_frames(out / "shots" / f"k{i}.mp4"), read_frames(calm_out / "shots" / f"k{i}.mp4"))


def test_a_bad_take_is_detected_retaken_and_replaced(farm):
    """Issue 14: a frozen take (the workers' spoiling fault) fails QC, is rendered again with a new
    seed, and the good take replaces it everywhere: the clip, the film, the lockfile, the ledger (both
    takes), the report and the editor's timeline."""
    import json

    import opentimelineio as otio

    from farm.encode import probe

    ray, director, _ = farm
    for w in ray.get(director.workers_info.remote()):
        ray.get(director.set_faults.remote(w["id"], [{"match": "*/decode:c:0", "kind": "frozen", "times": 1}]))
    data = story(seed=117)
    data["output"]["transition"] = "crossfade"
    data["output"]["crossfade_seconds"] = 0.25
    job, out = submit(farm, data, "qc")
    try:
        assert wait_state(ray, director, job["id"])["state"] == "succeeded"
    finally:
        for w in ray.get(director.workers_info.remote()):
            ray.get(director.set_faults.remote(w["id"], []))
    rows = [r for r in ledger(out) if r["stage"].startswith("qc:")]
    by_stage = {r["stage"]: r for r in rows}
    assert by_stage["qc:c"]["note"] == "failed frozen (take 1)" and by_stage["qc:c~take2"]["note"] == "passed (take 2)"
    assert json.loads(by_stage["qc:c"]["qc"])["metrics"]["frozen"] == 1.0  # every frame the first
    assert all(json.loads(r["qc"])["passed"] for r in rows if r["stage"] != "qc:c"), rows  # tiny noise passes
    lock = json.loads((out / "manifest.lock.json").read_text())
    qc = {s["id"]: s["qc"] for s in lock["shots"]}
    assert qc["c"]["take"] == 2 and qc["c"]["passed"] and [t["passed"] for t in qc["c"]["takes"]] == [False, True]
    assert qc["a"]["take"] == 1 and qc["a"]["gates"]["thresholds"]["flicker"] == 0.75  # tiny models: tiny gates
    kept = read_frames(out / "shots" / "c.mp4")
    assert np.abs(np.diff(kept.astype(int), axis=0)).mean() > 1.0  # the kept clip moves: not the frozen take
    assert (out / "takes" / "c.take1.mp4").exists()
    report = (out / "report.html").read_text()
    assert report.count('<section class="shot') == 3 and "<svg" in report and "data:image/png;base64," in report
    assert (out / "contact_sheet.png").stat().st_size > 1000
    # The editor's timeline: one clip per shot in order, dissolves where the film has crossfades (b
    # continues a: a cut), as long as the film within a frame, every reference a file in the folder.
    timeline = otio.adapters.read_from_file(str(out / "timeline.otio"))
    shots, rejected = timeline.tracks[0], timeline.tracks[1]
    clips = list(shots.find_clips())
    assert [c.name for c in clips] == ["a", "b", "c"]
    assert [type(item).__name__ for item in shots] == ["Clip", "Clip", "Transition", "Clip"]
    film = probe(out / "final.mp4")
    assert abs(timeline.duration().to_seconds() - film.duration) <= 1 / 8 + 1e-6, (timeline.duration(), film)
    for clip in [*clips, *rejected.find_clips()]:
        assert (out / clip.media_reference.target_url).is_file(), clip.media_reference.target_url
    assert not rejected.enabled and [c.name for c in rejected.find_clips()] == ["c take 1"]
    assert clips[0].metadata["farm"]["prompt"] == "misty valley"
    # provenance in the containers: title, job, models, the lockfile's sha256, AI-generated
    from farm.encode import read_tags
    from farm.hashing import file_hash

    for path in (out / "final.mp4", out / "shots" / "c.mp4"):
        tags = read_tags(path)
        assert tags["title"] == "test" and tags["farm_job"] == job["id"] and tags["ai_generated"] == "true"
        assert tags["farm_lockfile_sha256"] == file_hash(str(out / "manifest.lock.json"))
        assert "AI-generated" in tags["comment"] and "tiny" in tags["farm_models"]


def test_prefetch_hands_workers_their_next_stage_before_the_current_one_ends(ray_session, tmp_path):
    """The real director with sleeping workers (bench/scheduler.py's): with a prefetch window, stages
    go to busy workers ahead, each worker still runs one at a time (its ledger rows never overlap),
    and the gap a GPU waits between stages where work was ready is a few milliseconds."""
    from actors.director import get_director
    from bench.scheduler import SimEncoder, storyboard
    from farm.config import PolicyConfig
    from farm.pool import PoolConfig
    from farm.sim.costs import DEFAULT_COSTS
    from farm.sim.worker import SimWorker

    scale = 0.002
    scaled = {tier: c.scaled(scale) for tier, c in DEFAULT_COSTS.items()}
    director = get_director(PoolConfig(tier="mid", workers=2), name="prefetch-test",
                            store_path=str(tmp_path / "s.sqlite"), cache_dir=str(tmp_path / "cache"),
                            policy=PolicyConfig(reconcile_s=0.5), backend=SimWorker, backend_args={"time_scale": scale},
                            encoder_backend=SimEncoder, encoder_args={"time_scale": scale}, costs=scaled,
                            prefetch_s=0.1)
    try:
        deadline = time.time() + 120
        while ray_session.get(director.stats.remote())["workers"] < 2:  # they answer which models they hold
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.2)
        data = storyboard(6, chain_every=3)
        job = ray_session.get(director.submit.remote(data, str(tmp_path), str(tmp_path / "out")))
        assert wait_state(ray_session, director, job["id"])["state"] == "succeeded"
        stats = ray_session.get(director.stats.remote())
        assert stats["prefetched"] > 0 and stats["gap_p50"] is not None and stats["gap_p50"] < 0.005, stats
        rows = [r for r in ray_session.get(director.attempts.remote(job["id"])) if r["worker"] != "encoder"]
        for worker in {r["worker"] for r in rows}:
            spans = sorted((r["start"], r["end"]) for r in rows if r["worker"] == worker)
            assert all(a_end <= b_start + 0.005 for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    finally:
        ray_session.kill(director, no_restart=True)


def test_a_deadline_job_asks_the_autoscaler_for_the_gpus_per_tier_it_needs(ray_session, tiny_models, tmp_path):
    """With `autoscale_max` in the farm config, a job with a deadline is sized by simulation in the
    background, and sized again on what it has left every `resize_s`; while it runs the director asks
    for that many GPUs of each tier; not after."""
    from actors.director import get_director
    from farm.config import FarmConfig, PolicyConfig
    from farm.pool import PoolConfig, autoscaler_bundles

    assert autoscaler_bundles(3, {"high": 2}) == [{"GPU": 1.0, "farm_tier_high": 1.0}] * 2 + [{"GPU": 1.0}]
    assert autoscaler_bundles(1, {"mid": 1, "low": 1}) == [{"GPU": 1.0, "farm_tier_low": 1.0},
                                                           {"GPU": 1.0, "farm_tier_mid": 1.0}]
    config = FarmConfig(autoscale_max={"cpu": 3})
    director = get_director(PoolConfig(tier="cpu", workers=1), name="deadline-test", config=config,
                            store_path=str(tmp_path / "s.sqlite"), cache_dir=str(tmp_path / "cache"),
                            policy=PolicyConfig(reconcile_s=0.3, resize_s=0.2))
    try:
        shots = [{"id": f"d{i}", "prompt": f"deadline {i}", "duration": 0.5} for i in range(3)]
        job, _ = submit((ray_session, director, tmp_path), story(seed=117, shots=shots, deadline="1h"), "deadline")
        seen = {}
        deadline = time.time() + 120
        while not seen and time.time() < deadline:
            seen = ray_session.get(director.tier_demand.remote())
            time.sleep(0.1)
        assert seen and set(seen) == {"cpu"} and 1 <= seen["cpu"] <= 3
        assert wait_state(ray_session, director, job["id"])["state"] == "succeeded"
        assert ray_session.get(director.stats.remote())["sizings"] >= 2  # sized again while it ran
        assert ray_session.get(director.tier_demand.remote()) == {}
    finally:
        ray_session.kill(director, no_restart=True)
