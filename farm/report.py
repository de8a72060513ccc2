"""OUT/report.html and OUT/contact_sheet.png: a render as a person would rather look at it than read it.

The report is one self-contained file (images as data URIs, plots as inline SVG drawn by matplotlib),
so it opens from disk, mails, and archives. Per shot: the keyframe, a strip of frames, the QC
metrics against their gates, a plot of the frame-to-frame difference and the optical flow over time,
the takes and which was kept, and where and how long it rendered.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw

from farm.paths import OutputLayout, atomic_path, atomic_write_text
from farm.qc import METRICS

STRIP = 6  # frames per shot in the strip and on the contact sheet
THUMB_W = 192


def _png_uri(image: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(array: np.ndarray, width: int = THUMB_W) -> PIL.Image.Image:
    image = PIL.Image.fromarray(np.ascontiguousarray(array[..., :3], dtype=np.uint8))
    return image.resize((width, max(1, round(image.height * width / image.width))), PIL.Image.Resampling.LANCZOS)


def strip(frames: np.ndarray, n: int = STRIP, width: int = THUMB_W) -> PIL.Image.Image:
    """`n` frames evenly spaced over the shot, side by side."""
    picks = np.linspace(0, len(frames) - 1, num=min(n, len(frames))).round().astype(int)
    thumbs = [_thumb(frames[i], width) for i in picks]
    out = PIL.Image.new("RGB", (sum(t.width for t in thumbs) + 4 * (len(thumbs) - 1), thumbs[0].height), "white")
    x = 0
    for t in thumbs:
        out.paste(t, (x, 0))
        x += t.width + 4
    return out


def curve_svg(curves: Mapping[str, Sequence[float]], fps: float) -> str:
    """Frame-to-frame difference and optical flow over the shot, as inline SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(5.5, 1.8), dpi=72)
    diff, flow = curves.get("difference", []), curves.get("flow", [])
    t = [(i + 1) / fps for i in range(len(diff))]
    left.plot(t, diff, color="#c0392b", label="mean |Δ| (0-255)")
    left.set_xlabel("seconds")
    left.set_ylabel("difference", color="#c0392b")
    right = left.twinx()
    right.plot(t[:len(flow)], flow, color="#2471a3", label="flow (px)")
    right.set_ylabel("flow", color="#2471a3")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _shot_section(shot: Mapping[str, Any], prompt: str, keyframe: str | None, frames_uri: str | None,
                  curves: Mapping[str, Sequence[float]], fps: float, seconds: float) -> str:
    qc = shot.get("qc") or {}
    kept = next((t for t in qc.get("takes", []) if t["take"] == qc.get("take")), None)
    metrics = kept["metrics"] if kept else {}
    gates = (qc.get("gates") or {}).get("thresholds", {})
    passed = qc.get("passed")
    badge = "pass" if passed else ("fail" if passed is False else "unchecked")
    rows = []
    for name, metric in METRICS.items():
        value = metrics.get(name)
        gate = gates.get(name)
        ok = "" if gate is None or value is None else ("pass" if metric.passes(value, gate) else "fail")
        sign = "≥" if metric.better == "higher" else "≤"
        rows.append(f"<tr class='{ok}'><td title='{html.escape(metric.meaning)}'>{name}</td><td>{_fmt(value)}</td>"
                    f"<td>{'' if gate is None else sign + ' ' + _fmt(gate)}</td><td>{ok or '-'}</td></tr>")
    takes = "".join(
        f"<tr class='{'kept' if t['take'] == qc.get('take') else ''}'><td>{t['take']}</td>"
        f"<td>{'pass' if t['passed'] else 'fail'}</td><td>{html.escape(', '.join(t['failed']) or '-')}</td>"
        f"<td>{t['score']:.3f}</td><td>{'kept' if t['take'] == qc.get('take') else ''}</td></tr>"
        for t in qc.get("takes", []))
    segments = shot["video"]["segments"]
    where = ", ".join(sorted({f"{s['worker']} ({s['tier']}, {s['preset']})" for s in segments}))
    images = "".join(f"<img alt='{alt}' src='{uri}'>" for alt, uri in (("keyframe", keyframe), ("frames", frames_uri))
                     if uri)
    plot = curve_svg(curves, fps) if curves.get("difference") else "<p>one frame: no motion to plot</p>"
    return f"""<section class="shot {badge}" id="shot-{html.escape(shot['id'])}">
<h2>{html.escape(shot['id'])} <span class="badge {badge}">{badge}</span></h2>
<p class="prompt">{html.escape(prompt)}</p>
<div class="images">{images}</div>{_cast(shot.get("characters", []), metrics)}
<div class="cols"><table class="metrics"><tr><th>metric</th><th>value</th><th>gate</th><th></th></tr>{''.join(rows)}
</table><div class="plot">{plot}</div></div>
<table class="takes"><tr><th>take</th><th>QC</th><th>failed</th><th>score</th><th></th></tr>{takes}</table>
<p class="where">{shot['frames']} frames, seed {shot['seed']}, rendered on {html.escape(where)}
in {seconds:.1f} s of stage time; starts from its {html.escape(shot['first_frame_from'])}.</p>
</section>"""


