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


def test_motion_levels_map_to_real_svd_buckets():
    assert p.motion_bucket("low", None, "smooth") == 60
    assert p.motion_bucket(None, None, "smooth") == 127  # SVD's own default bucket
    assert p.motion_bucket(None, None, "dynamic") == 200
    assert p.motion_bucket(None, 33, "dynamic") == 33


@pytest.mark.parametrize(("subjects", "level", "guidance"), [(1, 1, 7.0), (2, 1, 7.0), (1, 2, 7.0), (2, 2, 9.0),
                                                            (3, 2, 9.0), (3, 3, 9.0)])
def test_adaptive_guidance_rule(subjects, level, guidance):
    # docs/sources.md's rule as written: the score is at most (3 + 3) / 2 = 3.0, so it alone never gives 11.0;
    # the motion-type ranges are what take strong motion to 11-12 (next test).
    assert p.adaptive_guidance(subjects, level) == guidance


@pytest.mark.parametrize(("prompt", "motion", "subjects", "lo", "hi"), [
    ("leaves gently swaying in the wind", "medium", 1, 7.0, 8.0),
    ("a person turning her head", "low", 1, 9.0, 10.0),
    ("a dog jumping over a fence", "low", 1, 11.0, 12.0),
    ("camera zooming in slowly on a house", "low", 1, 10.0, 11.0),
    ("waves crashing while the camera pans right", "low", 2, 11.0, 12.5),
])
def test_i2vgen_guidance_follows_motion_type(prompt, motion, subjects, lo, hi):
    assert lo <= p.i2vgen_guidance(prompt, motion, subjects) <= hi


def test_oom_ladder_walks_down_to_the_floor():
    preset = p.video_preset("balanced", "smooth", "high")
    labels = [preset.label()]
    while (preset := p.next_lower_preset(preset, "balanced", "smooth")) is not None:
        labels.append(preset.label())
    assert labels[0] == "high/chunk12"
    assert labels[1] == "high/chunk12+cpu_offload+forward_chunking+vae_slicing"
    assert labels[2].startswith("mid/chunk10+") and labels[3].startswith("mid/chunk8+")
    assert labels[-1].startswith("low/chunk4+")
    assert len(labels) == len(set(labels))


def test_keyframe_ladder_turns_on_one_memory_knob_per_rung():
    preset = p.keyframe_preset("high")
    labels = [preset.label()]
    while (preset := p.next_lower_preset(preset, "balanced", "smooth")) is not None:
        labels.append(preset.label())
    assert labels == ["high", "high+cpu_offload", "high+cpu_offload+vae_slicing",
                      "high+cpu_offload+forward_chunking+vae_slicing"]
    low = p.keyframe_preset("low")  # the low tier starts with every knob on: no rung below it
    assert p.next_lower_preset(low, "balanced", "smooth") is None


def test_cli_presets_prints_every_table():
    out = subprocess.run([sys.executable, "-m", "farm.cli", "presets", "--json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert set(data) >= {"tiers", "quality", "scenes", "motion_buckets", "i2vgen_motion_types", "i2vgen_presets"}
    assert data["effective_video"]["balanced"]["low"] == {"steps": 50, "decode_chunk_size": 6}
    text = subprocess.run([sys.executable, "-m", "farm.cli", "presets"], capture_output=True, text=True, timeout=60)
    assert "16-24 GB" in text.stdout and "DPM++ 2M Karras" in text.stdout


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
