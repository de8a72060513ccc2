"""Manifest v1: every refusal names its field, and nothing renders from a bad manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import base_manifest, write_manifest, write_png

from farm import manifest as mf

AT_LEAST_A_FRAME = "Input should be greater than or equal to 0.01"


def errors_of(data, root=None) -> list[str]:
    with pytest.raises(mf.ManifestError) as info:
        mf.validate_data(data, root)
    return [str(e) for e in info.value.errors]


def test_minimal_manifest_gets_defaults():
    m = mf.validate_data({"version": 1, "title": "t", "shots": [{"id": "a", "prompt": "p", "duration": 1}]})
    assert m.quality == "balanced"
    assert m.output.size == (1024, 576)
    assert m.models.video == mf.DEFAULT_VIDEO_MODEL
    assert m.defaults.guidance_scale is None and m.defaults.guidance_rescale == 0.7  # None: the family's CFG
    assert m.shots[0].scene is None  # the preset rules pick the scene (farm presets shows the precedence)


def test_example_storyboard_is_valid():
    from conftest import EXAMPLES

    m = mf.load(EXAMPLES / "storyboard.yaml")
    assert len(m.shots) >= 4
    assert any(s.continue_from == "previous" for s in m.shots)
    assert any(s.keyframe for s in m.shots)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["shots"][1].update(durration=2), "shots[1].durration: unknown field"),
        (lambda d: d.update(colour="red"), "colour: unknown field"),
        (lambda d: d["shots"][1].update(duration=0), f"shots[1].duration: {AT_LEAST_A_FRAME}"),
        (lambda d: d["shots"][0].update(duration=-2.5), f"shots[0].duration: {AT_LEAST_A_FRAME}"),
        (lambda d: d["output"].update(resolution="100x64"), "output.resolution: resolution 100x64: both sides"),
        (lambda d: d["output"].update(final_resolution="1920x1081"), "output.final_resolution:"),
        (lambda d: d.update(quality="ultra"), "quality: Input should be 'draft', 'fast', 'balanced' or 'high'"),
        (lambda d: d["shots"][0].update(motion="wild"), "shots[0].motion: Input should be 'low', 'medium'"),
        (lambda d: d["shots"][0].update(scene="chaos"), "shots[0].scene: Input should be 'static'"),
        (lambda d: d["shots"][0].update(motion_bucket_id=300), "shots[0].motion_bucket_id:"),
        (lambda d: d["shots"][0].update(id="bad id!"), "shots[0].id: String should match pattern"),
        (lambda d: d.update(version=2), "version: Input should be 1"),
        (lambda d: d["output"].update(transition="wipe"), "output.transition:"),
        (lambda d: d["shots"][0].update(continue_from="previous"), "shots[0].continue_from: the first shot"),
        (lambda d: d["models"].update(video="acme/text-to-music"), "models.video: "),
    ],
)
def test_refusals_name_the_field(mutate, expected):
    data = base_manifest()
    mutate(data)
    errs = errors_of(data)
    assert any(e.startswith(expected) for e in errs), errs


def test_duplicate_shot_ids():
    data = base_manifest()
    data["shots"][1]["id"] = "a"
    assert errors_of(data) == ["shots[1].id: duplicate shot id 'a' (also shots[0])"]


def test_all_errors_reported_at_once():
    data = base_manifest()
    data["shots"][0]["duration"] = 0
    data["shots"][1]["motion"] = "fast"
    errs = errors_of(data)
    assert len(errs) == 2 and errs[0].startswith("shots[0].duration") and errs[1].startswith("shots[1].motion")


def test_motion_and_bucket_are_exclusive():
    data = base_manifest()
    data["shots"][0].update(motion="low", motion_bucket_id=40)
    assert errors_of(data)[0].startswith("shots[0]: give either motion")


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "~/x.png", "images/../../outside.png"])
def test_keyframe_paths_cannot_escape_root(tmp_path, bad):
    root = tmp_path / "job"
    write_png(tmp_path / "outside.png")
    data = base_manifest()
    data["shots"][0]["keyframe"] = bad
    errs = errors_of(data, root)
    assert errs[0].startswith("shots[0].keyframe:"), errs
    assert "absolute" in errs[0] or "escapes" in errs[0]


def test_keyframe_symlink_pointing_outside_is_refused(tmp_path):
    root = tmp_path / "job"
    (root / "images").mkdir(parents=True)
    target = write_png(tmp_path / "secret.png")
    os.symlink(target, root / "images" / "link.png")
    data = base_manifest()
    data["shots"][0]["keyframe"] = "images/link.png"
    assert "escapes" in errors_of(data, root)[0]


def test_keyframe_inside_root_is_accepted_and_missing_file_refused(tmp_path):
    write_png(tmp_path / "images" / "k.png")
    data = base_manifest()
    data["shots"][0]["keyframe"] = "images/k.png"
    mf.validate_data(data, tmp_path)
    data["shots"][0]["keyframe"] = "images/missing.png"
    assert errors_of(data, tmp_path) == ["shots[0].keyframe: file not found: images/missing.png"]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_refused_unless_allowed(tmp_path, suffix):
    (tmp_path / f"model{suffix}").write_bytes(b"\x80\x04")
    data = base_manifest()
    data["models"]["keyframe"] = f"model{suffix}"
    errs = errors_of(data, tmp_path)
    assert errs[0].startswith("models.keyframe:") and "pickle" in errs[0]
    data["models"]["allow_pickle"] = True
    mf.validate_data(data, tmp_path)


def test_pickle_lora_refused(tmp_path):
    (tmp_path / "style.bin").write_bytes(b"x")
    data = base_manifest()
    data["models"]["lora"] = "style.bin"
    assert errors_of(data, tmp_path)[0].startswith("models.lora:")


def test_crossfade_longer_than_a_shot_is_refused():
    data = base_manifest()
    data["output"].update(transition="crossfade", crossfade_seconds=0.5)
    assert errors_of(data) == ["shots[1].duration: must be longer than output.crossfade_seconds (0.5)"]


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\ntitle: [unclosed\n")
    with pytest.raises(mf.ManifestError) as info:
        mf.load(path)
    assert "invalid YAML at line" in str(info.value)


def test_json_manifest_accepted(tmp_path):
    path = tmp_path / "story.json"
    path.write_text(json.dumps(base_manifest()))
    assert mf.load(path).shots[0].id == "a"


def farm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "farm.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_validate_exit_codes(tmp_path):
    good = write_manifest(tmp_path, base_manifest())
    result = farm("validate", str(good))
    assert result.returncode == 0, result.stderr
    data = base_manifest()
    data["shots"][1]["duration"] = -1
    data["shots"][0]["bogus"] = True
    bad = write_manifest(tmp_path, data, "bad.yaml")
    result = farm("validate", str(bad))
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert lines == ["shots[0].bogus: unknown field", f"shots[1].duration: {AT_LEAST_A_FRAME}"]


def test_cli_schema_is_json_schema():
    import jsonschema

    result = farm("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "shots" in schema["properties"] and schema["additionalProperties"] is False
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(base_manifest())
    bad = base_manifest()
    bad["shots"][0]["duration"] = 0
    assert not validator.is_valid(bad)


def test_lora_and_vae_stay_inside_the_root(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "style.safetensors").write_bytes(b"x")
    data = base_manifest()
    data["models"]["lora"] = "../style.safetensors"
    data["models"]["vae"] = str(tmp_path / "style.safetensors")
    errs = errors_of(data, tmp_path / "job")
    assert errs[0].startswith("models.lora:") and "escapes" in errs[0]
    assert errs[1].startswith("models.vae:") and "absolute" in errs[1]
