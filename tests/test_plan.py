"""Plan shapes: the DAG of keyframe / video segments / clip / merge for each kind of shot."""

from __future__ import annotations

from helpers import base_manifest, write_png

from farm.hashing import derive_seed
from farm.manifest import validate_data
from farm.plan import build_plan, segments_for


def plan_for(shots, tmp_path=None, fpc=8, fps=8):
    data = base_manifest(shots=shots)
    data["output"]["fps"] = fps
    return build_plan(validate_data(data, tmp_path), fpc)


def test_simple_shot_is_keyframe_video_clip_merge():
    plan = plan_for([{"id": "a", "prompt": "p", "duration": 0.5}])
    assert list(plan.stages) == ["keyframe:a", "video:a:0", "decode:a:0", "clip:a", "qc:a", "merge"]
    assert plan.stages["video:a:0"].deps == ("keyframe:a",)
    assert plan.stages["decode:a:0"].deps == ("video:a:0",)  # the latents' decode is a stage of its own
    assert plan.stages["clip:a"].deps == ("decode:a:0",)
    assert plan.stages["qc:a"].deps == ("clip:a",) and not plan.stages["qc:a"].gpu  # measured on the encoder side
    assert plan.stages["merge"].deps == ("qc:a",)  # the film waits for each shot's accepted take


def test_long_shot_is_chained_segments_covering_every_frame():
    plan = plan_for([{"id": "a", "prompt": "p", "duration": 3.0}], fpc=8, fps=8)  # 24 frames
    video = [s for s in plan.stages.values() if s.kind == "video"]
    assert [s.id for s in video] == ["video:a:0", "video:a:1", "video:a:2", "video:a:3"]
    for prev, nxt in zip(video, video[1:], strict=False):
        # each segment starts from the previous one's last decoded frame
        assert nxt.deps == ("decode:" + prev.id.split(":", 1)[1],)
    assert sum(s.segment.kept for s in video) == 24
    assert video[0].segment.drop == 0 and all(s.segment.drop == 1 for s in video[1:])
    assert plan.stages["clip:a"].deps == tuple(f"decode:a:{i}" for i in range(4))
    assert len({s.seed for s in video}) == 4


def test_svd_xt_segments():
    segs = segments_for(45, 25, False)
    assert [(s.frames, s.drop) for s in segs] == [(25, 0), (21, 1)]
    assert sum(s.kept for s in segs) == 45


def test_continue_from_chains_to_previous_shots_last_segment():
    plan = plan_for([{"id": "a", "prompt": "p", "duration": 1.5},
                     {"id": "b", "prompt": "q", "duration": 0.5, "continue_from": "previous"}])
    assert "keyframe:b" not in plan.stages
    assert plan.stages["video:b:0"].deps == ("decode:a:1", "qc:a")  # a's last frame, once a's take passed QC
    assert plan.stages["video:b:0"].segment.drop == 1  # its first frame would repeat a's last frame
    assert plan.shots[1].first_frame_from == "previous"


def test_given_keyframe_skips_text_to_image(tmp_path):
    write_png(tmp_path / "k.png")
    plan = plan_for([{"id": "a", "prompt": "p", "duration": 0.5, "keyframe": "k.png"}], tmp_path)
    assert "keyframe:a" not in plan.stages
    assert plan.stages["video:a:0"].deps == ()
    assert plan.shots[0].first_frame_from == "image"


def test_shot_seeds_derive_from_job_seed_and_id_unless_given():
    plan = plan_for([{"id": "a", "prompt": "p", "duration": 0.5},
                     {"id": "b", "prompt": "p", "duration": 0.5, "seed": 42}])
    assert plan.shots[0].seed == derive_seed(7, "a")
    assert plan.shots[1].seed == 42
    # adding a shot in front does not change another shot's seed
    again = plan_for([{"id": "z", "prompt": "p", "duration": 0.5}, {"id": "a", "prompt": "p", "duration": 0.5}])
    assert again.shots[1].seed == plan.shots[0].seed


def test_frames_follow_duration_and_fps():
    plan = plan_for([{"id": "a", "prompt": "p", "duration": 1.25}], fps=8)
    assert plan.shots[0].frames == 10


def test_critical_path_and_tails():
    plan = plan_for([{"id": "a", "prompt": "p", "duration": 2.0},
                     {"id": "b", "prompt": "p", "duration": 0.5}], fps=8)
    cost = {sid: 1.0 for sid in plan.stages}
    tails = plan.tail_lengths(cost)
    assert tails["merge"] == 1.0
    # 16 frames, 8 per call, each later call re-draws one frame: 8 + 7 + 1 kept -> 3 segments
    assert len(plan.shots[0].segments) == 3
    assert tails["keyframe:a"] == plan.critical_path(cost) == 10.0  # kf, 3 x (denoise, decode), clip, qc, merge
