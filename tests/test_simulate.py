"""The farm simulator: the farm's own job book, worker book and dispatch policy over assumed costs;
plus the sleeping worker."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import yaml
from helpers import base_manifest, write_manifest

from farm.cache import ArtifactCache
from farm.contract import StageKind, StageRequest
from farm.hashing import array_hash
from farm.jobbook import JobBook
from farm.jobsetup import setup_job
from farm.manifest import validate_data
from farm.models import resolve_model
from farm.presets import memory_knobs
from farm.schedule import assign_fifo
from farm.sim.cluster import load_cluster
from farm.sim.costs import CLIP_FRAME_S, DEFAULT_COSTS, MERGE_FRAME_S, TierCost, calibrate, stage_seconds
from farm.sim.engine import Faults, lower_bound, simulate
from farm.sim.report import simulate_file
from farm.sim.worker import SimWorker

# Real model ids (never loaded) so video calls make SVD-XT's 25 frames.
MODELS = {"keyframe": "stabilityai/stable-diffusion-xl-base-1.0",
          "video": "stabilityai/stable-video-diffusion-img2vid-xt"}


def manifest_of(shots, **over):
    data = {"version": 1, "title": "sim", "seed": 3, "models": MODELS, "shots": shots, **over}
    return validate_data(data)


def book_of(manifest, job="job", **kw):
    return JobBook(job, setup_job(manifest, "/nonexistent"), "/nonexistent", **kw)


def storyboard(n, chained_every=0, durations=(2.0, 3.5, 5.0, 1.5, 4.0, 6.0, 2.5)):
    shots = []
    for i in range(n):
        shot = {"id": f"s{i:03d}", "prompt": "a scene", "duration": durations[(i * 5) % len(durations)]}
        if chained_every and i % chained_every == chained_every - 1:
            shot["continue_from"] = "previous"
        shots.append(shot)
    return manifest_of(shots)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- cluster files ------------------------------------------------------------------------------


def test_load_cluster_tiers_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"tiers": {"high": 4, "mid": 8, "low": 4}})
    assert load_cluster(path) == {"high": 4, "mid": 8, "low": 4}


def test_load_cluster_ray_launcher_config(tmp_path):
    config = {
        "cluster_name": "farm",
        "max_workers": 20,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 8}, "node_config": {}},
            "a100": {"resources": {"GPU": 4, "farm_tier_high": 4}, "min_workers": 0, "max_workers": 2},
            "l4": {"resources": {"GPU": 1, "farm_tier_mid": 1}, "min_workers": 3},
            "t4": {"resources": {"GPU": 2, "farm_tier_low": 2}},
        },
    }
    assert load_cluster(write_yaml(tmp_path / "cluster.yaml", config)) == {"high": 8, "mid": 3, "low": 2}


@pytest.mark.parametrize("data, needle", [
    ({"available_node_types": {"gpu_nodes": {"resources": {"GPU": 2}, "max_workers": 3}}}, "gpu_nodes"),
    ({"tiers": {"huge": 2}}, "huge"),
    ({"tiers": {"high": -1}}, "tiers.high"),
    ({"tiers": {"high": 0}}, "no GPU workers"),
    ({"nodes": 3}, "available_node_types"),
    ([1, 2], "mapping"),
])
def test_load_cluster_errors_name_file_and_problem(tmp_path, data, needle):
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ValueError) as info:
        load_cluster(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_load_cluster_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_cluster(tmp_path / "nope.yaml")


# --- simulation ---------------------------------------------------------------------------------


def test_single_gpu_makespan_is_the_sum_of_its_stages():
    manifest = manifest_of([{"id": "a", "prompt": "p", "duration": 3.0},
                            {"id": "b", "prompt": "p", "duration": 2.0, "continue_from": "previous"},
                            {"id": "c", "prompt": "p", "duration": 1.0}])
    book = book_of(manifest)
    result = simulate(book, {"mid": 1})
    gpu_work = sum(stage_seconds(book, sid, "mid") for sid, s in book.plan.stages.items() if s.gpu)
    loads = 2 * DEFAULT_COSTS["mid"].load_s  # keyframe and video model, each loaded once and kept
    assert result.loads == 2
    assert result.busy["mid-0"] == pytest.approx(gpu_work + loads, abs=1e-6)
    # After the GPU's last stage only that shot's clip, its QC and the merge remain.
    last_gpu = max((r for r in result.runs if r.worker == "mid-0"), key=lambda r: r.end)
    last_shot = book.plan.stages[last_gpu.stage_id].shot
    tail = sum(stage_seconds(book, f"{kind}:{last_shot}" if kind != "merge" else kind, "mid")
               for kind in ("clip", "qc", "merge"))
    assert result.makespan == pytest.approx(gpu_work + loads + tail, abs=1e-6)
    assert len(result.runs) == len(book.plan.stages) and result.jobs == {"job": "succeeded"}


def test_stage_costs_follow_steps_frames_and_tier():
    book = book_of(manifest_of([{"id": "a", "prompt": "p", "duration": 1.0}], quality="balanced"))
    assert stage_seconds(book, "keyframe:a", "mid") == pytest.approx(40 * DEFAULT_COSTS["mid"].keyframe_step_s)
    # balanced = 60 video steps on high and mid; low clamps to its 50. The call makes its length
    # bucket's frames (19 of SVD-XT's 25 for a 15-frame shot), and pays for all of them.
    made = book.stage("video:a:0").segment.frames
    assert made == 19
    high, low = DEFAULT_COSTS["high"].video_frame_step_s, DEFAULT_COSTS["low"].video_frame_step_s
    assert stage_seconds(book, "video:a:0", "high") == pytest.approx(60 * made * high)
    assert stage_seconds(book, "video:a:0", "low") == pytest.approx(50 * made * low)
    assert stage_seconds(book, "clip:a", "high") == pytest.approx(15 * CLIP_FRAME_S)
    assert stage_seconds(book, "merge", "low") == pytest.approx(15 * MERGE_FRAME_S)
    pinned = book_of(manifest_of([{"id": "a", "prompt": "p", "duration": 1.0, "steps": {"video": 10}}]))
    assert stage_seconds(pinned, "video:a:0", "low") == pytest.approx(10 * made * low)
    assert DEFAULT_COSTS["high"].video_frame_step_s < DEFAULT_COSTS["mid"].video_frame_step_s \
        < DEFAULT_COSTS["low"].video_frame_step_s < DEFAULT_COSTS["cpu"].video_frame_step_s


@pytest.mark.parametrize("shots, cluster", [
    (6, {"mid": 1}),
    (12, {"high": 2, "low": 3}),
    (30, {"high": 4, "mid": 8, "low": 4}),
    (40, {"low": 16}),
])
@pytest.mark.parametrize("chained_every", [0, 2, 5])
def test_makespan_never_beats_the_lower_bound(shots, cluster, chained_every):
    manifest = storyboard(shots, chained_every)
    for policy in (None, assign_fifo):
        book = book_of(manifest)
        result = simulate(book, cluster, **({"policy": policy} if policy else {}))
        assert result.lower_bound == pytest.approx(lower_bound(book, cluster))
        assert result.makespan >= result.lower_bound - 1e-6, (result.makespan, result.lower_bound)
        assert result.ratio >= 1.0 - 1e-9


def test_fully_chained_storyboard_is_bound_by_its_chain():
    manifest = manifest_of(
        [{"id": "a", "prompt": "p", "duration": 4.0}]
        + [{"id": f"c{i}", "prompt": "p", "duration": 4.0, "continue_from": "previous"} for i in range(7)])
    result = simulate(book_of(manifest), {"high": 8})
    # One chain: extra GPUs cannot help; the simulation should run it back to back on the fast tier.
    assert result.ratio == pytest.approx(1.0, abs=0.02), result


def test_more_gpus_never_slow_a_parallel_storyboard():
    manifest = storyboard(24)
    spans = [simulate(book_of(manifest), {"mid": n}).makespan for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)]
    assert all(b <= a + 1e-6 for a, b in zip(spans, spans[1:], strict=False)), spans
    assert spans[-1] < spans[0] / 10
    mixed = [simulate(book_of(manifest), {"high": h, "low": 4}).makespan for h in (0, 1, 2, 4, 8)]
    assert all(b <= a + 1e-6 for a, b in zip(mixed, mixed[1:], strict=False)), mixed


def test_farm_policy_beats_fifo_on_a_mixed_cluster():
    manifest = storyboard(120, chained_every=5)  # a fifth of the shots continue the previous one
    cluster = {"high": 4, "mid": 8, "low": 4}
    started = time.perf_counter()
    farm = simulate(book_of(manifest), cluster)
    elapsed = time.perf_counter() - started
    fifo = simulate(book_of(manifest), cluster, policy=assign_fifo)
    message = (f"farm policy: makespan {farm.makespan:.0f}s ratio {farm.ratio:.3f}; "
               f"fifo: makespan {fifo.makespan:.0f}s ratio {fifo.ratio:.3f}; lower bound {farm.lower_bound:.0f}s")
    assert farm.makespan <= fifo.makespan, message
    assert farm.ratio < 1.15, message
    assert elapsed < 10.0  # no sleeping: the book's rules and the policy, over an event clock
    assert set(farm.busy) >= {"high-0", "high-3", "mid-7", "low-3"}


def test_policy_sees_what_the_director_shows():
    book = book_of(storyboard(3))
    seen = []

    def spy(ready, workers, backlog):
        seen.append((ready, workers, backlog))
        return assign_fifo(ready, workers)

    simulate(book, {"high": 1, "low": 1}, policy=spy)
    first_ready, first_workers, first_backlog = seen[0]
    keyframe_key, video_key = book.setup.specs["keyframe"].key, book.setup.specs["video"].key
    # what a planning policy weighs: each stage's cost per tier, the work left per model, when busy
    # workers free and what a load costs them
    assert all(dict(s.costs)["high"] < dict(s.costs)["low"] for s in first_ready)
    assert set(first_backlog) == {keyframe_key, video_key} and first_backlog[video_key] > first_backlog[keyframe_key]
    assert all(w.load_s == DEFAULT_COSTS[w.tier].load_s for w in first_workers)
    assert any(not w.idle and w.free_in is not None and w.free_in > 0 for _, ws, _ in seen for w in ws)
    assert [w.id for w in first_workers] == ["high-0", "low-0"] and all(w.idle for w in first_workers)
    assert {s.model for s in first_ready} == {keyframe_key}
    assert all(s.id.startswith("job/") for s in first_ready)
    assert [s.seq for s in first_ready] == sorted(s.seq for s in first_ready)
    assert all(s.rank > 0 for s in first_ready)
    assert any(w.models == frozenset({keyframe_key, video_key}) for _, ws, _ in seen for w in ws)


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="not a ready stage"):
        simulate(book_of(storyboard(2)), {"mid": 1}, policy=lambda ready, workers, backlog: [("job/merge", "mid-0")])
    with pytest.raises(RuntimeError, match="stalled"):
        simulate(book_of(storyboard(2)), {"mid": 1}, policy=lambda ready, workers, backlog: [])


def test_assign_fifo_ignores_tier_and_residency():
    from farm.schedule import ReadyStage, WorkerView

    workers = [WorkerView("high", "high", frozenset({"svd"})), WorkerView("low", "low", frozenset()),
               WorkerView("busy", "high", frozenset(), idle=False)]
    ready = [ReadyStage("b", "svd", seq=1, rank=100), ReadyStage("a", "svd", seq=0)]
    assert assign_fifo(ready, workers) == [("a", "high"), ("b", "low")]
    assert assign_fifo([ReadyStage("c", "svd", seq=1)], workers) == [("c", "low")]  # round-robin by seq


def test_simulated_failures_are_retried_by_the_farms_own_rules():
    manifest = storyboard(20)
    calm = simulate(book_of(manifest), {"mid": 4})
    faulty = simulate(book_of(manifest), {"mid": 4}, faults=Faults(error_rate=0.1, seed=2))  # seed 1: a stage fails 3x
    assert calm.retries == 0 and faulty.outcomes["failed"] > 0
    assert faulty.jobs == {"job": "succeeded"} and faulty.makespan > calm.makespan
    # every failed attempt shows as a run, and each stage ended once in success
    assert sum(r.outcome == "error" for r in faulty.runs) == faulty.outcomes["failed"]
    assert faulty.outcomes["succeeded"] == len(book_of(manifest).plan.stages)


def test_simulated_oom_walks_the_ladder_and_a_hopeless_job_fails():
    manifest = storyboard(6)
    oom = simulate(book_of(manifest), {"high": 2}, faults=Faults(oom_rate=0.3, seed=2))
    assert oom.outcomes["oom"] > 0 and oom.jobs == {"job": "succeeded"}
    # Nearly every attempt fails: stages run out of attempts and the job fails instead of the sim stalling.
    doomed = simulate(book_of(manifest), {"mid": 2}, faults=Faults(error_rate=0.95, seed=3))
    assert doomed.jobs == {"job": "failed"} and doomed.outcomes["failed"] >= 3


def test_simulated_cache_hits_skip_work():
    manifest = storyboard(4)
    first = book_of(manifest)
    simulate(first, {"mid": 2})
    cached = {done.key for done in first.done.values()}
    again = simulate(book_of(manifest), {"mid": 2}, cached=cached)
    assert again.cache_hits == len(first.plan.stages) and again.makespan == 0.0 and again.loads == 0


def test_higher_priority_job_finishes_first_in_the_simulation():
    manifest = storyboard(8)
    low, high = book_of(manifest, "low"), book_of(manifest, "high", priority=5)
    result = simulate([low, high], {"mid": 2}, submitted={"low": 0.0, "high": 1.0})
    assert result.jobs == {"low": "succeeded", "high": "succeeded"}
    assert result.finished["high"] < result.finished["low"]


def test_simulate_file_reports_makespan_and_retries(tmp_path):
    manifest = write_manifest(tmp_path, base_manifest())
    cluster = write_yaml(tmp_path / "cluster.yaml", {"tiers": {"high": 1, "mid": 2}})
    text = simulate_file(str(manifest), str(cluster))
    assert "makespan" in text and "lower bound" in text and "retries" in text
    assert "high" in text and "mid" in text and "low" not in text.split("makespan")[0]
    faulty = simulate_file(str(manifest), str(cluster), faults=Faults(error_rate=0.5, seed=4))
    assert "simulated faults: 50.0%" in faulty


def test_farm_plan_simulate_cli_with_fail_rate(tmp_path):
    import subprocess
    import sys

    manifest = write_manifest(tmp_path, base_manifest())
    cluster = write_yaml(tmp_path / "cluster.yaml", {"tiers": {"mid": 2}})
    out = subprocess.run([sys.executable, "-m", "farm.cli", "plan", str(manifest), "--simulate", str(cluster),
                          "--fail-rate", "0.3", "--seed", "5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "retries" in out.stdout and "simulated faults: 30.0%" in out.stdout


# --- calibration ------------------------------------------------------------------------------


def test_calibrate_recovers_per_tier_costs():
    truth = {"high": (0.05, 0.07), "low": (0.3, 0.4)}
    stages = {"keyframe:a": ("keyframe", 30, 1), "keyframe:b": ("keyframe", 50, 1),
              "video:a:0": ("video", 60, 25), "video:b:0": ("video", 50, 14), "clip:a": ("clip", 0, 25)}
    rows = []
    for tier, (kf, vf) in truth.items():
        for sid, (kind, steps, frames) in stages.items():
            if kind == "clip":
                rows.append({"stage": sid, "tier": "cpu", "seconds": 3.0, "outcome": "succeeded", "cache_hit": False})
                continue
            seconds = steps * kf if kind == "keyframe" else steps * frames * vf
            rows.append({"stage": sid, "tier": tier, "seconds": seconds, "outcome": "succeeded", "cache_hit": False})
        # Noise the fit must ignore: a failure, a cache hit, and a first stage that paid a model load.
        rows.append({"stage": "video:a:0", "tier": tier, "seconds": 999.0, "outcome": "failed", "cache_hit": False})
        rows.append({"stage": "video:a:0", "tier": tier, "seconds": 0.01, "outcome": "succeeded", "cache_hit": True})
        rows.append({"stage": "keyframe:a", "tier": tier, "seconds": 30 * kf, "outcome": "succeeded",
                     "cache_hit": False})
    rows.append({"stage": "keyframe:b", "tier": "high", "seconds": 50 * 0.05 + 40.0, "outcome": "succeeded",
                 "cache_hit": False})
    fitted = calibrate(rows, stages)
    for tier, (kf, vf) in truth.items():
        assert fitted[tier].keyframe_step_s == pytest.approx(kf)
        assert fitted[tier].video_frame_step_s == pytest.approx(vf)
        assert fitted[tier].load_s == DEFAULT_COSTS[tier].load_s
    assert fitted["mid"] == DEFAULT_COSTS["mid"] and fitted["cpu"] == DEFAULT_COSTS["cpu"]


# --- simulated worker ---------------------------------------------------------------------------

VIDEO_PARAMS = {"width": 32, "height": 24, "num_frames": 8, "num_inference_steps": 4, "decode_chunk_size": 3,
                "seed": 11}


def video_request(tmp_path, tier="mid", stage="video:a:0", input_key="in"):
    return StageRequest("j", stage, StageKind.VIDEO, resolve_model("video", "tiny"), VIDEO_PARAMS, memory_knobs(tier),
                        tier, tier, "latents", str(tmp_path), input_key=input_key)


def decode_request(tmp_path, tier="mid", output_key="out"):
    return StageRequest("j", "decode:a:0", StageKind.DECODE, resolve_model("video", "tiny"), VIDEO_PARAMS,
                        memory_knobs(tier), f"{tier}/chunk3", tier, output_key, str(tmp_path), input_key="latents",
                        drop=1, kept=7)


def run_video(worker, tmp_path, image, tier="mid"):
    """One simulated video call, denoise then decode, through SimWorker.run (the director's only entry)."""
    cache = ArtifactCache(tmp_path)
    cache.put_arrays("in", last=image)
    denoised = worker.run(video_request(tmp_path, tier))
    report = worker.run(decode_request(tmp_path, tier))
    out = cache.get_arrays("out")
    return out["frames"], out["last"], denoised, report


def test_sim_worker_video_sleeps_cost_times_scale_and_returns_frames(tmp_path):
    costs = {**DEFAULT_COSTS, "mid": TierCost(keyframe_step_s=0.5, video_frame_step_s=0.25, load_s=5.0)}
    worker = SimWorker("sim-0", "mid", costs=costs, time_scale=0.01)
    image = np.full((24, 32, 3), 77, dtype=np.uint8)
    # steps x frames x video_frame_step_s, plus frames x decode_frame_s, times time_scale: 0.088 s
    cost = (4 * 8 * 0.25 + 8 * costs["mid"].decode_frame_s) * 0.01
    load = 5.0 * 0.01

    started = time.perf_counter()
    kept, last, denoised, report = run_video(worker, tmp_path, image)
    first = time.perf_counter() - started
    started = time.perf_counter()
    run_video(worker, tmp_path, image)
    second = time.perf_counter() - started

    assert cost + load <= first < cost + load + 0.5
    assert cost <= second < cost + 0.5 and second < first
    assert kept.shape == (7, 24, 32, 3) and kept.dtype == np.uint8
    assert last.shape == (24, 32, 3) and last.dtype == np.uint8
    assert denoised.input_sha == array_hash(image) and report.output_sha == array_hash(last)
    assert report.input_sha == denoised.output_sha  # the decode read the latents the denoising wrote
    assert denoised.observed["steps"] == 4 and denoised.observed["unet_calls"] == 4
    assert denoised.observed["unet_batch"] == 2 and denoised.observed["peak_vram_bytes"] is None
    assert report.observed["decode_chunk_max"] == 3 and report.observed["decode_calls"] == 3
    assert report.device == "sim" and report.tier == "mid" and report.knobs["vae_slicing"] is True
    again, _, _, _ = run_video(SimWorker("sim-1", "mid", costs=costs, time_scale=0), tmp_path / "again", image)
    assert np.array_equal(kept, again)  # deterministic


def test_sim_worker_keyframe_and_info(tmp_path):
    worker = SimWorker("sim-k", "high", time_scale=0)
    req = StageRequest("j", "keyframe:a", StageKind.KEYFRAME, resolve_model("keyframe", "tiny"),
                       {"width": 40, "height": 16, "num_inference_steps": 3, "seed": 5}, memory_knobs("high"),
                       "high", "high", "k", str(tmp_path))
    report = worker.run(req)
    image = ArtifactCache(tmp_path).get_arrays("k")["last"]
    assert image.shape == (16, 40, 3) and image.dtype == np.uint8
    assert report.output_sha == array_hash(image) and report.observed["steps"] == 3
    info = worker.info()
    assert set(info) == {"id", "node", "tier", "device", "gpu", "vram_total", "vram_used", "utilization",
                         "loaded_models", "stages_run", "pid"}
    assert info["stages_run"] == 1 and info["tier"] == "high" and info["loaded_models"] == ["tiny"]
    with pytest.raises(ValueError, match="tier"):
        SimWorker("x", "giant")


def test_sim_worker_run_chains_through_the_artifact_cache(tmp_path):
    worker = SimWorker("sim-r", "low", time_scale=0)
    kf = worker.run(StageRequest("j", "keyframe:a", StageKind.KEYFRAME, resolve_model("keyframe", "tiny"),
                                 {"width": 32, "height": 24, "num_inference_steps": 2, "seed": 9}, memory_knobs("low"),
                                 "low", "low", "k1", str(tmp_path)))
    video = worker.run(video_request(tmp_path, "low", input_key="k1"))
    decoded = worker.run(decode_request(tmp_path, "low", output_key="v1"))
    cache = ArtifactCache(tmp_path)
    image, out = cache.get_arrays("k1")["last"], cache.get_arrays("v1")
    assert image.shape == (24, 32, 3) and out["frames"].shape == (7, 24, 32, 3)
    assert kf.output_sha == array_hash(image) == video.input_sha
    assert decoded.output_sha == array_hash(out["last"])
    assert worker.info()["stages_run"] == 3 and decoded.tier == "low"


def test_sim_worker_cancel_and_faults(tmp_path):
    worker = SimWorker("sim-c", "mid", costs={"mid": TierCost(1.0, 1.0, 0.0)}, time_scale=1.0)
    req = video_request(tmp_path)
    ArtifactCache(tmp_path).put_arrays("in", last=np.zeros((24, 32, 3), np.uint8))
    threading.Timer(0.1, worker.cancel, args=("j/video:a:0",)).start()
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="cancelled") as info:
        worker.run(req)  # 32 simulated seconds, cancelled after 0.1
    assert type(info.value).__name__ == "StageCancelled" and time.perf_counter() - started < 2.0
    worker.set_faults([{"match": "j/video:*", "kind": "error", "times": 1}])
    with pytest.raises(RuntimeError, match="injected fault"):
        worker.run(req)
    worker.time_scale = 0
    assert worker.run(req).output_sha  # the fault fired once; the retry succeeds


