"""farm.models and farm.tiny: model resolution rules, and real tiny diffusers pipelines run offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub are imported

import numpy as np
import pytest
import torch
from PIL import Image

from farm.gpu import tiny
from farm.gpu.families import gpu_family
from farm.gpu.families.svd import build_tiny_svd
from farm.gpu.loading import apply_memory_knobs, load_pipeline
from farm.models import (
    TINY_VERSION,
    ModelError,
    ModelSpec,
    model_revision,
    resolve_model,
    with_tiny,
)

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module", autouse=True)
def offline_farm_home(tmp_path_factory):
    """One FARM_HOME per module (tiny models built once) and an empty, offline HF cache."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path_factory.mktemp("farm-home")
    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FARM_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("FARM_ALLOW_DOWNLOAD", raising=False)
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        # huggingface_hub reads the cache dir from this module attribute at call time.
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        yield home


@pytest.fixture(scope="module")
def hf_cache() -> Path:
    import huggingface_hub.constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)


_PIPES: dict[str, object] = {}


def tiny_pipe(source: str, role: str):
    """Load each tiny pipeline once per module (through load_pipeline, i.e. from the saved folder)."""
    key = f"{role}:{source}"
    if key not in _PIPES:
        pipe = load_pipeline(resolve_model(role, source))
        pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = pipe
    return _PIPES[key]


def keyframe_image(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def sdxl_image(pipe, seed: int) -> np.ndarray:
    out = pipe("misty valley at dawn", negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
               guidance_scale=7.5, guidance_rescale=0.7, generator=torch.Generator().manual_seed(seed))
    image = out.images[0]
    assert isinstance(image, Image.Image)
    return np.asarray(image)


def svd_frames(pipe, seed: int, num_frames: int = 4) -> list[Image.Image]:
    out = pipe(keyframe_image(), height=64, width=64, num_frames=num_frames, num_inference_steps=2,
               decode_chunk_size=2, motion_bucket_id=60, noise_aug_strength=0.0004, fps=15,
               generator=torch.Generator().manual_seed(seed))
    return out.frames[0]


# --- resolve_model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "source", "family", "frames"),
    [
        ("keyframe", "tiny", "sdxl", 1),
        ("keyframe", "tiny:sdxl", "sdxl", 1),
        ("video", "tiny", "svd", 8),
        ("video", "tiny:svd", "svd", 8),
        ("video", "TINY:I2VGen", "i2vgen", 8),
    ],
)
def test_resolve_tiny_variants(role, source, family, frames):
    spec = resolve_model(role, source)
    assert (spec.kind, spec.family, spec.frames_per_call) == ("tiny", family, frames)
    assert spec.location == f"tiny-{family}-{spec.variant}-{TINY_VERSION}"
    assert spec.source == source


@pytest.mark.parametrize(
    ("role", "source"),
    [("keyframe", "tiny:svd"), ("keyframe", "tiny:i2vgen"), ("video", "tiny:sdxl"), ("video", "tiny:flux")],
)
def test_resolve_tiny_refuses_wrong_family(role, source):
    with pytest.raises(ModelError):
        resolve_model(role, source)


@pytest.mark.parametrize(
    ("role", "repo", "family", "frames"),
    [
        ("keyframe", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1),
        ("video", "stabilityai/stable-video-diffusion-img2vid-xt", "svd", 25),
        ("video", "stabilityai/stable-video-diffusion-img2vid-xt-1-1", "svd", 25),
        ("video", "stabilityai/stable-video-diffusion-img2vid", "svd", 14),
        ("video", "someone/svd-finetune", "svd", 14),
        ("video", "ali-vilab/i2vgen-xl", "i2vgen", 16),
    ],
)
def test_resolve_hub_ids(role, repo, family, frames):
    spec = resolve_model(role, repo, revision="abc123")
    assert (spec.kind, spec.family, spec.frames_per_call, spec.location) == ("hub", family, frames, repo)
    assert spec.revision == "abc123"


def test_unknown_video_model_refused():
    with pytest.raises(ModelError, match="unknown video model.*Stable Video Diffusion"):
        resolve_model("video", "runwayml/stable-diffusion-v1-5")


def test_video_model_as_keyframe_refused():
    with pytest.raises(ModelError, match="cannot be the keyframe model"):
        resolve_model("keyframe", "stabilityai/stable-video-diffusion-img2vid-xt")


