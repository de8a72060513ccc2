"""Every model family end to end on the real director: each keyframe family with a video family,
chained shots and multi-segment shots, the cache, the OOM ladder and the lockfile."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from helpers import base_manifest

from farm.encode import probe
from farm.families import family

pytestmark = pytest.mark.slow

# Each keyframe family once, each video family once (SVD, the default, is rendered all over the suite).
PAIRS = [("black-forest-labs/FLUX.1-schnell", "Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
         ("stabilityai/stable-diffusion-3.5-medium", "Lightricks/LTX-Video"),
         ("stabilityai/stable-diffusion-xl-base-1.0", "ali-vilab/i2vgen-xl"),
         ("tiny:flux:dev", "tiny:wan:a14b")]


def story(keyframe, video, seed):
    data = base_manifest(seed=seed, models={"keyframe": keyframe, "video": video})
    data["output"].pop("fps")  # the film takes the video model's own rate where it has one
    data["shots"] = [
        {"id": "a", "prompt": "a lighthouse at dusk", "duration": 0.75},
        {"id": "b", "prompt": "waves crash on the rocks", "duration": 0.5, "continue_from": "previous"},
        {"id": "c", "prompt": "gulls over the sea", "duration": 0.25},
    ]
    return data


def wait(ray, director, job_id, timeout=300):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = ray.get(director.status.remote(job_id))
        if status["state"] not in ("queued", "running"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"{job_id} did not finish")


@pytest.fixture(scope="module")
def farm(ray_session, tiny_models, tmp_path_factory):
    from actors.director import get_director
    from farm.config import PolicyConfig
    from farm.pool import PoolConfig

    root = tmp_path_factory.mktemp("families")
    director = get_director(PoolConfig(tier="high", workers=2), name="families", store_path=str(root / "s.db"),
                            cache_dir=str(root / "cache"), policy=PolicyConfig(backoff_s=0.05, reconcile_s=0.3),
                            threads=1)
    yield ray_session, director, root
    ray_session.kill(director, no_restart=True)


@pytest.fixture(scope="module")
def renders(farm):
    ray, director, root = farm
    jobs = {}
    for i, (keyframe, video) in enumerate(PAIRS):
        out = root / f"out{i}"
        job = ray.get(director.submit.remote(story(keyframe, video, 400 + i), str(root), str(out),
                                             options={"models": "tiny"}))
        jobs[(keyframe, video)] = (job["id"], out)
    return {pair: (wait(ray, director, job_id), out) for pair, (job_id, out) in jobs.items()}


@pytest.mark.parametrize("pair", PAIRS)
def test_every_pairing_renders_a_film(renders, pair):
    status, out = renders[pair]
    assert status["state"] == "succeeded", status["error"]
    lock = json.loads((out / "manifest.lock.json").read_text())
    video = family(lock["models"]["video"]["family"])
    variant = video.variant(lock["models"]["video"]["variant"])
    assert lock["tiny_models"] and lock["models"]["keyframe"]["licence"] and lock["licence_note"]
    assert lock["generation_fps"] == (variant.fps or lock["fps"]) and lock["fps"] == (variant.fps or 15)
    for shot, seconds in (("a", 0.75), ("b", 0.5), ("c", 0.25)):
        entry = next(s for s in lock["shots"] if s["id"] == shot)
        assert entry["frames"] == round(seconds * lock["generation_fps"])
        assert all(video.valid_frames(seg["frames"]) or video.frame_step == 1 for seg in entry["video"]["segments"])
        assert sum(seg["kept"] for seg in entry["video"]["segments"]) == entry["frames"]
        clip = probe(out / "shots" / f"{shot}.mp4")
        assert clip.frames == entry["frames"] and clip.fps == lock["generation_fps"]
    # b continues a: its first segment starts from a's last kept frame
    a_last = next(s for s in lock["shots"] if s["id"] == "a")["video"]["segments"][-1]["decode"]["output_sha"]
    assert next(s for s in lock["shots"] if s["id"] == "b")["video"]["segments"][0]["input_sha"] == a_last
    film = probe(out / "final.mp4")
    assert film.fps == lock["fps"] and abs(film.duration - 1.5) <= 1.0 / lock["fps"] + 1e-6


def test_a_second_render_comes_from_the_cache(farm, renders):
    ray, director, root = farm
    keyframe, video = PAIRS[0]
    job = ray.get(director.submit.remote(story(keyframe, video, 400), str(root), str(root / "again"),
                                         options={"models": "tiny"}))
    assert wait(ray, director, job["id"])["state"] == "succeeded"
    rows = pq.read_table(root / "again" / "ledger.parquet").to_pylist()
    assert rows and all(r["cache_hit"] for r in rows)


def test_out_of_memory_descends_the_video_familys_own_ladder(farm, renders):
    ray, director, root = farm
    for worker in ray.get(director.workers_info.remote()):
        ray.get(director.set_faults.remote(worker["id"], [{"match": "*/video:c:0", "kind": "oom", "times": 2}]))
    keyframe, video = PAIRS[0]
    job = ray.get(director.submit.remote(story(keyframe, video, 499), str(root), str(root / "oom"),
                                         options={"models": "tiny"}))
    assert wait(ray, director, job["id"])["state"] == "succeeded"
    rows = [r for r in pq.read_table(root / "oom" / "ledger.parquet").to_pylist() if r["stage"] == "video:c:0"]
    assert [r["outcome"] for r in rows] == ["oom", "oom", "succeeded"]
    # Wan's ladder: VAE tiling and slicing first, then leaf-level group offload
    assert [r["preset"] for r in rows] == ["high+vae_tiling", "high+vae_slicing+vae_tiling",
                                           "high+vae_slicing+group_offload+vae_tiling"]
    for worker in ray.get(director.workers_info.remote()):
        ray.get(director.set_faults.remote(worker["id"], []))


def test_a_model_no_worker_has_is_refused_at_submit(farm):
    """Models are checked where they will load: the director asks a worker, before any GPU work."""
    from farm.manifest import ManifestError

    ray, director, root = farm
    data = story("black-forest-labs/FLUX.1-dev", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", 450)
    with pytest.raises(ManifestError) as info:
        ray.get(director.submit.remote(data, str(root), str(root / "refused")))
    paths = {e.path for e in info.value.errors}
    assert paths == {"models.keyframe", "models.video"}
    assert "accept the FLUX.1 [dev] licence on the hub first" in str(info.value)
    assert not (root / "refused").exists()
