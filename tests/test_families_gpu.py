"""The GPU half of every model family: the tiny offline build, loading through the farm's loader,
the mapped parameters reaching the real pipeline call, and the memory knobs on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.families import ShotInputs, family
from farm.gpu.loading import apply_memory_knobs, load_pipeline
from farm.gpu.stages import run_stage
from farm.models import resolve_model

CASES = [  # (source, size): the smallest size each family's rules allow in a quick test
    ("tiny:sdxl", 64), ("tiny:flux:schnell", 64), ("tiny:flux:dev", 64), ("tiny:sd3", 64),
    ("tiny:svd", 64), ("tiny:i2vgen", 64), ("tiny:wan:ti2v-5b", 64), ("tiny:wan:i2v-14b", 48),
    ("tiny:wan:a14b", 48), ("tiny:ltx", 64),
]


def spy_on(pipe, monkeypatch):
    calls: list[dict] = []
    original = type(pipe).__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    return calls


@pytest.mark.parametrize(("source", "size"), CASES)
def test_tiny_build_loads_offline_and_the_mapped_call_reaches_the_pipeline(source, size, monkeypatch):
    role = "keyframe" if source.split(":")[1] in ("sdxl", "flux", "sd3") else "video"
    spec = resolve_model(role, source)
    fam = family(spec.family)
    pipe = load_pipeline(spec)  # builds the tiny folder offline (HF_HUB_OFFLINE=1), then from_pretrained
    assert type(pipe).__name__ == fam.pipeline
    frames = fam.call_frames(spec.frames_per_call, spec.frames_per_call)
    params = fam.call_params(ShotInputs(prompt="a lighthouse at dusk", negative_prompt="blurry", width=size,
                                        height=size, steps=2, seed=11, frames=frames, fps=8, decode_chunk_size=4,
                                        guidance_rescale=0.7), spec.variant)
    calls = spy_on(pipe, monkeypatch)
    image = None if role == "keyframe" else np.full((size, size, 3), 90, np.uint8)
    out, seen = run_stage(pipe, spec.family, params, image)
    (call,) = calls
    for key, value in params.items():  # every mapped parameter reaches the call unchanged
        if key == "seed":
            continue
        if key == "negative_prompt":
            value = value or None
        assert call[key] == value, key
    assert call["output_type"] == "pt" and isinstance(call["generator"], torch.Generator)
    assert ("image" in call) == (role == "video")
    expected = 1 if role == "keyframe" else frames
    assert out.shape == (expected, size, size, 3) and out.dtype == np.uint8
    assert seen.steps == 2 and seen.as_dict()["unet_calls"] >= 2
    again, _ = run_stage(pipe, spec.family, params, image)
    assert np.array_equal(out, again)  # seeded: the same call gives the same frames


def test_video_memory_knobs_on_the_cpu():
    wan = load_pipeline(resolve_model("video", "tiny:wan"))
    applied = apply_memory_knobs(wan, device="cpu", vae_tiling=True, vae_slicing=True, fp8_storage=True,
                                 group_offload=True, cpu_offload=True)
    # Offloads need an accelerator; tiling, slicing and fp8 storage work anywhere.
    assert applied == {"cpu_offload": False, "forward_chunking": False, "vae_slicing": True, "group_offload": False,
                       "vae_tiling": True, "fp8_storage": True}
    assert wan.vae.use_tiling and wan.vae.use_slicing
    assert any(p.dtype == torch.float8_e4m3fn for p in wan.transformer.parameters())
    params = family("wan").call_params(ShotInputs(prompt="waves", negative_prompt="", width=64, height=64, steps=2,
                                                  seed=5, frames=5), "ti2v-5b")
    frames, _ = run_stage(wan, "wan", params, np.full((64, 64, 3), 50, np.uint8))
    assert frames.shape == (5, 64, 64, 3)


def tiny_sdxl_lora(folder):
    """A LoRA for the tiny SDXL UNet, saved the way training scripts save them (stands in for LCM-LoRA)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from farm.gpu.tiny import tiny_dir

    donor = StableDiffusionXLPipeline.from_pretrained(tiny_dir("sdxl"))
    torch.manual_seed(0)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in donor.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # PEFT starts B at zero, which would be a no-op
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(donor.unet))
    return folder / "pytorch_lora_weights.safetensors"


