"""GPU speed and memory of the farm's own stages, per VRAM tier, at real model sizes.

SDXL base, SVD-XT and I2VGen-XL are built at their real architecture sizes with random weights
(bench/realsize.py; nothing is downloaded) and run through farm.worker.StageWorker, the code a GPU
worker runs: memory knobs, speed knobs, observe(), the artifact cache. For each tier preset the
card is capped to that tier's size with torch.cuda.set_per_process_memory_fraction (low 12 GB,
mid 16 GB, high 24 GB); a stage that does not fit walks the director's OOM ladder
(the job book's Descend decisions) until it does. Reported: seconds per denoising step, seconds per
stage, FLOPs per UNet call (counted by torch's FlopCounterMode on the stage's own UNet inputs),
model FLOP utilisation against the card's bf16 peak, and peak VRAM. Two anchor runs compare with
published figures at equal settings.

Without a GPU the same code runs at tiny size on the CPU (what CI runs): no GPU figure comes out of
that, and the OOM ladder is exercised with the worker's fault hook instead of a memory cap.

    python -m bench.gpu                       # real size on a GPU, tiny on a CPU
    python -m bench.gpu --steps 10 --families sdxl svd
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils import flop_counter

from bench import realsize
from bench.report import machine, table, write_section
from farm.cache import ArtifactCache, model_identity
from farm.config import current
from farm.contract import FailureKind, StageResult
from farm.families import family as family_rules
from farm.faults import OutOfMemory
from farm.gpu.families import gpu_family
from farm.gpu.loading import load_pipeline
from farm.gpu.speed import CompileSetting
from farm.gpu.worker import StageWorker
from farm.jobbook import Descend, JobBook
from farm.jobsetup import setup_job
from farm.manifest import validate_data
from farm.models import ModelSpec, resolve_model
from farm.plan import build_plan
from farm.presets import GIB, GPU_TIERS

# What each tier preset must fit in: the bottom of the tier's range (docs/architecture.md: low < 16 GB is
# T4-class 16 GB cards and smaller; 12 GB is the small card the low preset promises to serve).
TIER_CAP_GB = {"low": 12, "mid": 16, "high": 24}
QUALITY, SCENE = "balanced", "smooth"
WARMUP_STEPS = 2
PROFILE_STEPS = 3

# Dense bf16 tensor-core peaks from the vendors' datasheets, matched against torch's device name in
# order (the first substring that matches wins, so "H100 PCIe" before "H100", "L40S" before "L4").
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)

# Published end-to-end figures at the settings the anchor runs use.
ANCHORS: dict[str, dict[str, Any]] = {
    "sdxl": {"width": 1024, "height": 1024, "steps": 30, "seconds": 2.54,
             "source": "diffusers SDXL speed-up guide: A100-80GB, bf16, SDPA, torch.compile"},
    "svd": {"width": 1024, "height": 576, "steps": 25, "frames": 25, "seconds": 22.6,
            "source": "Stability SVD-XT 1.1 TensorRT model card: H100 PCIe, end to end"},
}
ANCHOR_TARGETS_S = {"sdxl": 2.0, "svd": 20.0}  # issue 17's targets on an H100/H200-class card
UTILISATION_TARGET = 0.5


def bf16_peak_tflops(device_name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def utilisation(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Achieved FLOP/s over the peak; None where the peak or the time is unknown."""
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


def memory_fraction(cap_gb: float, total_bytes: int) -> float:
    return min(1.0, cap_gb * 1e9 / total_bytes)


