"""Model families as plug-ins: each family's pure rules (frames, sizes, presets, parameter mapping,
licences) and the refusals at validation. Their GPU halves run in tests/test_families_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import base_manifest, write_manifest

from farm.families import FAMILIES, ShotInputs, family, for_role
from farm.families.i2vgen import adaptive_guidance, i2vgen_guidance
from farm.families.svd import motion_bucket
from farm.jobbook import JobBook
from farm.jobsetup import setup_job
from farm.manifest import ManifestError, validate_data
from farm.models import ModelError, resolve_model
from farm.plan import segments_for

KEYFRAME_FAMILIES = ("sdxl", "flux", "sd3")
VIDEO_FAMILIES = ("svd", "i2vgen", "wan", "ltx")


def test_every_family_is_found_and_named_once():
    assert set(FAMILIES) == set(KEYFRAME_FAMILIES + VIDEO_FAMILIES)
    assert {f.name for f in for_role("keyframe")} == set(KEYFRAME_FAMILIES)
    assert {f.name for f in for_role("video")} == set(VIDEO_FAMILIES)
    for fam in FAMILIES.values():
        assert fam.default_variant in fam.variants and fam.variants[fam.default_variant].repo


@pytest.mark.parametrize(("source", "family_name", "variant", "frames"), [
    ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "base", 1),
    ("black-forest-labs/FLUX.1-schnell", "flux", "schnell", 1),
    ("black-forest-labs/FLUX.1-dev", "flux", "dev", 1),
    ("stabilityai/stable-diffusion-3.5-medium", "sd3", "medium", 1),
    ("stabilityai/stable-diffusion-3.5-large", "sd3", "large", 1),
    ("stabilityai/stable-video-diffusion-img2vid-xt", "svd", "xt", 25),
    ("stabilityai/stable-video-diffusion-img2vid", "svd", "base", 14),
    ("ali-vilab/i2vgen-xl", "i2vgen", "base", 16),
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "wan", "ti2v-5b", 121),
    ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "wan", "i2v-14b", 81),
    ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "wan", "a14b", 81),
    ("Lightricks/LTX-Video", "ltx", "dev", 121),
])
def test_official_hub_ids_are_recognised(source, family_name, variant, frames):
    role = family(family_name).role
    spec = resolve_model(role, source)
    assert (spec.family, spec.variant, spec.frames_per_call) == (family_name, variant, frames)
    tiny = resolve_model(role, f"tiny:{family_name}:{variant}")
    assert tiny.family == family_name and tiny.variant == variant and tiny.is_tiny


@pytest.mark.parametrize(("role", "source", "needle"), [
    ("keyframe", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "Wan 2.x (image-to-video), which cannot be the keyframe model"),
    ("video", "black-forest-labs/FLUX.1-schnell", "cannot be the video model"),
    ("video", "someone/my-video-model", "no model family recognises it"),
    ("video", "tiny:sdxl", "cannot be the video model"),
    ("video", "tiny:wan:nope", "has no variant 'nope'"),
])
def test_bad_pairings_are_refused(role, source, needle):
    with pytest.raises(ModelError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        resolve_model(role, source)


def test_local_folders_are_recognised_by_their_pipeline_class(tmp_path):
    wan = tmp_path / "wan5b"
    wan.mkdir()
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    spec = resolve_model("video", str(wan))
    assert (spec.family, spec.variant, spec.kind, spec.frames_per_call) == ("wan", "ti2v-5b", "dir", 121)
    ltx = tmp_path / "ltx"
    ltx.mkdir()
    (ltx / "model_index.json").write_text(json.dumps({"_class_name": "LTXImageToVideoPipeline"}))
    assert resolve_model("video", str(ltx)).family == "ltx"
    with pytest.raises(ModelError, match="cannot be the keyframe model"):
        resolve_model("keyframe", str(ltx))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("video", str(tmp_path / "missing-model"))


# --- frames and sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "needed", "top", "made"), [
    # buckets of a half, three quarters and all of a call, rounded up to what the model makes
    ("svd", 1, 25, 13), ("svd", 17, 25, 19), ("svd", 20, 25, 25), ("svd", 25, 25, 25),  # never 2 frames
    ("wan", 1, 81, 41), ("wan", 42, 81, 61), ("wan", 81, 81, 81), ("wan", 80, 81, 81),  # 4k+1
    ("ltx", 1, 121, 65), ("ltx", 66, 121, 97), ("ltx", 121, 121, 121),  # 8k+1
])
def test_frame_count_rules(name, needed, top, made):
    fam = family(name)
    assert fam.call_frames(needed, top) == made
    assert fam.valid_frames(made)


def test_segments_follow_the_frame_rule_and_drop_what_they_need_not_show():
    wan = family("wan")
    segments = segments_for(30, 9, False, lambda n: wan.call_frames(n, 9))
    assert [(s.frames, s.drop, s.kept) for s in segments] == [(9, 0, 9), (9, 1, 8), (9, 1, 8), (9, 1, 5)]
    assert sum(s.kept for s in segments) == 30 and all(wan.valid_frames(s.frames) for s in segments)


def test_a_job_of_many_shot_lengths_asks_for_few_call_shapes():
    """Each distinct call length is a recompile of the denoiser per worker (issue 13.15): shots of
    twelve lengths must not give twelve shapes, nor ask SVD-XT for a 2-frame call."""
    shots = [{"id": f"s{i}", "prompt": "p", "duration": 0.4 + 0.37 * i} for i in range(12)]
    xt = "stabilityai/stable-video-diffusion-img2vid-xt"
    data = base_manifest(shots=shots, models={"keyframe": "tiny", "video": xt})
    setup = setup_job(data, "/nonexistent", {"models": "tiny"})
    lengths = setup.plan.call_lengths()
    top = setup.specs["video"].frames_per_call
    assert lengths <= set(family("svd").call_buckets(top)) and len(lengths) <= 3
    assert min(lengths) >= top // 2
    assert [sum(s.kept for s in sp.segments) for sp in setup.plan.shots] == [sp.frames for sp in setup.plan.shots]


def test_wan_generates_at_its_own_rate_and_the_film_keeps_its_own():
    data = base_manifest(models={"keyframe": "tiny", "video": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"})
    data["output"].pop("fps")
    setup = setup_job(data, "/nonexistent", {"models": "tiny"})
    assert (setup.plan.fps, setup.plan.film_fps) == (24, 24)  # no film rate given: the model's
    data["output"]["fps"] = 12
    setup = setup_job(data, "/nonexistent", {"models": "tiny"})
    assert (setup.plan.fps, setup.plan.film_fps) == (24, 12)  # generated at 24, merged at 12
    assert setup.plan.shots[0].frames == 24  # 1 s at the generation rate
    assert setup.merge_options["fps"] == 12


@pytest.mark.parametrize(("video", "resolution", "ok"), [
    ("tiny:wan", "64x64", True), ("tiny:wan", "64x48", False),  # TI2V: multiples of 32
    ("tiny:wan:i2v-14b", "64x48", True), ("tiny:ltx", "96x64", True), ("tiny:ltx", "80x64", False),
    ("tiny", "8x8", False), ("tiny", "24x24", False), ("tiny", "40x32", True),
])
def test_sizes_a_family_cannot_make_are_refused_naming_the_field(video, resolution, ok):
    data = base_manifest(models={"keyframe": "tiny:sdxl", "video": video})
    data["output"]["resolution"] = resolution
    if ok:
        validate_data(data)
        return
    with pytest.raises(ManifestError) as info:
        validate_data(data)
    assert any(e.path == "output.resolution" for e in info.value.errors), str(info.value)


# --- parameters and presets -----------------------------------------------------------------------------


def inputs(**over):
    base = {"prompt": "a lighthouse", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 7, "seed": 3,
            "frames": 9, "fps": 12}
    return ShotInputs(**(base | over))


def test_parameter_mapping_per_family():
    assert family("sdxl").call_params(inputs(guidance_rescale=0.7)) == {
        "prompt": "a lighthouse", "negative_prompt": "blurry", "width": 64, "height": 64, "num_inference_steps": 7,
        "guidance_scale": 7.5, "guidance_rescale": 0.7, "seed": 3}
    schnell = family("flux").call_params(inputs(guidance_scale=9.0), "schnell")
    assert schnell["guidance_scale"] == 0.0 and "negative_prompt" not in schnell  # distilled: its own guidance
    assert family("flux").call_params(inputs(), "dev")["guidance_scale"] == 3.5
    assert family("sd3").call_params(inputs())["guidance_scale"] == 4.5
    wan = family("wan").call_params(inputs(), "a14b")
    assert wan["num_frames"] == 9 and wan["guidance_scale_2"] == 3.5 and wan["prompt"] == "a lighthouse"
    ltx = family("ltx").call_params(inputs(), "distilled")
    assert ltx["frame_rate"] == 25 and ltx["guidance_scale"] == 1.0 and ltx["decode_timestep"] == 0.05
    svd = family("svd").call_params(inputs(motion="high", motion_level="high", decode_chunk_size=4))
    assert svd["motion_bucket_id"] == 200 and svd["fps"] == 12 and "prompt" not in svd
    assert family("i2vgen").call_params(inputs(prompt="a dog jumping"))["guidance_scale"] >= 11.0


def test_steps_pinned_distilled_and_per_quality():
    assert family("flux").steps("balanced", "mid", 30, "schnell") == 4  # distilled: its own steps, pins or not
    assert family("flux").steps("high", "mid", None, "dev") == 50
    assert family("wan").steps("fast", "low", 12, "ti2v-5b") == 12  # a pin wins
    assert family("svd").steps("balanced", "low", None) == 50  # the seed's tier table
    assert family("sdxl").steps("balanced", "low", None) == 40  # the seed's template


@pytest.mark.parametrize(("name", "variant", "tier", "on"), [
    ("sdxl", None, "low", {"cpu_offload", "forward_chunking", "vae_slicing"}),
    ("wan", "ti2v-5b", "mid", {"cpu_offload", "vae_tiling"}),  # about 24 GB with model offload
    ("wan", "i2v-14b", "mid", {"group_offload", "vae_tiling"}),  # about 13 GB with leaf-level group offload
    ("wan", "i2v-14b", "low", {"group_offload", "vae_tiling", "fp8_storage"}),
    ("flux", None, "high", set()), ("ltx", None, "low", {"cpu_offload", "vae_tiling"}),
])
def test_presets_per_tier(name, variant, tier, on):
    assert family(name).knobs(tier, variant).on() == on


def test_wan_ladder_ends_in_fp8_storage():
    wan = family("wan")
    preset = wan.preset("high", "balanced", "smooth", "ti2v-5b")
    labels = [preset.label()]
    while (preset := wan.next_preset(preset, "balanced", "smooth", "ti2v-5b")) is not None:
        labels.append(preset.label())
    assert labels[0] == "high+vae_tiling" and labels[-1].endswith("fp8_storage")
    assert "group_offload" in labels[-1] and len(labels) == len(set(labels))


def test_book_requests_carry_each_familys_parameters():
    for keyframe in KEYFRAME_FAMILIES:
        for video in VIDEO_FAMILIES:
            data = base_manifest(models={"keyframe": f"tiny:{keyframe}", "video": f"tiny:{video}"})
            data["shots"][1]["continue_from"] = "previous"
            book = JobBook("j", setup_job(data, "/nonexistent"), "/out")
            kf = book.request("keyframe:a", "mid")
            expected = family(keyframe).call_params(inputs(), kf.model.variant)
            assert kf.model.family == keyframe and set(kf.params) == set(expected)
            size = family(keyframe).render_size(120, 120, kf.model.variant)  # the seed's 1.875x of 64x64
            assert kf.params["prompt"] == "misty valley at dawn" and (kf.params["width"], kf.params["height"]) == size
            assert kf.frame_size == (120, 120)  # drawn at the family's multiple, cropped back
            book.dispatched("keyframe:a", "w", "mid", kf.preset, kf.output_key, 0)
            from farm.contract import StageResult

            book.on_success("keyframe:a", StageResult("w", "mid", "cpu", kf.preset, {}, {}, 0.1, "sha"), 1)
            video_req = book.request("video:a:0", "mid")
            assert video_req.model.family == video and family(video).valid_frames(video_req.params["num_frames"])


def test_licences_reach_the_lockfile_model_entries():
    from farm.lockfile import licence_note, model_entry

    dev = resolve_model("keyframe", "black-forest-labs/FLUX.1-dev")
    entry = model_entry(dev)
    assert entry["commercial"] is False and "Non-Commercial" in entry["licence"]
    assert "FLUX.1 [dev]" in licence_note({"keyframe": dev})
    assert licence_note({"video": resolve_model("video", "tiny:wan")}).startswith("every model")


# --- checked where they will load --------------------------------------------------------------------------


def test_a_hub_model_not_on_this_machine_is_refused_naming_how_to_fetch_it(tmp_path):
    data = base_manifest(models={"keyframe": "black-forest-labs/FLUX.1-schnell", "video": "Lightricks/LTX-Video"})
    path = write_manifest(tmp_path, data)
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty-hf")}
    out = subprocess.run([sys.executable, "-m", "farm.cli", "validate", str(path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 2
    assert "models.keyframe: black-forest-labs/FLUX.1-schnell is not in the local Hugging Face cache" in out.stdout
    assert "huggingface-cli download Lightricks/LTX-Video" in out.stdout
    ok = subprocess.run([sys.executable, "-m", "farm.cli", "validate", str(path), "--models", "tiny"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stdout
    allowed = subprocess.run([sys.executable, "-m", "farm.cli", "validate", str(path)], capture_output=True, text=True,
                             env={**env, "FARM_ALLOW_DOWNLOAD": "1"}, timeout=120)
    assert allowed.returncode == 0, allowed.stdout


def test_farm_families_lists_roles_licences_and_downloads():
    out = subprocess.run([sys.executable, "-m", "farm.cli", "families", "--json"], capture_output=True, text=True,
                         timeout=120)
    rows = {(r["family"], r["variant"]): r for r in json.loads(out.stdout)}
    assert rows[("flux", "dev")]["commercial"] == "check" and rows[("wan", "ti2v-5b")]["frames"] == "121@24fps"
    assert rows[("ltx", "dev")]["download"].startswith("huggingface-cli download Lightricks/LTX-Video")
    assert all(r["installed"] in ("yes", "no") for r in rows.values())
    assert rows[("sd3", "medium")]["tiny"] == "tiny:sd3:medium"



def test_motion_levels_map_to_real_svd_buckets():
    from farm.presets import motion_level

    assert motion_bucket("low", None) == 60 and motion_bucket("medium", None) == 127  # SVD's own default
    assert motion_bucket("high", 33) == 33  # an explicit bucket wins
    # The level that applies: the shot's, else its scene's, else the quality template's (level 2).
    assert motion_level("low", "dynamic", "balanced") == "low"
    assert motion_level(None, "dynamic", "balanced") == "high"
    assert motion_level(None, None, "balanced") == "medium"


@pytest.mark.parametrize(("subjects", "level", "guidance"), [(1, 1, 7.0), (2, 1, 9.0), (1, 2, 9.0), (2, 2, 9.0),
                                                            (3, 2, 9.0), (3, 3, 11.0)])
def test_adaptive_guidance_rule_reads_its_thresholds_as_strict(subjects, level, guidance):
    # docs/sources.md's rule as written (<= 1.5, <= 3.0, else) never reaches 11.0: the score is at most 3.0.
    # Read strictly (< 1.5 -> 7.0, < 3.0 -> 9.0), the top score, three subjects in high motion, gives 11.0.
    assert adaptive_guidance(subjects, level) == guidance


@pytest.mark.parametrize(("prompt", "motion", "subjects", "lo", "hi"), [
    ("leaves gently swaying in the wind", None, 1, 7.0, 8.0),  # micro motion, from the keywords
    ("a person turning her head", None, 1, 9.0, 10.0),
    ("a dog jumping over a fence", None, 1, 11.0, 12.0),
    ("camera zooming in slowly on a house", None, 1, 10.0, 11.0),
    ("waves crashing while the camera pans right", None, 2, 11.0, 12.5),
    ("a dog jumping over a fence", "low", 1, 7.0, 7.0),  # an explicit motion always wins over keywords
])
def test_i2vgen_guidance_follows_motion_type(prompt, motion, subjects, lo, hi):
    assert lo <= i2vgen_guidance(prompt, motion, subjects) <= hi


@pytest.mark.parametrize(("prompt", "motion", "expected"), [
    ("portrait of a brunette woman", "low", 7.0),  # "run" inside "brunette" is no keyword
    ("a panoramic view of the bay", None, 9.0),  # "pan" inside "panoramic" is no camera move
    ("breathtaking sunrise", "high", 11.0),  # "breath" inside "breathtaking" does not make it calm
    ("she runs along the beach", None, 11.0),  # an inflection is still the keyword
])
def test_motion_keywords_are_whole_words_and_never_overrule_the_shot(prompt, motion, expected):
    assert i2vgen_guidance(prompt, motion, 1) == expected


def test_oom_ladder_walks_down_to_the_floor():
    svd = family("svd")
    preset = svd.preset("high", "balanced", "smooth")
    labels = [preset.label()]
    while (preset := svd.next_preset(preset, "balanced", "smooth")) is not None:
        labels.append(preset.label())
    assert labels[0] == "high/chunk12"
    assert labels[1] == "high/chunk12+cpu_offload+forward_chunking+vae_slicing"
    assert labels[2].startswith("mid/chunk10+") and labels[3].startswith("mid/chunk8+")
    assert labels[-1].startswith("low/chunk4+")
    assert len(labels) == len(set(labels))


def test_keyframe_ladder_turns_on_one_memory_knob_per_rung():
    sdxl = family("sdxl")
    preset = sdxl.preset("high", "balanced", "smooth")
    labels = [preset.label()]
    while (preset := sdxl.next_preset(preset, "balanced", "smooth")) is not None:
        labels.append(preset.label())
    assert labels == ["high", "high+cpu_offload", "high+cpu_offload+vae_slicing",
                      "high+cpu_offload+forward_chunking+vae_slicing"]
    low = sdxl.preset("low", "balanced", "smooth")  # the low tier starts with every knob on: no rung below it
    assert sdxl.next_preset(low, "balanced", "smooth") is None




def test_no_code_outside_the_family_files_names_a_family():
    """Adding a family is adding its two files: nothing else in the farm may branch on a family's name."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    names = "|".join(map(re.escape, FAMILIES))
    pattern = re.compile(rf"[\"'](?:{names})[\"']")
    offenders = []
    for folder in ("farm", "actors", "deployments"):
        for path in (repo / folder).rglob("*.py"):
            if {"families"} & set(path.relative_to(repo).parts):
                continue
            offenders += [f"{path.relative_to(repo)}: {m.group(0)}" for m in pattern.finditer(path.read_text())]
    assert offenders == []


