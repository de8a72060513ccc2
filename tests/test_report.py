"""The QC report opened in a real headless browser (Debian's chromium), from disk (issue 14)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import PIL.Image
from helpers import CHROMIUM, CHROMIUM_FLAGS

from farm.paths import OutputLayout
from farm.qc import resolve
from farm.report import write_report
from farm.shot_metrics import measure


def synthetic_job(tmp_path):
    """A finished two-shot job as write_report sees it: a lockfile's shots, frames and QC curves."""
    layout = OutputLayout(tmp_path / "out")
    rng = np.random.default_rng(3)
    frames = {sid: np.stack([np.roll((rng.random((48, 64, 3)) * 255).astype(np.uint8), t, axis=1)
                             for t in range(8)]) for sid in ("a", "b")}
    frames["b"][4:] = frames["b"][4]  # b froze: its first take failed
    layout.keyframe("a").parent.mkdir(parents=True)
    PIL.Image.fromarray(frames["a"][0]).save(layout.keyframe("a"))
    gates = resolve(None, None, tiny=True)
    shots, curves = [], {}
    for sid, take, passed in (("a", 1, True), ("b", 2, False)):
        metrics = measure(frames[sid], frames[sid][0])
        curves[sid] = metrics.pop("curves")
        takes = [{"take": n, "passed": passed, "failed": [] if passed else ["frozen"], "score": 1.0 * (not passed),
                  "metrics": metrics, "qc_stage": f"qc:{sid}"} for n in range(1, take + 1)]
        shots.append({"id": sid, "frames": 8, "seed": 7, "first_frame_from": "keyframe",
                      "qc": {"take": take, "passed": passed, "gates": gates.as_dict(), "takes": takes},
                      "video": {"segments": [{"worker": "w0", "tier": "cpu", "preset": "cpu/chunk8"}]}})
    lock = {"title": "Report <test>", "job": "j1", "fps": 8, "generation_fps": 8, "note": "tiny models",
            "models": {"keyframe": {"source": "tiny", "family": "sdxl"}, "video": {"source": "tiny", "family": "svd"}},
            "manifest": {"shots": [{"prompt": "a valley"}, {"prompt": "a river"}]}, "shots": shots}
    write_report(layout, lock, frames, curves, {"a": 3.5, "b": 7.0})
    return layout


def test_the_report_is_self_contained_and_says_what_passed(tmp_path):
    layout = synthetic_job(tmp_path)
    page = layout.report.read_text()
    assert page.count('<section class="shot') == 2 and page.count("<svg") == 2  # a plot per shot
    assert "Report &lt;test&gt;" in page  # escaped, not injected
    assert "src='http" not in page and 'src="http' not in page  # nothing fetched: images are data URIs
    assert 'class="shot fail"' in page and "frozen" in page
    sheet = PIL.Image.open(layout.contact_sheet)
    assert sheet.height >= 2 * 48  # a row per shot


def test_the_report_renders_in_headless_chromium(tmp_path):
    assert shutil.which(CHROMIUM), "Debian's chromium is missing: scripts/setup.sh installs it"
    layout = synthetic_job(tmp_path)
    url = layout.report.resolve().as_uri()
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert dom.count('<section class="shot') == 2 and "<svg" in dom  # what the browser built from the file
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                    "--window-size=1200,1600", url], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(PIL.Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    not_white = (pixels < 240).any(axis=2).mean()
    assert not_white > 0.05, not_white  # text, images, plots: not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # the frames and plots are there in colour
