"""farm.gpu.speed and the stage path's speed rules: SDPA, channels-last, compile, batched CFG, uint8 on device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.config import FarmConfig
from farm.contract import StageKind, StageRequest
from farm.gpu.loading import load_pipeline
from farm.gpu.speed import SpeedKnobs, apply_speed_knobs, speed_knobs, uses_sdpa
from farm.gpu.stages import observe, run_stage, tensor_to_uint8, to_uint8
from farm.gpu.worker import StageWorker
from farm.models import resolve_model
from farm.presets import memory_knobs

KEYFRAME = {"prompt": "a red kite over a beach", "negative_prompt": "blurry", "width": 64, "height": 48,
            "num_inference_steps": 3, "guidance_scale": 7.5, "guidance_rescale": 0.7, "seed": 5}
VIDEO = {"width": 64, "height": 48, "num_frames": 8, "num_inference_steps": 2, "decode_chunk_size": 3, "seed": 9,
         "fps": 7, "motion_bucket_id": 127, "noise_aug_strength": 0.02, "min_guidance_scale": 1.0,
         "max_guidance_scale": 3.0}


@pytest.fixture(scope="module")
def sdxl():
    pipe = load_pipeline(resolve_model("keyframe", "tiny"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def svd():
    pipe = load_pipeline(resolve_model("video", "tiny"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("device", "capability", "offload", "setting", "expected"), [
    ("cpu", None, False, "auto", SpeedKnobs(channels_last=False, compile=False)),
    ("cuda", (9, 0), False, "auto", SpeedKnobs(channels_last=True, compile=True)),  # H100
    ("cuda", (8, 9), False, "auto", SpeedKnobs(channels_last=True, compile=True)),  # L40S
    # eager GroupNorm converts NHWC back: channels-last only where Inductor plans the layouts
    ("cuda", (7, 5), False, "auto", SpeedKnobs(channels_last=False, compile=False)),  # T4: no bf16, old Triton target
    ("cuda", (9, 0), True, "auto", SpeedKnobs(channels_last=False, compile=False)),  # offload hooks break graphs
    ("cuda", (9, 0), False, "off", SpeedKnobs(channels_last=False, compile=False)),
    ("cpu", None, False, "on", SpeedKnobs(channels_last=False, compile=True)),
    ("cuda", (9, 0), True, "on", SpeedKnobs(channels_last=False, compile=False)),
])
def test_speed_knob_decisions(device, capability, offload, setting, expected):
    assert speed_knobs(device, capability, offload, setting) == expected


def test_sdpa_is_detected_and_its_absence_too(sdxl):
    from diffusers.models.attention_processor import AttnProcessor

    assert uses_sdpa(sdxl)
    plain = load_pipeline(resolve_model("keyframe", "tiny"))
    plain.unet.set_attn_processor(AttnProcessor())  # materialises the attention matrix
    assert not uses_sdpa(plain)


def test_channels_last_keeps_the_picture():
    base = load_pipeline(resolve_model("keyframe", "tiny"))
    fast = load_pipeline(resolve_model("keyframe", "tiny"))
    for pipe in (base, fast):
        pipe.set_progress_bar_config(disable=True)
    applied = apply_speed_knobs(fast, SpeedKnobs(channels_last=True, compile=False))
    assert applied == {"sdpa": True, "channels_last": True, "compiled": False}
    conv = fast.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    a, _ = run_stage(base, "sdxl", KEYFRAME)
    b, _ = run_stage(fast, "sdxl", KEYFRAME)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_channels_last_takes_a_temporal_vae():
    """SVD's VAE decoder has 3-D convolutions: module.to(memory_format=channels_last) refused the whole
    pipeline on the first H200 run ("required rank 4 tensor"); the 2-D ones go NHWC, the 3-D stay."""
    from farm.gpu.speed import to_channels_last

    svd = load_pipeline(resolve_model("video", "tiny"))
    applied = apply_speed_knobs(svd, SpeedKnobs(channels_last=True, compile=False))
    assert applied["channels_last"]  # the UNet (the VAE stays NCHW: it runs eager)
    assert not any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                   for p in svd.vae.parameters() if p.dim() == 4)
    to_channels_last(svd.vae)
    weights = [p for p in svd.vae.parameters() if p.dim() in (4, 5)]
    assert any(p.dim() == 5 for p in weights)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights if p.dim() == 4)
    assert all(p.is_contiguous() for p in weights if p.dim() == 5)


def test_tensor_to_uint8_matches_the_numpy_rule():
    rng = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 3, 5, 7, generator=rng) * 1.4 - 0.2  # out-of-range values are clipped alike
    expected = to_uint8(frames.permute(0, 2, 3, 1).numpy())
    got = tensor_to_uint8(frames)
    assert got.dtype == np.uint8 and got.shape == (3, 5, 7, 3)
    assert np.array_equal(got, expected)
    assert np.array_equal(tensor_to_uint8(frames.to(torch.bfloat16)),
                          to_uint8(frames.to(torch.bfloat16).float().permute(0, 2, 3, 1).numpy()))


def test_stages_give_the_same_bytes_as_the_numpy_output_path(sdxl, svd):
    """Frames leave the pipeline as tensors and become uint8 where they are; on the CPU that must be
    byte-identical to the pipeline's own numpy output path."""
    images, _ = run_stage(sdxl, "sdxl", KEYFRAME)
    image = images[0]
    ref = sdxl(prompt=KEYFRAME["prompt"], negative_prompt=KEYFRAME["negative_prompt"], width=64, height=48,
               num_inference_steps=3, guidance_scale=7.5, guidance_rescale=0.7,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    assert np.array_equal(image, to_uint8(ref))

    frames, _ = run_stage(svd, "svd", VIDEO, image)
    cond = __import__("PIL.Image").Image.fromarray(image)
    ref = svd(image=cond, width=64, height=48, num_frames=8, num_inference_steps=2, decode_chunk_size=3, fps=7,
              motion_bucket_id=127, noise_aug_strength=0.02, min_guidance_scale=1.0, max_guidance_scale=3.0,
              generator=torch.Generator("cpu").manual_seed(9), output_type="np").frames[0]
    assert frames.shape == (8, 48, 64, 3) and np.array_equal(frames, to_uint8(np.asarray(ref)))


def test_guidance_runs_as_one_batched_unet_call_per_step(sdxl, svd):
    _, seen = run_stage(sdxl, "sdxl", KEYFRAME)
    obs = seen.as_dict()
    assert obs["steps"] == 3 and obs["unet_calls"] == 3 and obs["unet_batch"] == 2
    assert obs["step_seconds"] > 0 and 0 < obs["unet_seconds"] <= obs["seconds"]
    assert len(seen.step_seconds) == 2 and len(seen.unet_seconds) == 3

    _, seen = run_stage(sdxl, "sdxl", {**KEYFRAME, "guidance_scale": 1.0})  # no guidance: no unconditional half
    assert seen.as_dict()["unet_batch"] == 1

    _, seen = run_stage(svd, "svd", VIDEO, np.zeros((48, 64, 3), np.uint8))
    assert seen.as_dict()["unet_calls"] == 2 and seen.as_dict()["unet_batch"] == 2  # (2, frames, ...) in one call


def test_observe_removes_its_hooks(sdxl):
    with observe(sdxl):
        assert sdxl.unet._forward_pre_hooks and "step" in vars(sdxl.scheduler)
    assert not sdxl.unet._forward_pre_hooks and not sdxl.unet._forward_hooks
    assert "step" not in vars(sdxl.scheduler) and "decode" not in vars(sdxl.vae)


@pytest.mark.slow
def test_worker_compiles_the_unet_when_told(tmp_path):
    """compile: on in the farm config, through the worker's own path: the UNet's forward is compiled
    (Inductor, ~40 s on 2 cores), observe still sees every call, and the picture matches eager."""
    req = StageRequest("job", "keyframe:a", StageKind.KEYFRAME, resolve_model("keyframe", "tiny"), KEYFRAME,
                       memory_knobs("cpu"), "cpu", "cpu", "k", str(tmp_path))
    eager = StageWorker("eager", tier="cpu", config=FarmConfig(compile="off"))
    eager_report = eager.run(req)
    compiled = StageWorker("compiled", tier="cpu", config=FarmConfig(compile="on"))
    from dataclasses import replace

    report = compiled.run(replace(req, output_key="k2"))
    assert report.knobs["compiled"] and not eager_report.knobs["compiled"]
    assert report.observed["unet_calls"] == 3 and report.observed["unet_batch"] == 2
    from farm.cache import ArtifactCache

    cache = ArtifactCache(tmp_path)
    a, b = cache.get_arrays("k")["last"], cache.get_arrays("k2")["last"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
