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