# --- real fast drafts -------------------------------------------------------------------------------------


def draft_setup(tmp_path, models, **over):
    data = base_manifest(models=models, **over)
    return setup_job(data, tmp_path, {"preview": True})


def test_a_draft_takes_the_familys_distilled_checkpoint(tmp_path):
    setup = draft_setup(tmp_path, {"keyframe": "tiny:flux:dev", "video": "tiny:ltx"})
    assert (setup.specs["keyframe"].variant, setup.specs["video"].variant) == ("schnell", "distilled")
    assert setup.drafts["keyframe"].distilled and setup.drafts["video"].name == "LTX-Video distilled"
    book = JobBook("j", setup, "/out")
    assert book.request("keyframe:a", "mid").params["num_inference_steps"] == 4
    params = book.params("video:a:0", "mid")
    assert (params["num_inference_steps"], params["guidance_scale"]) == (8, 1.0)


def test_a_draft_without_its_lora_falls_back_and_says_so(tmp_path):
    setup = draft_setup(tmp_path, {"keyframe": "tiny", "video": "tiny:wan"})
    for role in ("keyframe", "video"):
        choice = setup.drafts[role]
        assert not choice.distilled and choice.name == "undistilled, 4 steps"
    assert 'models.paths["draft:sdxl"]' in setup.drafts["keyframe"].note
    assert "models.video_draft" in setup.drafts["video"].note
    assert draft_setup(tmp_path, {"keyframe": "tiny", "video": "tiny"}).drafts["video"].note.endswith(
        "has no distilled path")