def test_calibration_fits_per_tier_costs_and_load_time_from_ledgers():
    """Two renders' ledgers: the median s/step per tier, and the load time a worker's first stage of
    each model paid on top of its cost; a tier no ledger ran stays assumed, and says so."""
    from farm.calibration import fit

    work = {f"keyframe:{s}": ("keyframe", 30, 1) for s in "abcde"}
    work |= {f"video:{s}:0": ("video", 25, 25) for s in "abcde"} | {f"decode:{s}:0": ("decode", 0, 25) for s in "abcde"}

    def ledger(worker_offset):
        rows, start = [], 0.0
        for sid, (kind, steps, frames) in work.items():
            seconds = {"keyframe": steps * 0.05, "video": steps * frames * 0.07, "decode": frames * 0.04}[kind]
            first = sid in ("keyframe:a", "video:a:0")  # each model's first stage on this worker: +12 s load
            rows.append({"stage": sid, "tier": "high", "worker": f"w{worker_offset}", "start": start,
                         "seconds": seconds + (12.0 if first else 0.0), "outcome": "succeeded", "cache_hit": 0})
            start += 100
        return rows, dict(work)

    costs, measured = fit([ledger(0), ledger(1)])
    assert costs["high"].keyframe_step_s == pytest.approx(0.05)
    assert costs["high"].video_frame_step_s == pytest.approx(0.07)
    assert costs["high"].decode_frame_s == pytest.approx(0.04)
    assert costs["high"].load_s == pytest.approx(12.0)
    assert sorted(measured["high"]) == ["decode", "keyframe", "load", "video"] and "low" not in measured
    assert costs["low"] == DEFAULT_COSTS["low"]