def _cpu_sdpa_flops(q: Any, k: Any, v: Any, *_args: Any, out_shape: Any = None, **_kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


# torch counts the CUDA attention kernels but not the CPU one; without this the tiny CPU run would
# leave attention out of its FLOPs.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(unet: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """FLOPs of one UNet call on these inputs, counted from the ops that actually run."""
    forward = type(unet).forward if getattr(unet, "_farm_compiled", False) else unet  # eager, for the counter
    with flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter, \
            torch.no_grad():
        if forward is unet:
            unet(*args, **kwargs)
        else:
            forward(unet, *args, **kwargs)
    return int(counter.get_total_flops())


def unet_inputs(family: str, width: int, height: int, frames: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Inputs of one guided UNet call (batch 2: unconditional + conditional) of the farm's pipelines,
    built on the current default device: shapes as the pipelines make them."""
    h, w = height // 8, width // 8
    t = torch.tensor(500.0)
    if family == "sdxl":
        return ((torch.randn(2, 4, h, w, dtype=dtype), t),
                {"encoder_hidden_states": torch.randn(2, 77, 2048, dtype=dtype),
                 "added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, dtype=dtype),
                                       "time_ids": torch.randn(2, 6, dtype=dtype)}})
    if family == "svd":
        return ((torch.randn(2, frames, 8, h, w, dtype=dtype), t),
                {"encoder_hidden_states": torch.randn(2, 1, 1024, dtype=dtype),
                 "added_time_ids": torch.randn(2, 3, dtype=dtype)})
    return ((torch.randn(2, 4, frames, h, w, dtype=dtype), t),
            {"fps": torch.tensor([8, 8]), "image_latents": torch.randn(2, 4, frames, h, w, dtype=dtype),
             "image_embeddings": torch.randn(2, 1024, dtype=dtype),
             "encoder_hidden_states": torch.randn(2, 77, 1024, dtype=dtype)})


def architecture_flops(family: str, width: int, height: int, frames: int) -> int:
    """FLOPs of one guided UNet call at real size, counted on the meta device: no weights, no memory,
    seconds on any CPU. The GPU run counts the same on the stage's own inputs."""
    unet = realsize.components(family, "meta", torch.bfloat16)["unet"]
    with torch.device("meta"):
        args, kwargs = unet_inputs(family, width, height, frames, torch.bfloat16)
        return count_flops(unet, args, kwargs)


@contextlib.contextmanager
def host_syncs() -> Iterator[list[int]]:
    """Count operations that make the host wait for the GPU (an .item(), a copy to the host, a
    data-dependent shape) with torch's sync debug mode. Comparing a 2-step and an N-step stage tells
    per-step syncs, which stall the launch queue, from the few every stage has at its ends."""
    found = [0]
    if not torch.cuda.is_available():
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found[0] = sum("synchroniz" in str(w.message) for w in caught)


class UnetInputs:
    """Keeps the first UNet call's inputs of a stage, for counting that call's FLOPs afterwards."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] = {}
        self.handle = unet.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.args is None:
            self.args, self.kwargs = args, dict(kwargs)
        self.handle.remove()


def top_kernels(events: Any, limit: int = 12) -> list[str]:
    """The GPU kernels that took the most time in a profile, as table lines (name, share, ms, calls);
    without a GPU, the CPU ops by self time (so the CPU run exercises the same path)."""
    from torch.autograd import DeviceType

    def tally(counted: Any) -> dict[str, list[float]]:
        totals: dict[str, list[float]] = {}
        for event in filter(counted, events):
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us()
            entry[1] += 1
        return totals

    totals = tally(lambda e: e.device_type == DeviceType.CUDA) or \
        tally(lambda e: e.device_type == DeviceType.CPU and not e.cpu_children)
    whole = sum(us for us, _ in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:limit]
    return [f"| {short_kernel(name)} | {us / whole * 100:.1f}% | {us / 1000:.1f} | {int(n)} |"
            for name, (us, n) in ranked]


# The wrappers every PyTorch elementwise kernel's name starts with; what follows names the operation.
ELEMENTWISE = re.compile(r"^(void )?(at::native::)?((vectorized_|unrolled_)?elementwise_kernel<\d+, \d+, )?"
                         r"(at::native::)?(gpu_kernel_impl(_nocast)?<)?(at::native::)?")


def short_kernel(name: str, keep: int = 100) -> str:
    """A kernel's name for a table row: PyTorch's elementwise kernels share a long templated head, so
    it is cut and the operation behind it kept."""
    core = ELEMENTWISE.sub("", name)
    shown = f"elementwise: {core}" if core != name and "elementwise_kernel" in name else name
    return shown[:keep].replace("|", "/")


def profile_stage(worker: StageWorker, req: Any) -> list[str]:
    """Run one short stage under torch.profiler, on the worker's stage thread as `run` does: the profiler
    records the ops of the thread it is entered on (CUPTI sees every kernel either way)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    cache = ArtifactCache(req.cache_dir)
    source = cache.stage_input(req.kind, req.input_key)
    with profile(activities=activities):  # Kineto initialises on the thread that registered it (this one)
        pass

    def profiled() -> list[str]:
        with profile(activities=activities) as prof:
            worker._run(req, cache, source, 0.0)
        return top_kernels(prof.events())

    return worker.turn.submit(profiled).result()


# --- one stage -----------------------------------------------------------------------------------


@dataclass
class Case:
    family: str
    tier: str
    width: int
    height: int
    steps: int
    frames: int
    cap_gb: float | None  # None: the whole card
    label: str = ""
    inject_oom: bool = False  # CPU runs exercise the ladder through the worker's fault hook
    compile: CompileSetting = "auto"  # the farm config's `compile` for this run's worker
    profile: bool = False  # also profile a short stage: the top kernels by GPU time


@dataclass
class Outcome:
    case: Case
    preset: str = ""
    rungs: list[str] = field(default_factory=list)  # presets that ran out of memory, in ladder order
    ok: bool = False
    error: str = ""
    load_s: float = 0.0
    first_s: float = 0.0  # the warm-up stage: compile and first-call costs
    first_extra_s: float | None = None  # what the warm-up stage took beyond a warm stage of its steps
    compiled: bool | None = None  # whether the denoiser ran compiled (the worker's applied knobs)
    channels_last: bool | None = None  # whether the UNet ran NHWC
    syncs_per_step: float | None = None  # host-GPU synchronisations the denoising loop adds per step
    stage_s: float = 0.0  # video: the denoising stage and its decode stage
    call_s: float = 0.0
    decode_s: float = 0.0
    step_s: float | None = None
    unet_s: float | None = None
    unet_calls: int = 0
    unet_batch: int = 0
    flops_per_call: int = 0
    peak_vram: int | None = None
    mfu: float | None = None
    unet_util: float | None = None
    profile: list[str] = field(default_factory=list)  # top kernels of a profiled stage, as table lines


def bench_book(case: Case, spec: ModelSpec, cache: ArtifactCache) -> JobBook:
    """A one-shot job whose only GPU stage is this case: the director's own job book makes the request
    (farm.effective's parameters, the tier's preset, the OOM ladder), so nothing here rebuilds it."""
    role = realsize.ROLES[case.family]
    rules = family_rules(case.family)
    # The pipelines' default conditioning rates (SVD fps=7), or the model's own rate.
    fps = rules.variant(spec.variant).fps or (7 if case.family == "svd" else 8)
    root = Path(tempfile.mkdtemp(prefix="job-", dir=cache.root))
    image = np.random.default_rng(0).integers(0, 256, (case.height, case.width, 3), dtype=np.uint8)
    PIL.Image.fromarray(image).save(root / "input.png")
    prompt = "a lighthouse on a cliff at dusk, waves crashing, camera pans right"
    shot: dict[str, Any] = {"id": "bench", "prompt": prompt, "duration": max(1, case.frames) / fps, "scene": SCENE}
    if role == "video":
        shot["keyframe"] = "input.png"  # the video stage starts from this image
    manifest = validate_data({
        "version": 1, "title": "bench", "seed": 7, "quality": QUALITY, "models": {"keyframe": "tiny", "video": "tiny"},
        "steps": {"keyframe": case.steps, "video": case.steps},
        # Keyframes at the case's size, not the farm's default 1.875x the video size: the table's size is what ran.
        "output": {"fps": fps, "resolution": f"{case.width}x{case.height}",
                   "keyframe_resolution": f"{case.width}x{case.height}"}, "shots": [shot]}, root)
    setup = setup_job(manifest, root)
    specs = {**setup.specs, role: spec}
    plan = build_plan(manifest, specs["video"] if role == "video" else max(case.frames, 1))
    setup = replace(setup, specs=specs, plan=plan, identity={r: model_identity(s) for r, s in specs.items()})
    cache.put_arrays("bench-input", last=image)
    return JobBook("bench", setup, str(root / "out"), image_keys={"bench": "bench-input"})


def decode_stage(book: JobBook, worker: StageWorker, denoised: StageResult, result: Outcome, case: Case,
                 cache: ArtifactCache) -> None:
    """The video call's decode, a stage of its own in the farm: its time and memory join the call's, so
    the figures compare with a whole pipeline call (the published anchors include the decode)."""
    video, stage = "video:bench:0", "decode:bench:0"
    book.dispatched(video, worker.worker_id, case.tier, result.preset, book.request(video, case.tier).output_key, 0.0)
    book.on_success(video, denoised, 0.0)
    try:
        decoded = worker.run(replace(book.request(stage, case.tier, str(cache.root)), stage=stage))
    except OutOfMemory:
        result.ok, result.error = False, "out of memory in the decode"
        return
    result.decode_s = decoded.observed["seconds"]
    result.call_s += result.decode_s
    result.stage_s += decoded.wall_seconds
    peaks = [p for p in (result.peak_vram, decoded.observed["peak_vram_bytes"]) if p is not None]
    result.peak_vram = max(peaks) if peaks else None


def run_case(case: Case, *, real: bool, peak_tflops: float | None, cache: ArtifactCache) -> Outcome:
    """Run one stage the way a worker of `case.tier` would, walking the OOM ladder as the job book
    decides when it must."""
    spec = realsize.spec(case.family) if real else resolve_model(realsize.ROLES[case.family], f"tiny:{case.family}")
    loader = realsize.loader if real else load_pipeline
    cuda = torch.cuda.is_available()
    result = Outcome(case)
    worker = StageWorker(f"bench-{case.tier}", tier=case.tier, loader=loader,
                         config=current().model_copy(update={"compile": case.compile}))
    if cuda:
        # After the worker, which caps a forced tier at the top of its range (farm.presets.TIER_MEMORY_CAP):
        # the bench holds each preset to the bottom of its range, the smallest card the tier promises to serve.
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(case.cap_gb, total) if case.cap_gb else 1.0)
    if case.inject_oom:
        worker.set_faults([{"match": f"bench/{realsize.ROLES[case.family]}:*", "kind": "oom", "times": 1}])
    book = bench_book(case, spec, cache)
    stage = "keyframe:bench" if realsize.ROLES[case.family] == "keyframe" else "video:bench:0"
    try:
        while True:
            req = replace(book.request(stage, case.tier, str(cache.root)), stage=stage)
            result.preset = req.preset
            try:
                started = time.perf_counter()
                pipe, applied = worker.pipeline(spec, req.knobs)
                result.load_s = time.perf_counter() - started
                result.compiled = applied.get("compiled", False)
                result.channels_last = applied.get("channels_last", False)
                # A first stage of the same shapes but few steps: compiles (where compile is on) and warms
                # the kernels, as a long-lived worker's first stage does; the timed stage is the next one.
                warm = replace(req, params={**req.params, "num_inference_steps": WARMUP_STEPS},
                               output_key=req.output_key + "-warmup")
                started = time.perf_counter()
                with host_syncs() as warm_syncs:
                    warm_report = worker.run(warm)
                result.first_s = time.perf_counter() - started
                denoiser = gpu_family(case.family).denoisers(pipe)[0]
                inputs = UnetInputs(denoiser)
                with host_syncs() as syncs:
                    report = worker.run(req)
                if cuda and case.steps > WARMUP_STEPS:
                    # Never below 0: the warm-up stage has first-call syncs the timed one does not.
                    result.syncs_per_step = max(0.0, (syncs[0] - warm_syncs[0]) / (case.steps - WARMUP_STEPS))
            except OutOfMemory:  # the worker has already freed what the failed attempt held
                result.rungs.append(req.preset)
                book.dispatched(stage, worker.worker_id, case.tier, req.preset, req.output_key, 0.0)
                if isinstance(book.on_failure(stage, FailureKind.OOM, "out of memory", 0.0), Descend):
                    continue
                result.error = "out of memory on every rung of the ladder"
                break
            seen = report.observed
            result.ok = True
            result.stage_s = report.wall_seconds
            result.call_s = seen["seconds"]
            result.step_s = seen["step_seconds"]
            result.unet_calls, result.unet_batch = seen["unet_calls"], seen["unet_batch"]
            result.unet_s = seen["unet_seconds"] / max(1, seen["unet_calls"])
            result.peak_vram = seen["peak_vram_bytes"]
            if result.step_s:
                # The warm-up call beyond a warmed call of its steps: compile (where on) and first-call costs.
                steady = seen["seconds"] - (case.steps - WARMUP_STEPS) * result.step_s
                result.first_extra_s = max(0.0, warm_report.observed["seconds"] - steady)
            if case.profile:
                result.profile = profile_stage(worker, replace(
                    req, params={**req.params, "num_inference_steps": PROFILE_STEPS},
                    output_key=req.output_key + "-profile"))
            if inputs.args is not None:
                result.flops_per_call = count_flops(denoiser, inputs.args, inputs.kwargs)
            # One UNet call per step (guidance batched in it): the step's FLOPs are the call's.
            if result.step_s:
                result.mfu = utilisation(result.flops_per_call, result.step_s, peak_tflops)
            if result.unet_s:
                result.unet_util = utilisation(result.flops_per_call, result.unet_s, peak_tflops)
            break
        if result.ok and stage.startswith("video:"):
            decode_stage(book, worker, report, result, case, cache)
    finally:
        worker.pipelines.clear()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)
    return result


