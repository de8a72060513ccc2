"""End to end: a storyboard rendered on real Ray with real tiny pipelines and real ffmpeg."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import base_manifest, write_manifest, write_png

from farm import cli
from farm.artifacts import load_image, read_png_parameters
from farm.encode import probe, read_frames
from farm.hashing import array_hash
from farm.presets import TIER_PRESETS

pytestmark = pytest.mark.slow

FPS = 8
XFADE = 0.25


def storyboard(tmp_path):
    write_png(tmp_path / "images" / "own.png", (64, 64), (30, 160, 220))
    data = base_manifest(
        output={"fps": FPS, "resolution": "64x64", "final_resolution": "96x96", "preset": "ultrafast",
                "transition": "crossfade", "crossfade_seconds": XFADE},
        steps={"keyframe": 2},  # video steps come from the tier, except where a shot pins them
        shots=[
            # 12 frames at 8 per tiny SVD call: two chained segments; the tier's own steps (low: 50)
            {"id": "a", "prompt": "misty valley at dawn", "duration": 1.5, "motion": "low"},
            {"id": "b", "prompt": "the fog lifts", "duration": 0.5, "continue_from": "previous",
             "steps": {"video": 2}},
            {"id": "c", "prompt": "sunrise over the ridge", "duration": 0.5, "keyframe": "images/own.png",
             "steps": {"video": 2}},
            {"id": "d", "prompt": "birds over the river", "duration": 0.5, "motion_bucket_id": 180,
             "steps": {"video": 2}},
        ],
    )
    return write_manifest(tmp_path, data), data


@pytest.fixture(scope="module")
def two_renders(ray_session, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("story")
    path, data = storyboard(root)
    outs = []
    for name in ("run1", "run2"):
        out = root / name
        # --no-cache: the second run renders every stage again, so equal frames mean determinism
        rc = cli.main(["render", str(path), "-o", str(out), "--models", "tiny", "--workers", "2", "--tier", "low",
                       "--quiet", "--no-cache"])
        assert rc == 0
        outs.append(out)
    return data, outs


def test_outputs_exist(two_renders):
    _, (out, _) = two_renders
    for rel in ["final.mp4", "manifest.lock.json", "ledger.parquet", "shots/a.mp4", "shots/d.mp4",
                "keyframes/a.png", "keyframes/d.png"]:
        assert (out / rel).is_file(), rel
    # shots b (continue_from) and c (own image) have no text-to-image stage, so no generated keyframe
    assert not (out / "keyframes" / "b.png").exists() and not (out / "keyframes" / "c.png").exists()
    assert not list(out.rglob(".*.tmp*")), "no temp files left behind"


def test_final_film_duration_fps_resolution(two_renders):
    data, (out, _) = two_renders
    info = probe(out / "final.mp4")
    durations = [s["duration"] for s in data["shots"]]
    # b continues a (one take: a cut, never a crossfade); c and d each start with one (issue 13.3)
    crossfades = sum(1 for s in data["shots"][1:] if "continue_from" not in s)
    assert crossfades == 2
    expected = sum(durations) - crossfades * XFADE
    assert abs(info.duration - expected) <= 1.0 / FPS + 1e-6, (info.duration, expected)
    assert info.fps == FPS
    assert (info.width, info.height) == (96, 96)
    assert (info.codec, info.pix_fmt, info.faststart) == ("h264", "yuv420p", True)
    for shot in data["shots"]:
        clip = probe(out / "shots" / f"{shot['id']}.mp4")
        assert clip.frames == round(shot["duration"] * FPS) and (clip.width, clip.height) == (64, 64)


def test_lockfile_shows_what_the_pipeline_received(two_renders):
    _, (out, _) = two_renders
    lock = json.loads((out / "manifest.lock.json").read_text())
    assert lock["tiny_models"] is True and "noise" in lock["note"]
    assert lock["models"]["video"]["kind"] == "tiny" and lock["models"]["video"]["family"] == "svd"
    assert {"torch", "diffusers", "ray", "ffmpeg"} <= set(lock["packages"])
    shots = {s["id"]: s for s in lock["shots"]}
    low = TIER_PRESETS["low"]
    a = shots["a"]
    assert a["tier"] == "low"
    assert a["video"]["decode_chunk_size"] == low.decode_chunk[1] == 6
    assert a["video"]["num_inference_steps"] == low.video_steps[0] == 50
    assert a["video"]["motion_bucket_id"] == 60
    first = a["video"]["segments"][0]
    # observed by wrapping the pipeline's own scheduler.step and vae.decode
    assert first["observed"]["steps"] == 50
    assert first["observed"]["decode_chunk_max"] == 6 and first["observed"]["decode_calls"] == 2  # 8 frames: 6 + 2
    # low-tier memory knobs, as applied: no CUDA here, so no offload; SVD's temporal VAE has no slicing
    # (decode_chunk_size is its slicing), SDXL's VAE does
    assert first["knobs"]["forward_chunking"] and not first["knobs"]["cpu_offload"]
    assert a["keyframe"]["knobs"]["vae_slicing"] and a["keyframe"]["knobs"]["forward_chunking"]
    b = shots["b"]["video"]
    assert b["num_inference_steps"] == 2 and b["segments"][0]["observed"]["steps"] == 2
    assert shots["d"]["video"]["motion_bucket_id"] == 180
    assert a["keyframe"]["observed"]["steps"] == 2 and a["keyframe"]["params"]["guidance_rescale"] == 0.7
    assert shots["b"]["first_frame_from"] == "previous" and shots["c"]["first_frame_from"] == "image"
    assert a["seed"] != shots["d"]["seed"]


def test_ledger_has_one_row_per_stage_attempt(two_renders):
    _, (out, _) = two_renders
    rows = pq.read_table(out / "ledger.parquet").to_pylist()
    stages = {r["stage"] for r in rows}
    assert stages == {"keyframe:a", "video:a:0", "video:a:1", "video:b:0", "video:c:0", "keyframe:d", "video:d:0",
                      "clip:a", "clip:b", "clip:c", "clip:d", "merge"}
    assert all(r["outcome"] == "succeeded" and not r["cache_hit"] for r in rows) and len(rows) == len(stages)
    gpu_rows = [r for r in rows if r["stage"].split(":")[0] in ("keyframe", "video")]
    assert {r["tier"] for r in gpu_rows} == {"low"} and len({r["worker"] for r in gpu_rows}) == 2
    assert all(r["end"] >= r["start"] and r["seconds"] >= 0 for r in rows)


def test_keyframe_png_carries_parameters(two_renders):
    _, (out, _) = two_renders
    params = read_png_parameters(out / "keyframes" / "a.png")
    assert params["prompt"] == "misty valley at dawn" and params["num_inference_steps"] == 2
    assert params["model"] == "tiny:sdxl" or params["model"].startswith("tiny")


def test_same_seed_renders_identical_keyframes_and_frames(two_renders):
    _, (run1, run2) = two_renders
    for shot in ("a", "d"):
        assert (run1 / "keyframes" / f"{shot}.png").read_bytes() == (run2 / "keyframes" / f"{shot}.png").read_bytes()
    for shot in ("a", "b", "c", "d"):
        f1, f2 = read_frames(run1 / "shots" / f"{shot}.mp4"), read_frames(run2 / "shots" / f"{shot}.mp4")
        assert np.array_equal(f1, f2), shot


def test_chains_pass_the_exact_frames(two_renders):
    """Segments continue from their predecessor's last frame, `continue_from` from the previous shot's
    last frame, a keyframe shot from its keyframe, and an own-image shot from that image."""
    _, (out, _) = two_renders
    lock = json.loads((out / "manifest.lock.json").read_text())
    shots = {s["id"]: s for s in lock["shots"]}
    a_segments = shots["a"]["video"]["segments"]
    assert a_segments[0]["input_sha"] == shots["a"]["keyframe"]["output_sha"]
    assert a_segments[1]["input_sha"] == a_segments[0]["output_sha"]
    assert shots["b"]["video"]["segments"][0]["input_sha"] == a_segments[-1]["output_sha"]
    own = load_image(out.parent / "images" / "own.png", (64, 64))
    assert shots["c"]["video"]["segments"][0]["input_sha"] == array_hash(own)


def test_rendering_again_after_deleting_the_outputs_writes_them_again(two_renders, tmp_path):
    """The same storyboard, output folder and options is the same job; once it has succeeded, a new
    `farm render` still has to produce the files (here they were deleted), from the cache."""
    import shutil

    data, outs = two_renders
    path = write_manifest(outs[0].parent, data)
    out = tmp_path / "again"
    args = ["render", str(path), "-o", str(out), "--models", "tiny", "--workers", "2", "--tier", "low", "--quiet"]
    assert cli.main(args) == 0
    shutil.rmtree(out)
    assert cli.main(args) == 0
    assert (out / "final.mp4").is_file() and (out / "manifest.lock.json").is_file()
    rows = pq.read_table(out / "ledger.parquet").to_pylist()
    gpu_rows = [r for r in rows if r["stage"].startswith(("keyframe:", "video:"))]
    assert gpu_rows and all(r["cache_hit"] for r in gpu_rows)  # nothing was denoised again
