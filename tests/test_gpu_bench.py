"""bench/gpu.py and bench/realsize.py: real-size architectures, FLOP counting, the tiny CPU path CI runs."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu, realsize

# Parameter counts of the published checkpoints' components (from their safetensors headers).
PUBLISHED = {
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
    ("svd", "unet"): 1_524_623_082,
    ("svd", "image_encoder"): 632_076_800,
}


# Nominal sizes the model cards publish for the transformer families' denoisers, and the T5-XXL encoder's
# exact count; the real-size configs must land within 2% (FLUX.1 "12B", Wan2.2 TI2V "5B", LTX-Video "2B").
NOMINAL = {("flux", "transformer"): 12e9, ("wan", "transformer"): 5e9, ("ltx", "transformer"): 1.92e9,
           ("flux", "text_encoder_2"): 4_762_310_656, ("ltx", "text_encoder"): 4_762_310_656,
           ("flux", "text_encoder"): 123_060_480}


@pytest.mark.parametrize("family", ["flux", "wan", "ltx"])
def test_realsize_transformer_families_have_the_published_sizes(family):
    parts = realsize.components(family, "meta")
    for (name_family, name), nominal in NOMINAL.items():
        if name_family == family:
            assert realsize.parameter_count(parts[name]) == pytest.approx(nominal, rel=0.02), name
    pipe = realsize.build(family, "meta", torch.bfloat16)
    assert type(pipe).__name__ == {"flux": "FluxPipeline", "wan": "WanImageToVideoPipeline",
                                   "ltx": "LTXImageToVideoPipeline"}[family]


@pytest.mark.parametrize("family", ["sdxl", "svd", "i2vgen"])
def test_realsize_components_have_the_published_sizes(family):
    parts = realsize.components(family, "meta")  # shapes only: no memory
    expected = {"sdxl": {"unet", "vae", "text_encoder", "text_encoder_2"},
                "svd": {"unet", "vae", "image_encoder"},
                "i2vgen": {"unet", "vae", "text_encoder", "image_encoder"}}[family]
    assert set(parts) == expected
    for name, module in parts.items():
        assert next(module.parameters()).device.type == "meta"
        count = realsize.parameter_count(module)
        if (family, name) in PUBLISHED:
            assert count == PUBLISHED[(family, name)], (family, name)
        else:
            assert count > 50_000_000, (family, name)
    assert realsize.parameter_count(parts["unet"]) > 1_400_000_000  # every UNet is a >1.4B model


def test_realsize_pipeline_is_prepared_like_a_loaded_one():
    pipe = realsize.build("sdxl", "meta", torch.bfloat16)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # farm.models.prepare_pipeline ran
    assert pipe.scheduler.config.use_karras_sigmas
    assert pipe.unet.dtype == torch.bfloat16 and pipe.unet.config.sample_size == 128
    assert torch.get_default_dtype() == torch.float32  # the build's default dtype did not leak
    with pytest.raises(ValueError, match="LoRA"):
        realsize.loader(realsize.spec("sdxl"), device="cpu", loras=(("x.safetensors", 1.0),))


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0),
    ("NVIDIA A10G", 70.0), ("Tesla T4", None),
])
def test_bf16_peak_by_device_name(name, peak):
    assert gpu.bf16_peak_tflops(name) == peak


def test_utilisation_and_memory_fraction():
    assert gpu.utilisation(500e12, 1.0, 1000.0) == pytest.approx(0.5)
    assert gpu.utilisation(1e12, 0.0, 1000.0) is None and gpu.utilisation(1e12, 1.0, None) is None
    assert gpu.memory_fraction(12, 80_000_000_000) == pytest.approx(0.15)
    assert gpu.memory_fraction(24, 16_000_000_000) == 1.0


def test_flop_count_includes_cpu_attention():
    from torch.utils.flop_counter import FlopCounterMode

    from farm.gpu.families.sdxl import build_tiny_sdxl

    unet = build_tiny_sdxl().unet
    args = (torch.randn(2, 4, 8, 8), torch.tensor(10.0))
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, 64),
              "added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}}
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        unet(*args, **kwargs)
    counted = gpu.count_flops(unet, args, kwargs)
    assert counted > plain.get_total_flops() > 0  # torch alone leaves the CPU attention kernel out


def test_bench_runs_the_farm_stages_at_tiny_size_on_cpu(tmp_path):
    result = gpu.main(["--size", "tiny", "--families", "sdxl", "svd", "--tiers", "high", "low",
                       "--runs", "tier", "ladder", "--no-write", "--json", str(tmp_path / "out.json")])
    assert result["real"] is False and result["device"] == "CPU"
    runs = {(o["case"]["family"], o["case"]["label"], o["case"]["tier"]): o for o in result["outcomes"]}
    assert set(runs) == {("sdxl", "tier", "high"), ("sdxl", "tier", "low"), ("svd", "tier", "high"),
                         ("svd", "tier", "low"), ("svd", "ladder", "high")}
    for o in runs.values():
        assert o["ok"], o
        assert o["unet_calls"] == o["case"]["steps"] and o["unet_batch"] == 2  # CFG batched
        assert o["flops_per_call"] > 0 and o["step_s"] > 0 and o["stage_s"] >= o["call_s"] > 0
        assert o["mfu"] is None  # no GPU peak: no utilisation figure is made up
    # the denoising stage's preset (the decode chunk is its decode stage's, timed with it)
    assert runs[("svd", "tier", "low")]["preset"] == "low+cpu_offload+forward_chunking+vae_slicing"
    assert all(o["decode_s"] > 0 for (family, _, _), o in runs.items() if family == "svd")
    ladder = runs[("svd", "ladder", "high")]
    assert ladder["rungs"] == ["high"]  # the injected OOM, then the ladder's next rung ran
    assert ladder["preset"] == "high+cpu_offload+forward_chunking+vae_slicing"
    assert (tmp_path / "out.json").is_file()


def test_architecture_flops_at_real_size():
    """Counted on the meta device: SDXL's guided 1024x1024 UNet call is ~13.5 TFLOP (two ~6.7 TFLOP
    forwards), and attention makes FLOPs grow faster than pixels."""
    square = gpu.architecture_flops("sdxl", 1024, 1024, 1)
    wide = gpu.architecture_flops("sdxl", 1024, 576, 1)
    assert 12e12 < square < 15e12
    assert square / wide > 1024 / 576
    svd = gpu.architecture_flops("svd", 1024, 576, 25)
    assert svd > 10 * wide  # 25 frames through a UNet about as wide as SDXL's
    assert gpu.architecture_flops("svd", 1024, 576, 14) < svd


@pytest.mark.slow
def test_real_size_svd_runs_through_the_worker_on_cpu(tmp_path):
    """The path a GPU run takes, on the CPU at 64 px: the real-size SVD-XT (2.3B parameters, ~9 GB in
    fp32) built with random weights, loaded by the worker through realsize.loader, a full stage with the
    high preset. The FLOPs counted on the stage's own UNet inputs equal the meta-device count."""
    from farm.cache import ArtifactCache

    case = gpu.Case("svd", "high", 64, 64, 3, 2, None, label="cpu-real")
    outcome = gpu.run_case(case, real=True, peak_tflops=None, cache=ArtifactCache(tmp_path))
    assert outcome.ok and outcome.rungs == [] and outcome.preset == "high" and outcome.decode_s > 0
    assert outcome.unet_calls == 3 and outcome.unet_batch == 2
    from farm.families import family

    made = family("svd").call_frames(2, 25)  # a 2-frame shot is made at SVD-XT's smallest call length
    assert made == 13 and outcome.flops_per_call == gpu.architecture_flops("svd", 64, 64, made)
    assert outcome.flops_per_call > 50e9  # a 1.5B-parameter UNet, even at 8x8 latents


