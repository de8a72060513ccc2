"""Farm overhead: the same shots through the farm and through a bare sequential diffusers loop.

Both sides run the same pipelines with the same effective parameters (tiny models, CPU) and encode
with the same ffmpeg settings; the bare loop is what a hand-rolled script would do. Reported:
farm / bare excluding start-up (Ray, actors, model loads) and including it.

    python -m bench.overhead [--manifest examples/storyboard.yaml] [--preview] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from bench.report import table, write_section
from farm.artifacts import load_image
from farm.driver import render
from farm.effective import keyframe_params, video_params
from farm.encode import encode_clip, merge_clips
from farm.gpu.loading import load_pipeline
from farm.gpu.stages import to_uint8
from farm.jobsetup import encode_settings, merge_options, resolve_models
from farm.manifest import inside_root, load
from farm.plan import build_plan
from farm.preview import preview


def bare_loop(manifest, root: Path, out: Path) -> tuple[float, float, float]:
    """A plain script: load both pipelines, then for each shot call SDXL, chain SVD calls, encode.
    Returns (load seconds, render seconds, seconds inside pipeline calls)."""
    specs = resolve_models(manifest, root, "tiny")
    plan = build_plan(manifest, specs["video"])
    t0 = time.perf_counter()
    sdxl = load_pipeline(specs["keyframe"])
    svd = load_pipeline(specs["video"])
    for pipe in (sdxl, svd):
        pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    settings = encode_settings(manifest)
    last: np.ndarray | None = None
    clips = []
    in_calls = 0.0
    for sp in plan.shots:
        if sp.first_frame_from == "keyframe":
            p = keyframe_params(manifest, sp, specs["keyframe"])
            t = time.perf_counter()
            out_img = sdxl(prompt=p["prompt"], negative_prompt=p["negative_prompt"], width=p["width"],
                           height=p["height"], num_inference_steps=p["num_inference_steps"],
                           guidance_scale=p["guidance_scale"], guidance_rescale=p["guidance_rescale"],
                           generator=torch.Generator("cpu").manual_seed(p["seed"]), output_type="np").images[0]
            in_calls += time.perf_counter() - t
            image = to_uint8(out_img)
        elif sp.first_frame_from == "image":
            image = load_image(inside_root(root, sp.shot.keyframe), manifest.output.size)
        else:
            image = last
        frames = []
        preset = specs["video"].rules.preset("cpu", manifest.quality, sp.shot.scene)
        for seg in sp.segments:
            stage = plan.stages[f"video:{sp.shot.id}:{seg.index}"]
            p = video_params(manifest, sp, seg, stage.seed, specs["video"], preset, plan.film_fps)
            t = time.perf_counter()
            video = svd(image=PIL.Image.fromarray(image), width=p["width"], height=p["height"],
                        num_frames=p["num_frames"], num_inference_steps=p["num_inference_steps"],
                        decode_chunk_size=p["decode_chunk_size"], fps=p["fps"],
                        motion_bucket_id=p["motion_bucket_id"], noise_aug_strength=p["noise_aug_strength"],
                        generator=torch.Generator("cpu").manual_seed(p["seed"]), output_type="np").frames[0]
            in_calls += time.perf_counter() - t
            video = to_uint8(np.asarray(video))
            frames.append(video[seg.drop:seg.drop + seg.kept])
            image = last = video[seg.drop + seg.kept - 1]
        clip = out / "shots" / f"{sp.shot.id}.mp4"
        encode_clip(np.concatenate(frames), plan.fps, clip, settings)
        clips.append(clip)
    merge_clips(clips, out / "final.mp4", settings, **merge_options(manifest, plan.film_fps))
    return loaded - t0, time.perf_counter() - loaded, in_calls


def farm_call_seconds(lock: dict) -> float:
    """Seconds the farm's workers spent inside pipeline calls, as they observed them."""
    total = 0.0
    for shot in lock["shots"]:
        if shot["keyframe"]:
            total += shot["keyframe"]["observed"]["seconds"]
        total += sum(seg["observed"]["seconds"] + seg["decode"]["observed"]["seconds"]
                     for seg in shot["video"]["segments"])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default="examples/storyboard.yaml")
    ap.add_argument("--full", action="store_true", help="render at the manifest's real size and steps (slow on CPU)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating timed runs of each side; the best is reported")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import ray

    path = Path(args.manifest)
    manifest = load(path) if args.full else preview(load(path))
    torch.set_num_threads(os.cpu_count() or 1)
    opts = {"models": "tiny", "workers": 1, "tier": "cpu", "progress": False, "draft": not args.full}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # First film from nothing, each side: Ray + director + worker + model loads + render, vs. loading
        # two pipelines + render. Start-up is that minus a steady render (below).
        t0 = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        render(path, out / "farm-warm", cache=False, **opts)
        farm_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        bare_loop(manifest, path.parent, out / "bare-warm")
        bare_first = time.perf_counter() - t0
        bare_runs, farm_runs = [], []
        for i in range(args.repeat):
            # Alternate the sides so drift in the machine's speed hits both alike. Both are steady state:
            # models resident, kernels warm; --no-cache so the farm renders every stage again.
            bare_runs.append(bare_loop(manifest, path.parent, out / f"bare{i}")[1:])
            result = render(path, out / f"farm{i}", cache=False, **opts)
            farm_runs.append((result.render_seconds, farm_call_seconds(result.lock)))
        ray.shutdown()
    bare, bare_calls = min(bare_runs)
    farm_render, farm_calls = min(farm_runs)
    farm_start, bare_start = farm_first - farm_render, bare_first - bare
    shots = len(manifest.shots)
    rows = [
        {"": "bare diffusers loop", "start-up s": f"{bare_start:.2f}", "render s": f"{bare:.2f}",
         "render s/shot": f"{bare / shots:.2f}", "in pipeline calls s": f"{bare_calls:.2f}"},
        {"": "farm, 1 worker", "start-up s": f"{farm_start:.2f}", "render s": f"{farm_render:.2f}",
         "render s/shot": f"{farm_render / shots:.2f}", "in pipeline calls s": f"{farm_calls:.2f}"},
    ]
    ratio_ex = farm_render / bare
    ratio_in = (farm_start + farm_render) / (bare_start + bare)
    spread = [f"{r[0]:.1f}" for r in bare_runs], [f"{r[0]:.1f}" for r in farm_runs]
    body = (f"Storyboard: `{args.manifest}`{'' if args.full else ' as a --preview draft'}, {shots} shots, tiny "
            "models, tier cpu, 1 worker. Both sides run the same pipelines with the same effective parameters "
            "and ffmpeg settings, steady state (after one warm-up run each; the farm with --no-cache), best of "
            f"{args.repeat} alternating runs (render s per run: bare {', '.join(spread[0])}; "
            f"farm {', '.join(spread[1])}). Start-up = the first film's wall time from nothing minus a steady "
            "render: Ray, director, worker process, model loads and first-call warm-up.\n\n")
    body += table(rows) + "\n\n"
    body += (f"- farm / bare, excluding start-up: **{ratio_ex:.3f}** ({(ratio_ex - 1) * 100:+.1f}% per shot; "
             "target: under +5%)\n"
             f"- farm / bare, including start-up: **{ratio_in:.3f}**\n"
             f"- time inside pipeline calls, farm / bare: **{farm_calls / bare_calls:.3f}**; the rest of the "
             f"render is encoding, dispatch and I/O ({bare - bare_calls:.2f} s bare, {farm_render - farm_calls:.2f} s "
             "farm).\n")
    print(body)
    if not args.no_write:
        write_section("overhead", "Farm overhead vs. a bare diffusers loop (issue 2)",
                      "python -m bench.overhead" + (" --full" if args.full else ""), body)


if __name__ == "__main__":
    main()
