"""Quality control without Ray: the metrics on synthetic clips, the rules, the verdicts, and the job
book's retakes (issue 14)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from helpers import base_manifest

from farm.contract import EncodeResult, JobState, StageKind
from farm.faults import spoil
from farm.jobbook import Emit, JobBook, LedgerRow, PromoteTake
from farm.jobsetup import setup_job
from farm.manifest import ManifestError, validate_data
from farm.qc import METRICS, QcRules, best_take, judge, resolve
from farm.shot_metrics import measure

T, H, W = 16, 72, 128
RNG = np.random.default_rng(7)


def textured(shift=2):
    """A smooth pan over a soft random texture: what a good shot looks like to the metrics."""
    tex = cv2.resize((RNG.random((H // 8, W // 4, 3)) * 255).astype(np.uint8), (W * 2, H),
                     interpolation=cv2.INTER_CUBIC)
    return np.stack([tex[:, shift * t:shift * t + W] for t in range(T)])


SMOOTH = textured()


def clips():
    flicker = SMOOTH.copy()
    flicker[1::2] = 255 - flicker[1::2]
    frozen = SMOOTH.copy()
    frozen[3:] = frozen[3]
    black = (SMOOTH * 0.03).astype(np.uint8)
    hsv = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2HSV) for f in SMOOTH])
    hsv[..., 1] = 250
    saturated = np.stack([cv2.cvtColor(f, cv2.COLOR_HSV2RGB) for f in hsv])
    seam = SMOOTH.copy()
    seam[8:] = np.roll(seam[8:], W // 2, axis=2)
    return {"flicker": flicker, "frozen": frozen, "black": black, "saturated": saturated, "seam": seam}


def test_each_metric_tells_a_bad_clip_from_a_smooth_one():
    good = measure(SMOOTH, start=SMOOTH[0], seams=[8])
    bad = {name: measure(c, start=SMOOTH[0], seams=[8]) for name, c in clips().items()}
    drifting = measure(SMOOTH, start=255 - SMOOTH[0])
    assert bad["flicker"]["flicker"] < good["flicker"] - 0.2
    assert bad["flicker"]["ssim_min"] < good["ssim_min"]
    assert bad["frozen"]["frozen"] > 0.8 and good["frozen"] == 0.0
    assert bad["black"]["black"] == 1.0 and good["black"] == 0.0
    assert bad["saturated"]["saturation"] > good["saturation"] + 0.2
    assert bad["seam"]["seam"] > 3 * good["seam"]
    assert good["drift"] < 0.01 and drifting["drift"] > 0.3
    gates = resolve(None, None)
    assert judge(good, gates).passed, judge(good, gates)
    expected = {"flicker": "flicker", "frozen": "frozen", "black": "black", "saturated": "saturation", "seam": "seam"}
    for name, metric in expected.items():
        assert metric in judge(bad[name], gates).failed, (name, bad[name])
    assert judge(drifting, gates).failed == ("drift",)
    assert len(good["curves"]["difference"]) == T - 1 and len(good["curves"]["flow"]) == T - 1


def test_injected_bad_clips_fail_the_tiny_gates_that_tiny_noise_passes():
    """Tiny random weights make noise; their gates are explicit (METRICS[...].tiny), and still catch
    frozen, black and flickering clips made by the fault hook."""
    noise = np.clip(SMOOTH.astype(int) + RNG.integers(-20, 20, SMOOTH.shape), 0, 255).astype(np.uint8)
    gates = resolve(None, None, tiny=True)
    assert gates.thresholds["flicker"] == METRICS["flicker"].tiny
    assert judge(measure(noise, start=noise[0]), gates).passed
    for kind, metric in (("frozen", "frozen"), ("black", "black"), ("flicker", "flicker")):
        bad = spoil([{"match": "*/decode:*", "kind": kind}], "j/decode:a:0", noise)
        assert metric in judge(measure(bad, start=noise[0]), gates).failed, kind


def test_rules_layer_config_job_and_shot():
    config = {"thresholds": {"flicker": 0.5}, "retakes": 2}
    job = QcRules(thresholds={"black": 0.1}, on_fail="fail")
    shot = QcRules(gate=["flicker", "black"], retakes=0)
    gates = resolve(job, shot, config=config)
    assert dict(gates.thresholds) == {"flicker": 0.5, "black": 0.1} and gates.retakes == 0 and gates.on_fail == "fail"
    assert resolve(job, None, config=config).retakes == 2
    off = resolve(QcRules(enabled=False), None)
    assert not off.enabled and off.retakes == 0


def test_manifest_qc_errors_name_the_field():
    data = base_manifest(qc={"retakes": 7, "thresholds": {"flickr": 0.5}})
    data["shots"][0]["qc"] = {"on_fail": "panic"}
    with pytest.raises(ManifestError) as info:
        validate_data(data)
    paths = {e.path for e in info.value.errors}
    assert {"qc.retakes", "qc.thresholds.flickr", "shots[0].qc.on_fail"} <= paths, paths


def test_best_take_is_the_fewest_failed_gates_then_the_smallest_miss():
    gates = resolve(None, QcRules(gate=["flicker", "black"]))
    slightly = judge({"flicker": 0.84, "black": 0.0}, gates)
    badly = judge({"flicker": 0.30, "black": 0.0}, gates)
    twice = judge({"flicker": 0.84, "black": 0.9}, gates)
    assert best_take([badly, slightly, twice]) == 1
    assert best_take([slightly, slightly]) == 0  # a tie keeps the earlier take


# --- the job book: QC stages and retakes ---------------------------------------------------------


SHOTS = [{"id": "a", "prompt": "valley", "duration": 0.5}, {"id": "b", "prompt": "river", "duration": 0.5,
                                                            "continue_from": "previous"}]
GOOD = {"flicker": 0.95, "frozen": 0.0, "black": 0.0, "saturation": 0.4, "drift": 0.1, "seam": None}


def book_of(qc=None, shots=SHOTS):
    data = base_manifest(shots=[dict(s) for s in shots])
    if qc is not None:
        data["qc"] = qc
    return JobBook("j", setup_job(data, "/nonexistent", {"models": "tiny"}), "/out")


def drive(book, metrics_for, until=None):
    """Run every ready stage at once (GPU ones with a plain result, QC ones with `metrics_for(stage)`),
    until the book is complete or `until` is done."""
    from test_jobbook import result

    now = 0.0
    while book.active and not book.complete and (until is None or until not in book.done):
        ready = book.ready(now)
        assert ready, f"stuck: {sorted(set(book.plan.stages) - set(book.done))}"
        for stage in ready:
            now += 1
            if stage.gpu:
                req = book.request(stage.id, "mid")
                book.dispatched(stage.id, "w", "mid", req.preset, req.output_key, now, 1.0, req.params)
                book.on_success(stage.id, result("w", "mid"), now + 0.5)
                continue
            req = book.encode_request(stage.id)
            book.dispatched(stage.id, "encoder", "cpu", "encode", req.output_key, now)
            out = EncodeResult(metrics=metrics_for(stage.id)) if stage.kind == StageKind.QC else EncodeResult(4)
            book.on_success(stage.id, out, now + 0.5)
    return book


def test_qc_is_a_cpu_stage_between_the_clip_and_the_merge_and_chained_shots_wait_for_it():
    book = book_of()
    plan = book.plan
    assert plan.stages["qc:a"].deps == ("clip:a",) and not plan.stages["qc:a"].gpu
    assert plan.stages["merge"].deps == ("qc:a", "qc:b")
    assert "qc:a" in plan.stages["video:b:0"].deps  # b continues a's accepted take
    drive(book, lambda sid: GOOD)
    assert book.complete and book.done["qc:a"].record["accepted"] == 1
    assert not [s for s in book.plan.stages if "~take" in s]


def test_a_failed_take_is_retaken_with_a_new_seed_and_what_waited_follows_the_new_take():
    book = book_of()
    frozen = GOOD | {"frozen": 0.9}
    drive(book, lambda sid: frozen if sid == "qc:a" else GOOD)
    assert book.state == JobState.RUNNING or book.complete
    stages = book.plan.stages
    assert {"video:a:0~take2", "decode:a:0~take2", "clip:a~take2", "qc:a~take2"} <= set(stages)
    assert "keyframe:a~take2" not in stages  # frozen is not the keyframe's fault: same first frame
    assert stages["video:a:0~take2"].deps == stages["video:a:0"].deps
    assert stages["video:a:0~take2"].seed != stages["video:a:0"].seed
    assert book.request("video:a:0~take2", "mid").output_key != book.request("video:a:0", "mid").output_key
    assert stages["merge"].deps == ("qc:a~take2", "qc:b")
    assert stages["video:b:0"].deps == ("decode:a:0~take2", "qc:a~take2")
    final = book.done["qc:a~take2"].record
    assert final["accepted"] == 2 and [t["passed"] for t in final["takes"]] == [False, True]
    assert book.encode_request("merge").options  # the merge runs on the accepted clips
    effects = book.drain()
    assert any(isinstance(e, PromoteTake) and e.take == 2 for e in effects)
    rows = [e.row for e in effects if isinstance(e, LedgerRow) and e.row["stage"].startswith("qc:a")]
    assert [r["note"] for r in rows] == ["failed frozen (take 1)", "passed (take 2)"]
    events = [e.event for e in effects if isinstance(e, Emit) and e.event["type"] in ("qc", "qc_retake")]
    assert [e["type"] for e in events][:3] == ["qc", "qc_retake", "qc"]


def test_a_saturated_keyframe_is_drawn_again():
    book = book_of(shots=SHOTS[:1])
    drive(book, lambda sid: GOOD | {"saturation": 0.99} if sid == "qc:a" else GOOD)
    stages = book.plan.stages
    assert stages["video:a:0~take2"].deps == ("keyframe:a~take2",)
    assert book.request("keyframe:a~take2", "mid").params["seed"] != book.request("keyframe:a", "mid").params["seed"]


def test_when_every_take_fails_the_best_is_kept_or_the_job_fails():
    black = GOOD | {"black": 1.0}
    worse = GOOD | {"black": 1.0, "frozen": 1.0}
    book = drive(book_of({"retakes": 1}), lambda sid: black if sid in ("qc:a", "qc:b") else worse)
    assert book.complete
    assert book.plan.stages["video:b:0"].deps == ("decode:a:0", "qc:a~take2")  # b continues the take kept
    final = book.done["qc:a~take2"].record
    assert final["accepted"] == 1 and final["accepted_passed"] is False and final["clip_key"] == book.done["clip:a"].key
    assert not any(isinstance(e, PromoteTake) for e in book.drain())  # take 1 stays the shot's clip

    failing = book_of({"retakes": 0, "on_fail": "fail"}, SHOTS[:1])
    drive(failing, lambda sid: black)
    assert failing.state == JobState.FAILED and "shot a failed quality control" in (failing.error or "")


def test_qc_off_measures_but_never_retakes():
    book = drive(book_of({"enabled": False}, SHOTS[:1]), lambda sid: GOOD | {"black": 1.0})
    assert book.complete and book.done["qc:a"].record["accepted"] == 1
    assert book.done["qc:a"].record["metrics"]["black"] == 1.0


def test_a_requeued_job_finds_its_retakes_planned_and_judges_them_again():
    book = book_of(shots=SHOTS[:1])
    metrics = lambda sid: GOOD | {"black": 1.0} if sid == "qc:a" else GOOD  # noqa: E731
    drive(book, metrics)
    stages = dict(book.plan.stages)
    book.requeue()
    drive(book, metrics)
    assert book.complete and book.plan.stages == stages and book.done["qc:a~take2"].record["accepted"] == 2


def test_qc_metrics_count_each_gate_checked_and_each_retake():
    from farm.metrics import qc_metrics

    book = book_of(shots=SHOTS[:1])
    drive(book, lambda sid: GOOD | {"frozen": 0.9} if sid == "qc:a" else GOOD)
    takes = [{"job": "j", "shot": "a"} | json.loads(e.row["qc"])
             for e in book.drain() if isinstance(e, LedgerRow) and e.row["qc"]]
    checks, retakes = qc_metrics(takes + takes)  # a re-render's cache hits count once
    counted = {(s.labels["metric"], s.labels["outcome"]): s.value for s in checks.samples}
    assert counted[("frozen", "failed")] == 1 and counted[("frozen", "passed")] == 1
    assert counted[("flicker", "passed")] == 2 and counted[("black", "failed")] == 0
    assert [s.value for s in retakes.samples] == [1]
