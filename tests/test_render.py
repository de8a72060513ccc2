"""End to end: a storyboard rendered on real Ray with real tiny pipelines and real ffmpeg."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import base_manifest, port_free_again, write_manifest, write_png

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
    assert first["observed"]["steps"] == 50 and first["observed"]["decode_calls"] == 0  # denoising only
    decoded = first["decode"]["observed"]  # its decode stage
    assert decoded["decode_chunk_max"] == 6 and decoded["decode_calls"] == 2  # 8 frames: 6 + 2
    # what another tier would have changed in this shot: the decode chunk (steps are the tier's here)
    assert lock["tier_dependent"]["a"]["decode_chunk_size"] == {"high": 12, "mid": 10, "low": 6, "cpu": 10}
    assert "num_inference_steps" not in lock["tier_dependent"]["b"]  # pinned: alike on every tier
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
    calls = ["a:0", "a:1", "b:0", "c:0", "d:0"]
    assert stages == {"keyframe:a", "keyframe:d", "clip:a", "clip:b", "clip:c", "clip:d", "merge",
                      *(f"video:{c}" for c in calls), *(f"decode:{c}" for c in calls),
                      *(f"qc:{s}" for s in "abcd")}  # every take passed QC: no retakes
    assert all(r["outcome"] == "succeeded" and not r["cache_hit"] for r in rows) and len(rows) == len(stages)
    gpu_rows = [r for r in rows if r["stage"].split(":")[0] in ("keyframe", "video", "decode")]
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
    for seg in a_segments:  # each decode read the latents its denoising wrote
        assert seg["decode"]["input_sha"] == seg["output_sha"]
    assert a_segments[1]["input_sha"] == a_segments[0]["decode"]["output_sha"]
    assert shots["b"]["video"]["segments"][0]["input_sha"] == a_segments[-1]["decode"]["output_sha"]
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
    gpu_rows = [r for r in rows if r["stage"].startswith(("keyframe:", "video:", "decode:"))]
    assert gpu_rows and all(r["cache_hit"] for r in gpu_rows)  # nothing was denoised again


def test_farm_render_uses_the_cache_dir_its_config_names(ray_session, tiny_models, tmp_path):
    """FARM_CACHE_DIR reaches `farm render` as it does `farm serve` (issue 13.18): one config for every
    entry point, and a render under another config gets a director of its own."""
    import os

    from farm.config import load_config
    from farm.driver import render

    path = write_manifest(tmp_path, base_manifest(shots=[{"id": "a", "prompt": "p", "duration": 0.25}]))
    config = load_config(env={**os.environ, "FARM_CACHE_DIR": str(tmp_path / "elsewhere")})[0]
    assert config.cache_path == tmp_path / "elsewhere"
    render(path, tmp_path / "out", models="tiny", workers=1, tier="low", progress=False, config=config)
    cached = {p.suffix for p in (tmp_path / "elsewhere").rglob("*") if p.is_file()}
    assert {".npz", ".json", ".mp4"} <= cached  # every stage's output went to that cache


def test_the_readme_example_renders_as_promised(ray_session, tiny_models, tmp_path):
    """examples/storyboard.yaml at its own sizes (1024x576 video, 1920x1080 keyframes, a 1920x1080 film),
    with two steps and short shots to keep it quick on a CPU (issue 13): its continuous take is a cut,
    every prompt reaches a model or is warned about, and the keyframes are 1920x1080 PNGs."""
    import shutil

    import PIL.Image
    import yaml
    from helpers import REPO

    shutil.copytree(REPO / "examples", tmp_path / "examples")
    path = tmp_path / "examples" / "storyboard.yaml"
    data = yaml.safe_load(path.read_text())
    data["steps"] = {"keyframe": 2, "video": 2}
    for shot in data["shots"]:
        shot["duration"] = 0.6  # 9 frames at 15 fps, longer than the 0.5 s crossfade
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "out"
    assert cli.main(["render", str(path), "-o", str(out), "--models", "tiny", "--tier", "cpu", "--workers", "2",
                     "--quiet"]) == 0
    lock = json.loads((out / "manifest.lock.json").read_text())
    shots = {s["id"]: s for s in lock["shots"]}
    # s02 continues s01 (a cut, no ghosting); s03 and s04 start with a crossfade: 4 x 9 frames less 2 x 0.5 s
    info = probe(out / "final.mp4")
    assert abs(info.duration - (4 * 9 / 15 - 2 * 0.5)) <= 1 / 15 + 1e-6, info.duration
    assert (info.width, info.height) == (1920, 1080)
    # SVD-XT takes no prompt: the prompts of s02 (continues s01) and s03 (its own image) are warned about
    assert [w.split(":")[0] for w in shots["s02-river"]["warnings"]] == ["shots[1].prompt"]
    assert [w.split(":")[0] for w in shots["s03-sunrise"]["warnings"]] == ["shots[2].prompt"]
    assert shots["s01-valley"]["warnings"] == [] and shots["s04-birds"]["warnings"] == []
    assert shots["s01-valley"]["keyframe"]["params"]["prompt"].startswith("misty valley")  # reached SDXL
    for shot in ("s01-valley", "s04-birds"):
        with PIL.Image.open(out / "keyframes" / f"{shot}.png") as png:
            assert png.size == (1920, 1080)
    assert shots["s01-valley"]["video"]["width"] == 1024  # the video at its own size, from the big keyframe


def test_render_with_ui_serves_the_job_page_on_loopback(tmp_path, ray_session, tiny_models, monkeypatch, capsys):
    """`farm render --ui` prints the job page's URL (not the token) and serves the pages over this
    render's director on 127.0.0.1 while it renders and, until Ctrl-C, after."""
    import re

    import httpx
    from ray import serve

    from farm.config import current
    from farm.rayenv import direct_ingress_port
    from farm.tokens import ensure_token

    port = direct_ingress_port()  # the session's: served by the API replica, as a farm started here would
    assert port is not None
    port_free_again(port)
    path = write_manifest(tmp_path, base_manifest(seed=231))
    seen: dict[str, object] = {}

    def while_up() -> None:  # what the person does before pressing Ctrl-C
        printed = capsys.readouterr().out
        url = re.search(r"watch it at (http://127\.0\.0\.1:\d+/ui/jobs/(\w+))", printed)
        assert url, printed
        token = ensure_token(current())[0]
        assert token not in printed
        job = url.group(2)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as web:
            assert web.get(f"/ui/jobs/{job}", follow_redirects=False).status_code == 303  # log in first
            web.post("/ui/login", data={"token": token})
            page = web.get(f"/ui/jobs/{job}")
            seen["page"] = page.status_code == 200 and job in page.text
            seen["state"] = web.get(f"/v1/jobs/{job}", headers={"Authorization": f"Bearer {token}"}).json()["state"]
            film = web.get(f"/v1/jobs/{job}/output", headers={"Authorization": f"Bearer {token}",
                                                               "Range": "bytes=0-99"})
            seen["range"] = film.status_code == 206 and len(film.content) == 100

    monkeypatch.setattr(cli, "_until_ctrl_c", while_up)
    try:
        assert cli.main(["render", str(path), "-o", str(tmp_path / "out"), "--models", "tiny", "--tier", "cpu",
                         "--workers", "2", "--quiet", "--ui", "--port", str(port)]) == 0
    finally:
        serve.shutdown()
    assert seen == {"page": True, "state": "succeeded", "range": True}