@pytest.mark.parametrize("source", ["", "   ", "not a model!", "a/b/c"])
def test_garbage_sources_refused(source, tmp_path):
    with pytest.raises(ModelError):
        resolve_model("keyframe", source, base_dir=tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_pickle_refused_unless_allowed(tmp_path, suffix):
    ckpt = tmp_path / f"model{suffix}"
    ckpt.write_bytes(b"not really a pickle")
    with pytest.raises(ModelError, match="pickle.*arbitrary code"):
        resolve_model("keyframe", str(ckpt))
    spec = resolve_model("keyframe", str(ckpt), allow_pickle=True)
    assert (spec.kind, spec.family, spec.allow_pickle, spec.location) == ("file", "sdxl", True, str(ckpt))
    with pytest.raises(ModelError, match="single checkpoint file"):
        resolve_model("video", str(ckpt), allow_pickle=True)


def test_single_safetensors_family_from_role(tmp_path):
    (tmp_path / "dreamshaper.safetensors").write_bytes(b"x")
    (tmp_path / "svd_xt.safetensors").write_bytes(b"x")
    key = resolve_model("keyframe", "dreamshaper.safetensors", base_dir=tmp_path)
    assert (key.kind, key.family, key.frames_per_call) == ("file", "sdxl", 1)
    # diffusers cannot load SVD from one file, so a video checkpoint file is refused at validation
    with pytest.raises(ModelError, match="diffusers folder or a hub id"):
        resolve_model("video", "./svd_xt.safetensors", base_dir=tmp_path)
    (tmp_path / "tiny.safetensors").write_bytes(b"x")  # a file named tiny is not the tiny model
    named_tiny = resolve_model("keyframe", "./tiny.safetensors", base_dir=tmp_path)
    assert (named_tiny.kind, named_tiny.family) == ("file", "sdxl")


def test_missing_path_and_unsupported_suffix(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("keyframe", "./nowhere.safetensors", base_dir=tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("video", str(tmp_path / "no-such-folder") + "/")
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported model file type"):
        resolve_model("keyframe", "model.gguf", base_dir=tmp_path)


def _fake_model_dir(root: Path, name: str, class_name: str, unet: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    if unet is not None:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text(json.dumps(unet))
    return folder


def test_local_dir_family_from_model_index(tmp_path):
    _fake_model_dir(tmp_path, "svd", "StableVideoDiffusionPipeline", unet={"num_frames": 25})
    _fake_model_dir(tmp_path, "i2v", "I2VGenXLPipeline")
    _fake_model_dir(tmp_path, "xl", "StableDiffusionXLPipeline")
    _fake_model_dir(tmp_path, "flux", "FluxPipeline")
    _fake_model_dir(tmp_path, "sd15", "StableDiffusionPipeline")
    (tmp_path / "empty").mkdir()

    svd = resolve_model("video", str(tmp_path / "svd"))
    assert (svd.kind, svd.family, svd.frames_per_call, svd.location) == ("dir", "svd", 25, str(tmp_path / "svd"))
    assert resolve_model("video", str(tmp_path / "i2v")).family == "i2vgen"
    assert resolve_model("keyframe", str(tmp_path / "xl")).family == "sdxl"
    assert resolve_model("keyframe", str(tmp_path / "flux")).family == "flux"
    with pytest.raises(ModelError, match="unknown model class 'StableDiffusionPipeline'"):
        resolve_model("keyframe", str(tmp_path / "sd15"))
    with pytest.raises(ModelError, match="no model_index.json"):
        resolve_model("keyframe", str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="cannot be the video model"):
        resolve_model("video", str(tmp_path / "xl"))


def test_relative_path_resolved_against_base_dir(tmp_path, monkeypatch):
    folder = _fake_model_dir(tmp_path / "project" / "models", "my-svd", "StableVideoDiffusionPipeline")
    monkeypatch.chdir(tmp_path)  # the cwd must not matter
    base = tmp_path / "project"
    for source in ("models/my-svd", "./models/my-svd", "../project/models/my-svd"):
        spec = resolve_model("video", source, base_dir=base)
        assert spec.kind == "dir"
        assert spec.location == str(folder)
        assert spec.source == source
    # "models/my-svd" also looks like a hub id "org/name": without the folder it is one.
    assert resolve_model("video", "models/my-svd-xt", base_dir=base).kind == "hub"


def test_with_tiny_keeps_role_and_family():
    xt = resolve_model("video", "stabilityai/stable-video-diffusion-img2vid-xt")
    stand_in = with_tiny(xt)
    assert (stand_in.kind, stand_in.role, stand_in.family, stand_in.frames_per_call) == ("tiny", "video", "svd", 8)
    assert with_tiny(resolve_model("video", "ali-vilab/i2vgen-xl")).family == "i2vgen"
    assert with_tiny(resolve_model("keyframe", "stabilityai/stable-diffusion-xl-base-1.0")).family == "sdxl"


# --- tiny builders ---------------------------------------------------------------------------------


def test_tiny_builds_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_svd().unet.state_dict()
    after_build = torch.rand(3)
    second = build_tiny_svd().unet.state_dict()
    assert torch.equal(expected, after_build)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_byte_level_tokenizer():
    tok = tiny.build_tokenizer()
    assert len(tok) == 514 == tiny.VOCAB_SIZE
    ids = tok("A cat, über!").input_ids
    assert ids[0] == tiny.BOS_ID and ids[-1] == tiny.EOS_ID
    assert max(ids) < tiny.VOCAB_SIZE
    assert tok.decode(ids, skip_special_tokens=True) == "a cat , über !"
    padded = tok("x", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77


def test_tiny_dir_builds_once_and_reuses(monkeypatch):
    first = tiny.tiny_dir("svd")
    assert (first / "model_index.json").is_file()
    assert first == Path(os.environ["FARM_HOME"]) / "models" / f"tiny-svd-xt-{TINY_VERSION}"
    stamp = (first / "model_index.json").stat().st_mtime_ns

    def must_not_build(variant):
        raise AssertionError("rebuilt a tiny model that was already on disk")

    monkeypatch.setattr(gpu_family("svd"), "build_tiny", must_not_build)
    assert tiny.tiny_dir("svd") == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp


def test_tiny_dir_tolerates_a_concurrent_builder(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    real = gpu_family("sdxl").build_tiny
    final = tmp_path / "models" / f"tiny-sdxl-base-{TINY_VERSION}"

    def racing_builder(variant):
        # Another process finishes first, while this one is still building.
        real(variant).save_pretrained(final)
        return real(variant)

    monkeypatch.setattr(gpu_family("sdxl"), "build_tiny", racing_builder)
    assert tiny.tiny_dir("sdxl") == final
    # no temp dir left beside it
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f"tiny-sdxl-base-{TINY_VERSION}"]


# --- pipelines -------------------------------------------------------------------------------------


def test_tiny_sdxl_image_and_dpmpp_karras_scheduler():
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    pipe = tiny_pipe("tiny", "keyframe")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    config = pipe.scheduler.config
    assert (config.algorithm_type, config.solver_order, config.lower_order_final, config.use_karras_sigmas) == (
        "dpmsolver++", 2, True, True)
    pixels = sdxl_image(pipe, seed=1)
    assert pixels.shape == (64, 64, 3)
    out = pipe("a wide shot", height=48, width=80, num_inference_steps=2).images[0]
    assert out.size == (80, 48)


def test_tiny_sdxl_seeded_determinism():
    pipe = tiny_pipe("tiny", "keyframe")
    a, b, c = sdxl_image(pipe, 11), sdxl_image(pipe, 11), sdxl_image(pipe, 12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tiny_svd_frames_and_determinism():
    from diffusers import StableVideoDiffusionPipeline

    pipe = tiny_pipe("tiny", "video")
    assert isinstance(pipe, StableVideoDiffusionPipeline)
    frames = svd_frames(pipe, seed=5)
    assert len(frames) == 4
    assert all(f.size == (64, 64) for f in frames)
    again = svd_frames(pipe, seed=5)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(frames, again, strict=True))
    other = svd_frames(pipe, seed=6)
    assert not np.array_equal(np.asarray(frames[-1]), np.asarray(other[-1]))


def test_tiny_i2vgen_frames():
    from diffusers import I2VGenXLPipeline

    pipe = tiny_pipe("tiny:i2vgen", "video")
    assert isinstance(pipe, I2VGenXLPipeline)
    out = pipe(prompt="leaves gently swaying", image=keyframe_image(), height=64, width=64, num_frames=4,
               num_inference_steps=2, guidance_scale=9.0, generator=torch.Generator().manual_seed(0))
    frames = out.frames[0]
    assert len(frames) == 4
    assert frames[0].size == (64, 64)
    # The transformers-5 shim must not leak into the model: no new submodule, same weights.
    assert not any(name.startswith("text_model") for name, _ in pipe.text_encoder.named_modules())


def test_hub_model_not_cached_raises_model_error():
    spec = resolve_model("keyframe", "farm-test/not-in-the-cache-sdxl")
    with pytest.raises(ModelError, match="--models tiny") as info:
        load_pipeline(spec)
    assert "farm-test/not-in-the-cache-sdxl" in str(info.value)


def test_hub_model_loads_from_hf_cache_with_its_revision(hf_cache):
    """The hub path, offline: a tiny model laid out as a cached snapshot of a hub repo."""
    repo = hf_cache / "models--farm-test--cached-svd-xt"
    shutil.copytree(tiny.tiny_dir("svd"), repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)

    spec = resolve_model("video", "farm-test/cached-svd-xt")
    assert (spec.kind, spec.frames_per_call) == ("hub", 25)
    assert model_revision(spec) == FAKE_COMMIT
    pipe = load_pipeline(spec)
    pipe.set_progress_bar_config(disable=True)
    assert len(svd_frames(pipe, seed=1, num_frames=2)) == 2


def test_single_file_without_cached_base_config_raises(tmp_path):
    weights = tmp_path / "custom-sdxl.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelError, match="--models tiny"):
        load_pipeline(resolve_model("keyframe", str(weights)))
    with pytest.raises(ModelError, match="single"):
        load_pipeline(resolve_model("video", str(weights)))


KNOBS_OFF = {"cpu_offload": False, "forward_chunking": False, "vae_slicing": False, "group_offload": False,
             "vae_tiling": False, "fp8_storage": False}


def test_memory_knobs_on_cpu():
    sdxl = load_pipeline(resolve_model("keyframe", "tiny"))
    applied = apply_memory_knobs(sdxl, device="cpu", cpu_offload=True, forward_chunking=True, vae_slicing=True)
    assert applied == KNOBS_OFF | {"forward_chunking": True, "vae_slicing": True}
    assert sdxl.vae.use_slicing
    chunked = [m for m in sdxl.unet.modules() if hasattr(m, "_chunk_size")]
    assert chunked and all(m._chunk_size == 1 for m in chunked)

    svd = load_pipeline(resolve_model("video", "tiny"))
    applied = apply_memory_knobs(svd, device="cpu", cpu_offload=True, forward_chunking=True, vae_slicing=True)
    # SVD's temporal VAE has no slicing (decode_chunk_size bounds its memory instead).
    assert applied == KNOBS_OFF | {"forward_chunking": True}
    svd.set_progress_bar_config(disable=True)
    assert len(svd_frames(svd, seed=2, num_frames=2)) == 2  # still runs chunked

    plain = load_pipeline(resolve_model("video", "tiny:i2vgen"))
    applied = apply_memory_knobs(plain, device="cpu", cpu_offload=False, forward_chunking=False, vae_slicing=False)
    assert applied == KNOBS_OFF


def test_lora_and_vae_overrides(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    base = tiny_pipe("tiny", "keyframe")
    # A LoRA for the tiny UNet, saved the way training scripts save SDXL LoRAs.
    donor = StableDiffusionXLPipeline.from_pretrained(tiny.tiny_dir("sdxl"))
    torch.manual_seed(0)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in donor.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # PEFT starts B at zero, which would be a no-op LoRA
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora",
                                                unet_lora_layers=get_peft_model_state_dict(donor.unet))
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()

    # The VAE as one diffusers-format .safetensors file, plus a VAE folder.
    save_file(base.vae.state_dict(), tmp_path / "vae.safetensors")
    spec = resolve_model("keyframe", "tiny")
    with_lora = load_pipeline(spec, loras=((str(lora_file), 1.0),), vae=str(tmp_path / "vae.safetensors"))
    with_lora.set_progress_bar_config(disable=True)
    assert isinstance(with_lora.vae, AutoencoderKL) and with_lora.vae is not base.vae
    assert torch.equal(with_lora.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)
    assert not np.array_equal(sdxl_image(with_lora, 3), sdxl_image(base, 3))

    from_folder = load_pipeline(spec, vae=str(tiny.tiny_dir("sdxl")))  # a pipeline folder: its vae/
    assert isinstance(from_folder.vae, AutoencoderKL)
    with pytest.raises(ModelError, match="pickle"):
        (tmp_path / "lora.bin").write_bytes(b"x")
        load_pipeline(spec, loras=((str(tmp_path / "lora.bin"), 1.0),))
    with pytest.raises(ModelError, match="not supported"):
        load_pipeline(resolve_model("video", "tiny"), loras=((str(lora_file), 1.0),))


def test_model_revision(tmp_path):
    assert model_revision(resolve_model("video", "tiny:i2vgen")) == f"tiny-{TINY_VERSION}"
    assert model_revision(resolve_model("video", "ali-vilab/i2vgen-xl")) == "unknown"
    assert model_revision(resolve_model("video", "ali-vilab/i2vgen-xl", revision="v1.1")) == "v1.1"
    folder = _fake_model_dir(tmp_path, "svd", "StableVideoDiffusionPipeline", unet={"num_frames": 14})
    spec = resolve_model("video", str(folder))
    before = model_revision(spec)
    assert before.startswith("local-") and before == model_revision(spec)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"new weights")
    assert model_revision(spec) != before


def test_modelspec_is_hashable_plain_data():
    spec = resolve_model("video", "tiny")
    assert isinstance(spec, ModelSpec)
    assert {spec: 1}[resolve_model("video", "tiny")] == 1  # the worker keys resident pipelines by spec
    with pytest.raises(AttributeError):
        spec.family = "i2vgen"  # type: ignore[misc]