def test_a_draft_lora_from_the_manifest_or_the_config(tmp_path):
    from farm.config import FarmConfig, ModelsConfig, install, load_config

    (tmp_path / "lcm.safetensors").write_bytes(b"not read at setup")
    setup = draft_setup(tmp_path, {"keyframe": "tiny", "video": "tiny:wan", "keyframe_draft": "lcm.safetensors"})
    book = JobBook("j", setup, "/out")
    req = book.request("keyframe:a", "mid")
    assert req.loras == ((str(tmp_path / "lcm.safetensors"), 1.0),) and req.scheduler == "LCMScheduler"
    assert (req.params["num_inference_steps"], req.params["guidance_scale"]) == (4, 1.5)
    plain = JobBook("j", setup_job(base_manifest(models={"keyframe": "tiny", "video": "tiny:wan"}), tmp_path,
                                   {"preview": True}), "/out")
    assert plain.request("keyframe:a", "mid").output_key != req.output_key  # the LoRA changes the key
    wan_lora = tmp_path / "wan-distill.safetensors"
    wan_lora.write_bytes(b"x")
    previous = load_config(env={})[0]
    install(FarmConfig(models=ModelsConfig(paths={"draft:wan": str(wan_lora)})))
    try:
        setup = draft_setup(tmp_path, {"keyframe": "tiny", "video": "tiny:wan"})
    finally:
        install(previous)
    choice = setup.drafts["video"]
    assert choice.distilled and choice.lora == str(wan_lora) and setup.loras("video") == ((str(wan_lora), 1.0),)