def _cast(characters: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> str:
    """The characters a shot's keyframe was drawn with, their reference photos beside it, and how alike
    the keyframe's face came out (the identity metric, and which face analyser measured it)."""
    if not characters:
        return ""
    per = metrics.get("identity_per_character") or {}
    by = html.escape(str(metrics.get("identity_by", "not measured")))
    out = []
    for c in characters:
        thumbs = []
        for ref in c.get("references", []):
            try:
                with PIL.Image.open(ref["file"]) as image:
                    thumbs.append(f"<img alt='{html.escape(ref['path'])}' title='{html.escape(ref['path'])}' "
                                  f"src='{_png_uri(_thumb(np.asarray(image.convert('RGB')), 96))}'>")
            except (OSError, KeyError, ValueError):  # moved since: the path and hash still say which it was
                thumbs.append(f"<span>{html.escape(str(ref.get('path')))}</span>")
        score = per.get(c["name"])
        out.append(f"<div class='character'><b>{html.escape(c['name'])}</b> ({html.escape(c['method'])}, strength "
                   f"{c['strength']}; identity {_fmt(score) if score is not None else 'n/a'} by {by}) "
                   f"{''.join(thumbs)}</div>")
    return "<div class='cast'>" + "".join(out) + "</div>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}
section.shot{background:#fff;border:1px solid #ddd;border-left:6px solid #999;padding:1em;margin:1em 0}
section.pass{border-left-color:#27ae60} section.fail{border-left-color:#c0392b}
.badge{font-size:.7em;padding:.2em .5em;border-radius:.3em;color:#fff;background:#999;vertical-align:middle}
.badge.pass{background:#27ae60} .badge.fail{background:#c0392b}
.images img{margin-right:8px;border:1px solid #ccc;vertical-align:top;max-width:100%;height:auto}
.cols{display:flex;gap:1.5em;align-items:flex-start} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left;font-size:.9em}
tr.fail td{background:#fdecea} tr.pass td{background:#eafaf1} tr.kept td{font-weight:bold}
.prompt{font-style:italic;color:#555}
.character img{height:48px;margin-left:4px;border:1px solid #ccc;vertical-align:middle}"""


def build_report(lock: Mapping[str, Any], frames: Mapping[str, np.ndarray], curves: Mapping[str, Mapping[str, Any]],
                 seconds: Mapping[str, float], layout: OutputLayout) -> str:
    """The report's HTML. frames: shot -> its kept take's frames; curves: shot -> QC curves;
    seconds: shot -> stage seconds from the ledger."""
    sections = []
    for i, shot in enumerate(lock["shots"]):
        sid = shot["id"]
        key_path = layout.keyframe(sid)
        keyframe = None
        if key_path.exists():
            with PIL.Image.open(key_path) as png:
                keyframe = _png_uri(_thumb(np.asarray(png.convert("RGB"))))
        shot_frames = frames.get(sid)
        frames_uri = _png_uri(strip(shot_frames)) if shot_frames is not None and len(shot_frames) else None
        sections.append(_shot_section(shot, lock["manifest"]["shots"][i]["prompt"], keyframe, frames_uri,
                                      curves.get(sid, {}), float(lock["generation_fps"]), seconds.get(sid, 0.0)))
    failed = [s["id"] for s in lock["shots"] if (s.get("qc") or {}).get("passed") is False]
    retaken = sum(max(0, len((s.get("qc") or {}).get("takes", [])) - 1) for s in lock["shots"])
    summary = (f"{len(lock['shots'])} shots, {retaken} retakes; "
               + (f"kept after failing QC: {', '.join(failed)}" if failed else "every kept take passed QC"))
    models = ", ".join(f"{role}: {html.escape(m['source'])}" for role, m in lock["models"].items())
    note = f"<p><b>{html.escape(lock['note'])}</b></p>" if lock.get("note") else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{html.escape(lock['title'])}: render report</title><style>{CSS}</style></head><body>
<h1>{html.escape(lock['title'])}</h1>{note}
<p>Job {html.escape(lock['job'])} · {models} · {lock['fps']} fps · AI-generated.</p>
<p class="summary">{html.escape(summary)}</p>
<p><a href="final.mp4">final.mp4</a> · <a href="timeline.otio">timeline.otio</a> ·
<a href="manifest.lock.json">manifest.lock.json</a> · <a href="ledger.parquet">ledger.parquet</a></p>
{''.join(sections)}</body></html>"""


def contact_sheet(lock: Mapping[str, Any], frames: Mapping[str, np.ndarray], layout: OutputLayout) -> PIL.Image.Image:
    """One row per shot: its id and QC result, the keyframe, then a strip of its frames."""
    rows = []
    for shot in lock["shots"]:
        sid, qc = shot["id"], shot.get("qc") or {}
        parts = []
        if layout.keyframe(sid).exists():
            with PIL.Image.open(layout.keyframe(sid)) as png:
                parts.append(_thumb(np.asarray(png.convert("RGB")), 160))
        if sid in frames and len(frames[sid]):
            parts.append(strip(frames[sid], width=160))
        height = max((p.height for p in parts), default=90)
        row = PIL.Image.new("RGB", (170 + sum(p.width + 8 for p in parts), height + 8), "white")
        draw = PIL.ImageDraw.Draw(row)
        verdict = "QC pass" if qc.get("passed") else ("QC FAIL" if qc.get("passed") is False else "no QC")
        draw.text((6, 6), sid, fill="black")
        draw.text((6, 24), f"{verdict}, take {qc.get('take', 1)}", fill="#27ae60" if qc.get("passed") else "#c0392b")
        x = 170
        for part in parts:
            row.paste(part, (x, 4))
            x += part.width + 8
        rows.append(row)
    sheet = PIL.Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    return sheet


def write_report(layout: OutputLayout, lock: Mapping[str, Any], frames: Mapping[str, np.ndarray],
                 curves: Mapping[str, Mapping[str, Any]], seconds: Mapping[str, float]) -> tuple[Path, Path]:
    atomic_write_text(layout.report, build_report(lock, frames, curves, seconds, layout))
    with atomic_path(layout.contact_sheet) as tmp:
        contact_sheet(lock, frames, layout).save(tmp, format="PNG")
    return layout.report, layout.contact_sheet