# --- the suite -----------------------------------------------------------------------------------


RUNS = ("anchor", "tier", "ladder")


def cases(real: bool, families: list[str], tiers: list[str], steps: int | None, runs: tuple[str, ...] = RUNS,
          compiles: tuple[CompileSetting, ...] = ("auto",), profile: bool = False,
          whole_card: bool = False) -> list[Case]:
    """The suite's stages, anchors first (the published comparisons), then each tier preset under its cap,
    then the ladder; each once per compile setting asked for (eager then compiled, for the side by side)."""
    out: list[Case] = []
    if "anchor" in runs:
        for family, a in ANCHORS.items():
            if family in families:
                width, height, frames = (a["width"], a["height"], a.get("frames", 1)) if real else \
                    (64, 64, resolve_model(realsize.ROLES[family], f"tiny:{family}").frames_per_call)  # type: ignore[arg-type]
                out += [Case(family, "high", width, height, a["steps"] if real else 2, frames, None, label="anchor",
                             compile=mode, profile=profile) for mode in compiles]
    for family in families:
        rules = family_rules(family)
        if real:
            # The farm's video size for the seed's families (keyframes render at the video size); the
            # others at their own native size, rounded to what they can make.
            native = rules.variant(realsize.VARIANTS.get(family)).size
            width, height = (1024, 576) if family in ("sdxl", "svd", "i2vgen") else native
            frames = realsize.FRAMES[family]
        else:
            tiny = resolve_model(realsize.ROLES[family], f"tiny:{family}")  # type: ignore[arg-type]
            width, height, frames = 64, 64, tiny.frames_per_call
        keyframe = realsize.ROLES[family] == "keyframe"
        for tier in tiers if "tier" in runs else ():
            default = rules.steps(QUALITY, tier, None, realsize.VARIANTS.get(family))  # type: ignore[arg-type]
            tier_steps = steps or (default if real else 2)
            cap = TIER_CAP_GB[tier] if real and not whole_card else None
            out += [Case(family, tier, width, height, tier_steps, frames, cap,
                         label="tier", compile=mode) for mode in compiles]
        if not keyframe and "ladder" in runs:
            # The high preset on the low tier's card must not fit; the ladder has to bring it down.
            out.append(Case(family, "high", width, height, steps or 2, frames,
                            TIER_CAP_GB["low"] if real else None, label="ladder", inject_oom=not real,
                            compile=compiles[0]))
    return out