def test_a_draft_lora_and_its_sampler_reach_the_worker(tmp_path):
    from dataclasses import replace

    from helpers import base_manifest, write_manifest

    from farm.cache import ArtifactCache
    from farm.gpu.worker import StageWorker
    from farm.jobbook import JobBook
    from farm.jobsetup import setup_job

    lora = tiny_sdxl_lora(tmp_path / "lcm")
    data = base_manifest(models={"keyframe": "tiny", "video": "tiny", "keyframe_draft": "lcm/" + lora.name})
    write_manifest(tmp_path, data)
    book = JobBook("j", setup_job(data, tmp_path, {"preview": True}), str(tmp_path / "out"))
    req = book.request("keyframe:a", "cpu", str(tmp_path / "cache"))
    worker = StageWorker("w", tier="cpu")
    drafted = worker.run(req)
    pipe = worker.resident(req)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and "farm0" in pipe.get_active_adapters()
    assert drafted.observed["steps"] == 4
    undrafted = worker.run(replace(req, loras=(), scheduler=None, output_key="plain"))
    cache = ArtifactCache(tmp_path / "cache")
    assert not np.array_equal(cache.last_frame(req.output_key), cache.last_frame("plain"))
    assert undrafted.observed["steps"] == 4


def test_the_step_cache_reaches_the_video_denoiser(tmp_path):
    from farm.cache import ArtifactCache
    from farm.contract import StageKind, StageRequest
    from farm.gpu.worker import StageWorker
    from farm.presets import MemoryKnobs

    ArtifactCache(tmp_path).put_arrays("in", last=np.full((64, 64, 3), 70, np.uint8))
    params = family("wan").call_params(ShotInputs(prompt="waves", negative_prompt="", width=64, height=64, steps=3,
                                                  seed=5, frames=5))
    req = StageRequest("j", "video:a:0", StageKind.VIDEO, resolve_model("video", "tiny:wan"), params, MemoryKnobs(),
                       "cpu", "cpu", "out", str(tmp_path), input_key="in", drop=0, kept=5, step_cache=0.2)
    result = StageWorker("w", tier="cpu").run(req)
    assert result.knobs["step_cache"] is True and result.observed["steps"] == 3


# --- the seeds' model kinds: several LoRAs, embeddings, a VAE beside its checkpoint (issue 13.11) -----