def test_quality_draft_is_a_preview(tmp_path):
    setup = setup_job(base_manifest(quality="draft", models={"keyframe": "tiny:flux:dev", "video": "tiny"}), tmp_path)
    assert setup.preview and setup.specs["keyframe"].variant == "schnell"


def test_step_cache_where_the_family_takes_it_and_never_on_a_distilled_draft(tmp_path):
    speed = {"step_cache": "first_block", "step_cache_threshold": 0.1}
    setup = setup_job(base_manifest(speed=speed, models={"keyframe": "tiny", "video": "tiny:wan"}), tmp_path)
    assert setup.step_cache == {"video": 0.1}  # SDXL's UNet takes no cache hooks
    book = JobBook("j", setup, "/out")
    assert book.request("keyframe:a", "mid").step_cache is None
    drafted = setup_job(base_manifest(speed=speed, models={"keyframe": "tiny:flux:dev", "video": "tiny:ltx"}),
                        tmp_path, {"preview": True})
    assert drafted.step_cache == {}
    with pytest.raises(ManifestError, match="speed.step_cache"):
        validate_data(base_manifest(speed=speed))  # SDXL + SVD: neither takes it


# --- prompts that reach no model are warned about (issue 13.7) ----------------------------------------

def test_the_readme_examples_unread_prompts_are_warned_about():
    import yaml
    from helpers import REPO

    data = yaml.safe_load((REPO / "examples" / "storyboard.yaml").read_text())
    setup = setup_job(data, REPO / "examples", {"models": "tiny"})  # SVD-XT: takes no prompt
    by_path = {w.path: w.msg for w in setup.warnings}
    assert set(by_path) == {"shots[1].prompt", "shots[2].prompt"}  # s02 continues s01, s03 has its own picture
    assert "continues the previous shot" in by_path["shots[1].prompt"]
    assert "its own keyframe image" in by_path["shots[2].prompt"]
    data["models"]["video"] = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"  # Wan reads every shot's prompt
    data["output"]["resolution"] = "1024x576"
    assert setup_job(data, REPO / "examples", {"models": "tiny"}).warnings == []