def _gb(n: int | None) -> str:
    return "" if n is None else f"{n / GIB:.2f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.1f}%"


def rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    out = []
    for o in outcomes:
        c = o.case
        size = f"{c.width}x{c.height}" + (f"x{c.frames}f" if realsize.ROLES[c.family] == "video" else "")
        out.append({
            "model": c.family, "run": c.label, "tier preset": c.tier, "card cap GB": c.cap_gb or "all",
            "size": size, "steps": c.steps, "ran as": o.preset if o.ok else "",
            "compiled": "" if o.compiled is None else ("yes" if o.compiled else "no"),
            "layout": {None: "", True: "NHWC", False: "NCHW"}[o.channels_last],
            "OOM rungs": " > ".join(o.rungs) or "-", "s/step": f"{o.step_s:.3f}" if o.step_s else "",
            "s/stage": f"{o.stage_s:.2f}" if o.ok else o.error,
            "decode s": f"{o.decode_s:.2f}" if o.ok and o.decode_s else "",
            "load s": f"{o.load_s:.1f}" if o.ok else "", "warm-up stage s": f"{o.first_s:.1f}" if o.ok else "",
            "compile + first call s": "" if o.first_extra_s is None else f"{o.first_extra_s:.1f}",
            "UNet GFLOP/call": f"{o.flops_per_call / 1e9:.2f}",
            "MFU": _pct(o.mfu), "UNet util": _pct(o.unet_util), "peak VRAM GiB": _gb(o.peak_vram),
            "CFG batch": o.unet_batch, "host syncs/step": "" if o.syncs_per_step is None else f"{o.syncs_per_step:.1f}",
        })
    return out