def tiny_sdxl_embedding(path, pipe, seed=0):
    """An SDXL textual inversion in the community format: one vector per text encoder."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    dims = {"clip_l": pipe.text_encoder.config.hidden_size, "clip_g": pipe.text_encoder_2.config.hidden_size}
    save_file({name: torch.randn(1, dim, generator=gen) * 5 for name, dim in dims.items()}, str(path))
    return path


def test_several_loras_with_scales_and_an_embedding_reach_the_keyframe(tmp_path):
    from helpers import base_manifest, write_manifest

    from farm.cache import ArtifactCache
    from farm.gpu.worker import StageWorker
    from farm.jobbook import JobBook
    from farm.jobsetup import setup_job

    style = tiny_sdxl_lora(tmp_path / "style")
    detail = tiny_sdxl_lora(tmp_path / "detail")
    tiny_sdxl_embedding(tmp_path / "hero.safetensors", load_pipeline(resolve_model("keyframe", "tiny:sdxl")))
    shots = [{"id": "a", "prompt": "a portrait of <hero> in the rain", "duration": 0.5}]
    data = base_manifest(shots=shots, models={
        "keyframe": "tiny", "video": "tiny",
        "loras": [{"path": f"style/{style.name}", "scale": 0.8}, {"path": f"detail/{detail.name}", "scale": 0.3}],
        "embeddings": [{"path": "hero.safetensors", "token": "<hero>"}]})
    write_manifest(tmp_path, data)
    setup = setup_job(data, tmp_path)
    assert setup.warnings == []
    req = JobBook("j", setup, str(tmp_path / "out")).request("keyframe:a", "cpu", str(tmp_path / "cache"))
    assert [scale for _, scale in req.loras] == [0.8, 0.3] and req.embeddings[0][1] == "<hero>"
    worker = StageWorker("w", tier="cpu")
    worker.run(req)
    pipe = worker.resident(req)
    assert pipe.get_active_adapters() == ["farm0", "farm1"]
    assert "<hero>" in pipe.tokenizer.get_vocab() and "<hero>" in pipe.tokenizer_2.get_vocab()
    from dataclasses import replace

    worker.run(replace(req, embeddings=(), output_key="without"))  # the token is then just text
    cache = ArtifactCache(tmp_path / "cache")
    assert not np.array_equal(cache.last_frame(req.output_key), cache.last_frame("without"))


# --- latents, then their decode as a stage of its own (issue 13.17, 13.5) ----------------------------

VIDEO_CASES = [("tiny:svd", 64), ("tiny:i2vgen", 64), ("tiny:wan:ti2v-5b", 64), ("tiny:wan:i2v-14b", 48),
               ("tiny:ltx", 64)]


@pytest.mark.parametrize(("source", "size"), VIDEO_CASES)
def test_denoise_then_decode_gives_the_pipelines_own_frames(source, size):
    from farm.gpu.stages import run_decode, run_denoise

    spec = resolve_model("video", source)
    fam = family(spec.family)
    pipe = load_pipeline(spec)
    frames = fam.call_frames(spec.frames_per_call, spec.frames_per_call)
    params = fam.call_params(ShotInputs(prompt="a lighthouse", negative_prompt="blurry", width=size, height=size,
                                        steps=2, seed=11, frames=frames, fps=8, decode_chunk_size=4), spec.variant)
    image = np.full((size, size, 3), 90, np.uint8)
    whole, _ = run_stage(pipe, spec.family, params, image)
    denoise, decode = fam.split_params(params)
    latents, seen = run_denoise(pipe, spec.family, denoise, image)
    assert latents.dtype == np.float32 and seen.steps == 2 and seen.decode_batches == []  # no decode in it
    split, decoded = run_decode(pipe, spec.family, decode, latents)
    assert split.shape == whole.shape and decoded.decode_batches and decoded.steps == 0
    if spec.family == "ltx":  # its VAE adds a little seeded noise at decode: drawn afresh, so close, not equal
        assert np.abs(split.astype(int) - whole.astype(int)).mean() < 8
    else:
        assert np.array_equal(split, whole)


def test_the_decode_chunk_changes_the_pixels_so_it_keys_the_decode():
    from farm.gpu.stages import run_decode, run_denoise

    spec = resolve_model("video", "tiny:svd")
    fam = family("svd")
    pipe = load_pipeline(spec)
    params = fam.call_params(ShotInputs(prompt="", negative_prompt="", width=64, height=64, steps=2, seed=3, frames=8,
                                        fps=8, decode_chunk_size=8))
    denoise, decode = fam.split_params(params)
    latents, _ = run_denoise(pipe, "svd", denoise, np.full((64, 64, 3), 90, np.uint8))
    whole, seen8 = run_decode(pipe, "svd", decode, latents)
    chunked, seen2 = run_decode(pipe, "svd", decode | {"decode_chunk_size": 2}, latents)
    assert seen8.decode_batches == [8] and seen2.decode_batches == [2, 2, 2, 2]
    assert not np.array_equal(whole, chunked)  # the temporal VAE sees other neighbours
