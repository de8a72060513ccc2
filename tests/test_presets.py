"""The preset tables match docs/sources.md, and the rules that combine them do what docs/architecture.md says."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from farm import presets as p

GIB = 1024**3


def test_tier_table_matches_seeds():
    assert p.TIER_PRESETS["high"].decode_chunk == (12, 14) and p.TIER_PRESETS["high"].video_steps == (60, 70)
    assert p.TIER_PRESETS["mid"].decode_chunk == (8, 10) and p.TIER_PRESETS["mid"].video_steps == (50, 60)
    assert p.TIER_PRESETS["low"].decode_chunk == (4, 6) and p.TIER_PRESETS["low"].video_steps == (50, 50)
    low = p.memory_knobs("low")
    assert low.cpu_offload and low.forward_chunking and low.vae_slicing
    assert not p.memory_knobs("high").cpu_offload


@pytest.mark.parametrize(("gib", "tier"), [(80, "high"), (48, "high"), (24.5, "high"), (23.6, "mid"),
                                           (16, "mid"), (15.6, "mid"), (12, "low"), (8, "low")])
def test_tier_for_vram(gib, tier):
    assert p.tier_for_vram(int(gib * GIB)) == tier


def test_quality_templates_match_seeds():
    t = p.QUALITY_TEMPLATES
    high = t["high"]
    assert (high.keyframe_steps, high.video_steps, high.crf, high.x264_preset) == (50, 70, 18, "slow")
    assert (t["balanced"].keyframe_steps, t["balanced"].video_steps, t["balanced"].crf) == (40, 60, 20)
    assert (t["fast"].fps, t["fast"].decode_chunk, t["fast"].noise_aug_strength, t["fast"].crf) == (12, 6, 0.0003, 23)


@pytest.mark.parametrize(("quality", "tier", "steps", "chunk"), [
    ("balanced", "high", 60, 12), ("high", "high", 70, 12), ("balanced", "mid", 60, 10), ("fast", "mid", 50, 8),
    ("balanced", "low", 50, 6), ("high", "low", 50, 6), ("fast", "low", 50, 6),
])
def test_effective_steps_and_chunk_fall_in_the_tier_range(quality, tier, steps, chunk):
    assert p.video_steps(quality, tier, None) == steps
    assert p.decode_chunk_size(quality, "smooth", tier) == chunk
    lo, hi = p.TIER_PRESETS[tier].video_steps
    assert lo <= steps <= hi


def test_pinned_steps_are_the_same_on_every_tier():
    assert {p.video_steps("balanced", t, 25) for t in p.TIERS} == {25}
    assert p.keyframe_steps("high", 12) == 12 and p.keyframe_steps("fast", None) == 30


def test_scene_caps_decode_chunk():
    # static scenes want 8-10 frames per decode: on a high tier the tier floor (12) still wins.
    assert p.decode_chunk_size("high", "static", "mid") == 10
    assert p.decode_chunk_size("high", "static", "high") == 12


def test_cli_presets_prints_every_table():
    out = subprocess.run([sys.executable, "-m", "farm.cli", "presets", "--json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert set(data) >= {"tiers", "quality", "scenes", "families"}
    assert set(data["families"]) == {"sdxl", "flux", "sd3", "svd", "i2vgen", "wan", "ltx"}
    assert data["families"]["svd"]["motion_buckets"] == {"low": 60, "medium": 127, "high": 200}
    assert data["families"]["i2vgen"]["presets"]["high_motion"] == {"steps": 60, "guidance": 11.0}
    assert data["families"]["wan"]["variants"]["ti2v-5b"]["frames_per_call"] == 121
    assert data["effective_video"]["balanced"]["low"] == {"steps": 50, "decode_chunk_size": 6}
    text = subprocess.run([sys.executable, "-m", "farm.cli", "presets"], capture_output=True, text=True, timeout=60)
    assert "16-24 GB" in text.stdout and "DPM++ 2M Karras" in text.stdout
    assert "== family wan: Wan 2.x (image-to-video)" in text.stdout and "Apache-2.0" in text.stdout
    # every parameter's precedence: shot, job, template, scene, tier and model, first wins (issue 13.6)
    assert set(data["precedence"]) >= {"video steps", "keyframe guidance", "video guidance", "motion",
                                       "noise_aug_strength", "decode_chunk_size", "memory knobs"}
    assert "== precedence" in text.stdout and "quality template" in text.stdout
    noise = data["precedence"]["noise_aug_strength"]
    assert noise.index("shot noise_aug_strength") < noise.index("shot scene's") < noise.index("quality template's")
    assert data["tier_memory_cap_gib"] == {"high": None, "mid": 24.0, "low": 15.0, "cpu": None}


def test_preview_keeps_shots_and_cuts_but_shrinks_cost():
    from conftest import EXAMPLES

    from farm.manifest import load
    from farm.plan import build_plan
    from farm.preview import preview

    full = load(EXAMPLES / "storyboard.yaml")
    draft = preview(full)
    assert draft.output.size == (256, 144) and draft.output.final_resolution is None
    assert draft.steps.keyframe == draft.steps.video == p.PREVIEW_STEPS
    assert [s.id for s in draft.shots] == [s.id for s in full.shots]
    full_plan, draft_plan = build_plan(full, 25), build_plan(draft, 25)
    assert list(full_plan.stages) == list(draft_plan.stages)
    assert [sp.seed for sp in full_plan.shots] == [sp.seed for sp in draft_plan.shots]
    assert p.preview_size(1920, 1080) == (256, 144) and p.preview_size(200, 96) == (200, 96)


# --- a forced tier caps the card (issue 13.14) ---------------------------------------------------------

@pytest.mark.parametrize("tier,card_gib,fraction", [
    ("low", 80, 15 / 80), ("mid", 80, 24 / 80), ("high", 80, None), ("cpu", 80, None),
    ("low", 12, None),  # a real low card needs no cap
    ("mid", 23.6, None),  # nor a real 24 GB card
    ("low", 24, 15 / 24),
])
def test_a_forced_tier_caps_memory_to_what_that_tier_has(tier, card_gib, fraction):
    got = p.memory_fraction(tier, int(card_gib * GIB))
    assert got == pytest.approx(fraction) if fraction else got is None


@pytest.mark.parametrize("tier", ["mid", "low"])
def test_each_cap_is_a_card_of_its_own_tier(tier):
    assert p.tier_for_vram(p.TIER_MEMORY_CAP[tier]) == tier


def test_the_worker_applies_the_cap_only_when_the_tier_is_forced():
    from farm.gpu.nvml import GpuInfo
    from farm.gpu.worker import cap_memory

    h200 = GpuInfo(0, "NVIDIA H200", int(139 * GIB), 0, 0.0)
    applied: list[float] = []
    assert cap_memory("low", "low", h200, applied.append) == pytest.approx(15 / 139)
    assert applied == [pytest.approx(15 / 139)]
    assert cap_memory("auto", "high", h200, applied.append) is None  # the card's own tier: all of it
    assert cap_memory("low", "low", None, applied.append) is None  # no GPU (a CPU worker) has nothing to cap
    assert len(applied) == 1


def test_a_preset_that_keeps_weights_resident_needs_room_for_them():
    """FLUX.1's 33.7 GB of bf16 weights do not fit a 32 GB high-tier card with the high preset (no
    offload): the worker says so before reading them and the ladder takes the next rung."""
    from farm.presets import MemoryKnobs, holds_weights

    flux, gb = 33.72e9, 1e9
    assert not holds_weights(MemoryKnobs(), flux, 32 * gb)
    assert holds_weights(MemoryKnobs(), flux, 80 * gb)
    assert not holds_weights(MemoryKnobs(vae_tiling=True), flux, 32 * gb)  # tiling keeps the weights resident
    for offload in (MemoryKnobs(cpu_offload=True), MemoryKnobs(group_offload=True), MemoryKnobs(fp8_storage=True)):
        assert holds_weights(offload, flux, 12 * gb)
    assert holds_weights(MemoryKnobs(), None, 12 * gb) and holds_weights(MemoryKnobs(), flux, None)  # unknown: try