def test_a_negative_prompt_no_model_reads_is_warned_about():
    shots = [{"id": "a", "prompt": "p", "duration": 0.5, "negative_prompt": "rain"},
             {"id": "b", "prompt": "p", "duration": 0.5, "continue_from": "previous", "negative_prompt": "rain"}]
    data = base_manifest(shots=shots, models={"keyframe": "tiny:flux", "video": "tiny:svd"})
    data["output"]["resolution"] = "64x64"
    paths = [w.path for w in setup_job(data, "/nonexistent", {"models": "tiny"}).warnings]
    assert "shots[0].negative_prompt" in paths and "shots[1].negative_prompt" in paths
    data["models"]["keyframe"] = "tiny:sdxl"  # SDXL reads shot a's; nothing reads shot b's
    paths = [w.path for w in setup_job(data, "/nonexistent", {"models": "tiny"}).warnings]
    assert "shots[0].negative_prompt" not in paths and "shots[1].negative_prompt" in paths


def test_farm_validate_prints_the_warnings(tmp_path):
    shots = [{"id": "a", "prompt": "p", "duration": 0.5},
             {"id": "b", "prompt": "the fog lifts", "duration": 0.5, "continue_from": "previous"}]
    path = write_manifest(tmp_path, base_manifest(shots=shots))
    result = subprocess.run([sys.executable, "-m", "farm.cli", "validate", str(path), "--models", "tiny"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "warning: shots[1].prompt: not used" in result.stdout and "1 warnings" in result.stdout


# --- content keys and the seeds' model kinds (issue 13.5, 13.11) ----------------------------------------

def keyframe_key_of(tmp_path, models):
    data = base_manifest(models={"keyframe": "tiny", "video": "tiny", **models})
    write_manifest(tmp_path, data)
    return JobBook("j", setup_job(data, tmp_path), str(tmp_path / "out")).request("keyframe:a", "cpu").output_key


def test_a_lora_retrained_in_place_changes_the_key_and_a_moved_one_does_not(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"weights v1")
    first = keyframe_key_of(tmp_path, {"lora": "style.safetensors"})
    lora.write_bytes(b"weights v2")  # retrained, saved at the same path
    os.utime(lora, ns=(1, 1))
    retrained = keyframe_key_of(tmp_path, {"lora": "style.safetensors"})
    assert retrained != first
    lora.rename(tmp_path / "renamed.safetensors")
    assert keyframe_key_of(tmp_path, {"lora": "renamed.safetensors"}) == retrained
    scaled = keyframe_key_of(tmp_path, {"loras": [{"path": "renamed.safetensors", "scale": 0.5}]})
    assert scaled != retrained  # the scale changes the pixels too


def test_a_vae_saved_beside_a_single_file_checkpoint_loads_with_it(tmp_path):
    from farm.jobsetup import keyframe_overrides
    from farm.manifest import validate_data as validate

    (tmp_path / "dreamy.safetensors").write_bytes(b"x")
    spec = resolve_model("keyframe", str(tmp_path / "dreamy.safetensors"))
    manifest = validate(base_manifest(), None)
    assert keyframe_overrides(manifest, tmp_path, spec).vae is None
    (tmp_path / "dreamy.vae.safetensors").write_bytes(b"v")
    assert keyframe_overrides(manifest, tmp_path, spec).vae == str(tmp_path / "dreamy.vae.safetensors")
    (tmp_path / "other.safetensors").write_bytes(b"v")
    manifest = validate(base_manifest(models={"keyframe": "tiny", "video": "tiny", "vae": "other.safetensors"}),
                        tmp_path)
    assert keyframe_overrides(manifest, tmp_path, spec).vae == str(tmp_path / "other.safetensors")  # named wins


@pytest.mark.parametrize(("models", "loc", "why"), [
    ({"embeddings": [{"path": "hero.pt", "token": "<hero>"}]}, "models.embeddings[0].path", ".safetensors"),
    ({"embeddings": [{"path": "missing.safetensors", "token": "<hero>"}]}, "models.embeddings[0].path", "not found"),
    ({"embeddings": [{"path": "hero.safetensors", "token": "two words"}]}, "models.embeddings[0].token", "pattern"),
    ({"keyframe": "tiny:flux", "embeddings": [{"path": "hero.safetensors", "token": "<hero>"}]},
     "models.embeddings[0]", "takes no textual-inversion"),
    ({"loras": [{"path": "style.pickle"}]}, "models.loras[0].path", "pickle"),
    ({"loras": [{"path": "style.safetensors", "scale": 9}]}, "models.loras[0].scale", "less than or equal"),
])
def test_loras_and_embeddings_are_checked_naming_the_field(tmp_path, models, loc, why):
    (tmp_path / "hero.safetensors").write_bytes(b"e")
    (tmp_path / "style.safetensors").write_bytes(b"l")
    data = base_manifest(models={"keyframe": "tiny", "video": "tiny", **models})
    with pytest.raises(ManifestError) as err:
        validate_data(data, tmp_path)
    assert any(e.path == loc and why in e.msg for e in err.value.errors), err.value.errors