def test_costs_file_round_trip_and_refusals(tmp_path):
    from farm.calibration import load_costs, write_costs

    path = tmp_path / "costs.yaml"
    mine = dict(DEFAULT_COSTS) | {"mid": TierCost(0.1, 0.2, 9.0, 0.05)}
    write_costs(path, mine, {"mid": ["keyframe", "load"]}, ["/renders/one"])
    text = yaml.safe_load(path.read_text())
    assert text["tiers"]["mid"]["assumed"] is False and text["tiers"]["low"]["assumed"] is True
    assert load_costs(path) == mine
    (tmp_path / "bad.yaml").write_text("tiers: {huge: {load_s: 1}}\n")
    with pytest.raises(ValueError, match=r"tiers\.huge"):
        load_costs(tmp_path / "bad.yaml")
    (tmp_path / "neg.yaml").write_text("tiers: {mid: {load_s: -1}}\n")
    with pytest.raises(ValueError, match="negative"):
        load_costs(tmp_path / "neg.yaml")


# --- deadlines: how many GPUs of which tier ---------------------------------------------------------

def test_durations_parse_and_refuse_naming_the_field():
    from farm.sim.sizing import parse_duration

    assert [parse_duration(x) for x in (90, "90s", "45m", "2h", "1.5d")] == [90, 90, 2700, 7200, 129600]
    for bad in ("soon", "-5m", "0", "31d"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(Exception, match="deadline"):
        manifest_of([{"id": "a", "prompt": "x", "duration": 2.0}], deadline="tomorrow")
    assert manifest_of([{"id": "a", "prompt": "x", "duration": 2.0}], deadline="2h").deadline_s == 7200


def test_sizing_meets_a_deadline_with_the_fewest_gpus_that_do_and_prices_it():
    from farm.sim.sizing import size_for_deadline

    manifest = storyboard(12)
    limits = {"high": 4, "low": 4}
    prices = {"high": 4.0, "low": 1.0}
    alone = {t: simulate(book_of(manifest), {t: 1}).makespan for t in limits}
    everything = simulate(book_of(manifest), limits).makespan
    deadline = (everything + min(alone.values())) / 2  # needs more than one GPU, fewer than all
    sized = size_for_deadline(lambda: book_of(manifest), limits, deadline, prices)
    assert sized.met and sized.makespan_s <= deadline
    assert sized.makespan_s == pytest.approx(simulate(book_of(manifest), sized.cluster).makespan)
    assert 1 < sum(sized.cluster.values()) <= 8
    assert sized.cost == pytest.approx(sum(n * prices[t] for t, n in sized.cluster.items()) * sized.makespan_s / 3600)
    # a deadline below the longest chain cannot be met: it says so, with the most that helped
    tight = size_for_deadline(lambda: book_of(manifest), limits, 1.0, prices)
    assert not tight.met and tight.makespan_s > 1.0
    # no price for a tier: the cost is unknown, not made up
    assert size_for_deadline(lambda: book_of(manifest), {"low": 2}, deadline * 10, {}).cost is None


def test_the_rest_of_a_running_job_simulates_shorter_and_leaves_the_job_alone():
    """`JobBook.rest`: finished stages stay finished, a running one starts again, and simulating the
    copy changes nothing in the live book (deadline sizing runs beside the dispatch loop)."""
    cluster = {"mid": 2}
    whole = simulate(book_of(storyboard(6)), cluster).makespan
    book = book_of(storyboard(6))
    keyframes = [s for s in book.ready(0.0) if s.kind == "keyframe"]
    for stage in keyframes[:-1]:  # finished (as cache hits); the last one is running on a worker
        book.on_cache_hit(stage.id, f"key-{stage.id}", {"tier": "mid"}, 0.0)
    running = keyframes[-1]
    book.dispatched(running.id, "mid-0", "mid", "default", "key-running", 0.0)
    rest = book.rest()
    assert set(rest.done) == set(book.done) and not rest.running and not rest.outbox
    later = simulate(rest, cluster).makespan
    assert 0 < later < whole
    assert rest.complete and not book.complete
    assert set(book.running) == {running.id} and len(book.done) == len(keyframes) - 1


def test_calibration_fits_each_family_per_tier_and_scales_by_size(tmp_path):
    """Rates per family x tier x kind, in work at 1024x576: the same family at a quarter of the pixels
    fits the same rate, another family its own; an unfitted family keeps the tier-wide figure; the
    rates survive the costs file and reach the simulated stage's seconds."""
    from farm.calibration import fit, load_costs, stage_work, write_costs
    from farm.sim.costs import REF_PIXELS, params_seconds

    lock = {"models": {"keyframe": {"family": "flux"}, "video": {"family": "wan"}},
            "shots": [{"id": "a", "keyframe": {"params": {"num_inference_steps": 20, "width": 1024, "height": 576}},
                       "video": {"segments": [{"index": 0, "params": {"num_inference_steps": 10, "num_frames": 9,
                                                                       "width": 512, "height": 288}}]}}]}
    work = stage_work(lock)
    assert work["keyframe:a"] == ("keyframe", 20, 1, "flux", REF_PIXELS)
    assert work["decode:a:0"] == ("decode", 0, 9, "wan", 512 * 288)
    # flux at 0.3 s per step at full size; wan at 0.02 s per frame-step and 0.01 s per decoded frame,
    # both at full size (so a quarter of that at 512x288)
    truth = {"keyframe:a": 20 * 0.3, "video:a:0": 10 * 9 * 0.02 / 4, "decode:a:0": 9 * 0.01 / 4}
    rows = [{"stage": sid, "tier": "mid", "worker": "w", "start": float(i), "seconds": s, "outcome": "succeeded",
             "cache_hit": 0} for i, (sid, s) in enumerate(truth.items())] * 3
    costs, _ = fit([(rows, work)])
    assert costs["mid"].families["flux"]["keyframe"] == pytest.approx(0.3)
    assert costs["mid"].families["wan"] == pytest.approx({"video": 0.02, "decode": 0.01})
    params = {"num_inference_steps": 20, "width": 512, "height": 288}
    assert params_seconds("keyframe", params, costs["mid"], "flux") == pytest.approx(20 * 0.3 / 4)
    assert params_seconds("keyframe", params, costs["mid"], "sdxl") == pytest.approx(20 * costs["mid"].keyframe_step_s)
    write_costs(tmp_path / "costs.yaml", costs, {"mid": ["keyframe"]}, ["x"])
    assert load_costs(tmp_path / "costs.yaml")["mid"].families == costs["mid"].families