def test_gpu_lease_runs_its_steps_time_boxed_and_merges_the_section(tmp_path):
    """The one-command GPU lease at tiny size: a step's cases are appended as they finish, profiled
    anchors carry their top ops, the section is written to --out and BENCHMARKS.md is left alone."""
    from bench import gpu_lease
    from bench.report import BENCHMARKS

    before = BENCHMARKS.read_bytes()
    assert gpu_lease.main(["--out", str(tmp_path), "--size", "tiny", "--steps", "anchors-eager",
                           "--budget", "400", "--no-write"]) == 0
    assert BENCHMARKS.read_bytes() == before
    records = [json.loads(line) for line in (tmp_path / "outcomes.jsonl").read_text().splitlines()]
    outcomes = [gpu.outcome_from(r["outcome"]) for r in records]
    assert [(o.case.family, o.case.label, o.compiled) for o in outcomes] == [("sdxl", "anchor", False),
                                                                           ("svd", "anchor", False)]
    assert all(o.ok and o.profile and o.channels_last is False for o in outcomes)  # no layout knob on a CPU
    section = (tmp_path / "section.md").read_text()
    assert "Top kernels of a 3-step sdxl stage" in section and "anchors-eager: ok" in section
    assert "not GPU figures" in section


def test_gpu_lease_kills_a_step_past_its_box(tmp_path):
    from bench import gpu_lease

    step = gpu_lease.Step("slow", ("--families", "sdxl", "--runs", "anchor"), 1)
    status, took = gpu_lease.run_step(step, "tiny", tmp_path / "o.jsonl", tmp_path / "log", timeout_s=1.0)
    assert status == "timed out" and took < 10
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written: a case is appended once it finished


@pytest.mark.parametrize("family", sorted(realsize.CONFIG_FILES))
def test_declared_weights_match_the_real_architectures(family):
    """Variant.weights_gb (what a worker checks before loading) is the bf16 size of the published
    architecture, counted on the meta device."""
    from farm.families import family as rules

    declared = rules(family).variant(realsize.VARIANTS.get(family)).weights_gb
    parts = realsize.components(family, "meta", torch.bfloat16)
    counted = sum(realsize.parameter_count(p) for p in parts.values() if isinstance(p, torch.nn.Module)) * 2 / 1e9
    assert declared == pytest.approx(counted, rel=0.01)


def test_a_worker_skips_a_load_its_card_cannot_hold():
    from farm.faults import OutOfMemory
    from farm.gpu.nvml import GpuInfo
    from farm.gpu.worker import StageWorker
    from farm.models import resolve_model
    from farm.presets import MemoryKnobs

    class Reached(Exception):
        pass

    def loader(*_args, **_kwargs):
        raise Reached

    flux = resolve_model("keyframe", "black-forest-labs/FLUX.1-schnell")
    worker = StageWorker("w", tier="high", loader=loader)
    worker.device, worker.gpu = "cuda", GpuInfo(0, "a 32 GB card", 32 * 10**9, 0, 0.0)  # what the check reads
    with pytest.raises(OutOfMemory, match=r"33\.72 GB .* 32\.0 GB"):
        worker.pipeline(flux, MemoryKnobs())
    with pytest.raises(Reached):  # offloaded, it loads
        worker.pipeline(flux, MemoryKnobs(cpu_offload=True))
    worker.gpu = GpuInfo(0, "an 80 GB card", 80 * 10**9, 0, 0.0)
    with pytest.raises(Reached):
        worker.pipeline(flux, MemoryKnobs())