def anchor_lines(outcomes: list[Outcome]) -> list[str]:
    lines = []
    for o in outcomes:
        if o.case.label != "anchor" or not o.ok or (o.case.width, o.case.height) != (
                ANCHORS[o.case.family]["width"], ANCHORS[o.case.family]["height"]):  # a tiny run compares nothing
            continue
        a = ANCHORS[o.case.family]
        target = ANCHOR_TARGETS_S[o.case.family]
        how = ("compiled" if o.compiled else "eager") + (", NHWC" if o.channels_last else "")
        lines.append(f"- {o.case.family} {o.case.width}x{o.case.height}, {o.case.steps} steps, {how}: "
                     f"**{o.call_s:.2f} s** "
                     f"end to end vs. {a['seconds']} s published ({a['source']}); ratio {o.call_s / a['seconds']:.2f}; "
                     f"target < {target} s: {'met' if o.call_s < target else 'missed'}; "
                     f"UNet util {_pct(o.unet_util) or 'n/a'}")
    return lines


def profile_lines(outcomes: list[Outcome]) -> list[str]:
    lines = []
    for o in outcomes:
        if o.profile:
            how = "compiled" if o.compiled else "eager"
            lines += ["", f"Top kernels of a {PROFILE_STEPS}-step {o.case.family} stage at "
                          f"{o.case.width}x{o.case.height}, {how} (torch.profiler, share of GPU kernel time; "
                          "CPU op time where there is no GPU):", "",
                      "| kernel | share | ms | calls |", "|---|---|---|---|", *o.profile]
    return lines