def test_calibrate_a_real_render_and_simulate_with_it(tmp_path, ray_session, tiny_models, capsys):
    """`farm calibrate` over a finished render fits the tier it ran on (cpu here) from its ledger and
    lockfile, marks the rest assumed; `farm plan --simulate --costs` plans with the file and says so."""
    import yaml

    path = write_manifest(tmp_path, base_manifest(seed=233))
    out = tmp_path / "out"
    assert cli.main(["render", str(path), "-o", str(out), "--models", "tiny", "--tier", "cpu", "--workers", "2",
                     "--quiet", "--no-cache"]) == 0
    costs = tmp_path / "costs.yaml"
    assert cli.main(["calibrate", str(out), "-o", str(costs)]) == 0
    fitted = yaml.safe_load(costs.read_text())["tiers"]
    assert fitted["cpu"]["assumed"] is False and {"keyframe", "video", "decode"} <= set(fitted["cpu"]["measured"])
    assert fitted["high"]["assumed"] is True
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    keyframes = [r["seconds"] for r in ledger if r["stage"].startswith("keyframe:") and r["outcome"] == "succeeded"]
    assert min(keyframes) / 2 <= fitted["cpu"]["keyframe_step_s"] <= max(keyframes) / 2  # 2 steps each
    # per family too, in work at 1024x576, scaled to the size the keyframes ran at
    assert set(fitted["cpu"]["families"]) == {"sdxl", "svd"}
    size = json.loads((out / "manifest.lock.json").read_text())["shots"][0]["keyframe"]["params"]
    kf = fitted["cpu"]["families"]["sdxl"]["keyframe"] * size["width"] * size["height"] / (1024 * 576)
    assert min(keyframes) / 2 <= kf * 1.0001 and kf <= max(keyframes) / 2 * 1.0001
    (tmp_path / "cluster.yaml").write_text("tiers: {cpu: 2}\n")
    capsys.readouterr()
    assert cli.main(["plan", str(path), "--models", "tiny", "--simulate", str(tmp_path / "cluster.yaml"),
                     "--costs", str(costs)]) == 0
    assert f"costs: calibrated, {costs}" in capsys.readouterr().out
    assert cli.main(["calibrate", str(tmp_path / "nothing"), "-o", str(costs)]) != 0