def outcome_record(o: Outcome) -> dict[str, Any]:
    return {**o.__dict__, "case": o.case.__dict__}


def outcome_from(record: dict[str, Any]) -> Outcome:
    return Outcome(**{**record, "case": Case(**record["case"])})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()  # one line per case is the progress
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("auto", "real", "tiny"), default="auto",
                    help="auto: real size on a GPU, tiny on a CPU")
    ap.add_argument("--families", nargs="+", default=["sdxl", "svd", "i2vgen"], choices=list(realsize.CONFIG_FILES),
                    help="families to measure (real-size configs in bench/configs/)")
    ap.add_argument("--tiers", nargs="+", default=list(GPU_TIERS), choices=list(GPU_TIERS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS,
                    help="anchor: the published comparisons; tier: each tier preset under its cap; ladder: OOM ladder")
    ap.add_argument("--steps", type=int, help="denoising steps per tier/ladder stage (default: the tier preset's)")
    ap.add_argument("--compile", choices=("auto", "on", "off", "both"), default="auto",
                    help="torch.compile of the denoiser (the farm config's `compile`); both: eager, then compiled")
    ap.add_argument("--profile", action="store_true", help="profile a short stage of each anchor: top kernels")
    ap.add_argument("--whole-card", action="store_true",
                    help="tier rows on the whole card, no cap (the speed of a model too big for the tier's cap)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the table")
    ap.add_argument("--json", type=Path, help="also write the outcomes here")
    ap.add_argument("--jsonl", type=Path, help="append each outcome here as it finishes (a killed run keeps them)")
    ap.add_argument("--from-jsonl", type=Path, nargs="+",
                    help="run nothing: write the section from outcomes appended by earlier runs (bench/gpu_lease.py)")
    ap.add_argument("--command", help="the command to name in the section (default: this one)")
    ap.add_argument("--note", default="", help="a paragraph to add to the section (the lease's card and steps)")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = ap.parse_args(argv)

    if args.from_jsonl:
        records = [json.loads(line) for path in args.from_jsonl for line in path.read_text().splitlines() if line]
        if not records:
            sys.exit("no outcomes in " + " ".join(map(str, args.from_jsonl)))
        if len({(r["device"], r["real"]) for r in records}) > 1:
            sys.exit("outcomes from different cards or sizes do not make one section")
        # The newest lease names the machine; a case measured again replaces its earlier row.
        device_name, real, peak, where = (records[-1][k] for k in ("device", "real", "peak_tflops", "machine"))
        newest = {json.dumps(r["outcome"]["case"], sort_keys=True): outcome_from(r["outcome"]) for r in records}
        outcomes = list(newest.values())
    else:
        cuda = torch.cuda.is_available()
        real = args.size == "real" or (args.size == "auto" and cuda)
        if real and not cuda:
            sys.exit("--size real needs a CUDA GPU (the real-size models are tens of GB of activations)")
        device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
        peak = args.peak_tflops or (bf16_peak_tflops(device_name) if cuda else None)
        where = machine()
        compiles: tuple[CompileSetting, ...] = ("off", "on") if args.compile == "both" else (args.compile,)
        outcomes = []
        with tempfile.TemporaryDirectory(prefix="farm-bench-gpu-") as tmp:
            cache = ArtifactCache(tmp)
            for case in cases(real, args.families, args.tiers, args.steps, tuple(args.runs), compiles, args.profile,
                              args.whole_card):
                outcome = run_case(case, real=real, peak_tflops=peak, cache=cache)
                outcomes.append(outcome)
                print(json.dumps(rows([outcome])[0]), flush=True)
                if args.jsonl:
                    with args.jsonl.open("a") as f:
                        f.write(json.dumps({"device": device_name, "real": real, "peak_tflops": peak,
                                            "machine": where, "outcome": outcome_record(outcome)}) + "\n")

    body = _body(outcomes, real, device_name, peak) + (f"\n{args.note.strip()}\n" if args.note else "")
    print(body)
    result = {"device": device_name, "real": real, "peak_tflops": peak,
              "outcomes": [outcome_record(o) for o in outcomes]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.no_write:
        command = args.command or "python -m bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
        if real:
            key = "gpu-" + re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
            write_section(key, f"GPU stages at real size: {device_name} (issues 6 and 17)", command.strip(), body,
                          where)
        else:
            write_section("gpu-cpu-smoke", "bench/gpu.py at tiny size on the CPU (issue 6; not a GPU figure)",
                          command.strip(), body, where)
    return result


def architecture_rows() -> list[dict[str, Any]]:
    """FLOPs per guided UNet call at real size (meta device), and what the published anchors imply."""
    out = []
    for family, frames in (("sdxl", 1), ("svd", 25), ("i2vgen", 16)):
        tflop = architecture_flops(family, 1024, 576, frames) / 1e12
        out.append({"model": family, "size": "1024x576" + (f"x{frames}f" if frames > 1 else ""),
                    "UNet TFLOP per guided call": f"{tflop:.2f}", "published anchor": "", "implied TFLOP/s": ""})
    for family, a in ANCHORS.items():
        frames = a.get("frames", 1)
        tflop = architecture_flops(family, a["width"], a["height"], frames) / 1e12
        rate = tflop * a["steps"] / a["seconds"]
        out.append({"model": family, "size": f"{a['width']}x{a['height']}" + (f"x{frames}f" if frames > 1 else ""),
                    "UNet TFLOP per guided call": f"{tflop:.2f}",
                    "published anchor": f"{a['steps']} steps in {a['seconds']} s ({a['source']})",
                    "implied TFLOP/s": f"{rate:.0f} (UNet only, a lower bound)"})
    return out


def _body(outcomes: list[Outcome], real: bool, device_name: str, peak: float | None) -> str:
    if real:
        head = (f"Real architecture sizes (bench/configs/), random weights, bf16, on **{device_name}** "
                f"(bf16 peak {peak or 'unknown'} TFLOP/s). Each tier preset runs with the card capped to the "
                "tier's size; `OOM rungs` lists presets that ran out of memory before the ladder found one "
                "that fits. s/step is the median time between denoising steps; MFU = UNet FLOPs per step / "
                "s/step / peak; UNet util = the same over time inside the UNet call. Each case first runs a "
                f"{WARMUP_STEPS}-step stage of the same shapes (compile and first-call costs: `warm-up stage s`); "
                "the timed stage is the next. `host syncs/step` is what the denoising loop adds per step "
                "(torch's sync debug mode, N-step minus 2-step stage).\n\n")
    else:
        head = ("No GPU: the same code at tiny size on the CPU, so CI keeps it working. These are **not GPU "
                "figures**; MFU is left out (no bf16 peak for a CPU). The ladder row injects one OOM through "
                "the worker's fault hook and shows the next rung running.\n\n")
    text = head + table(rows(outcomes)) + "\n"
    lines = anchor_lines(outcomes)
    if lines:
        text += "\nAnchors at equal settings:\n\n" + "\n".join(lines) + "\n"
    profiled = profile_lines(outcomes)
    if profiled:
        text += "\n".join(profiled) + "\n"
    text += ("\nFLOPs of the real architectures, counted by torch's FlopCounterMode on the meta device (no GPU "
             "needed; the anchors' rates are derived from their published times, not measured here):\n\n"
             + table(architecture_rows()) + "\n")
    utils = [o.unet_util for o in outcomes if o.unet_util is not None and o.case.label == "tier"]
    if utils:
        text += (f"\nMedian UNet utilisation over the tier runs: {statistics.median(utils) * 100:.1f}% "
                 f"(target > {UTILISATION_TARGET * 100:.0f}%).\n")
    return text


if __name__ == "__main__":
    main()
