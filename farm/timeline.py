"""OUT/timeline.otio: the film as an editor's timeline (OpenTimelineIO), beside the flattened final.mp4.

One video track holds a clip per shot, in order, each referring to its shot clip by a path relative to
the output folder; a dissolve sits exactly where the merge applied a crossfade. OpenTimelineIO draws a
dissolve over handles: each side gives half the crossfade, so the clips' visible ranges are trimmed by
that half and the timeline's length is the film's (every shot, less each crossfade). Rejected QC
takes lie on a second, disabled track under the shot they were made for, with their scores; shot and
job facts are under each item's `farm` metadata key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import opentimelineio as otio

from farm.paths import OutputLayout, atomic_path


def _rt(frames: float, rate: float) -> otio.opentime.RationalTime:
    return otio.opentime.RationalTime(frames, rate)


def build_timeline(lock: Mapping[str, Any], transitions: Sequence[str], crossfade_seconds: float,
                   layout: OutputLayout) -> otio.schema.Timeline:
    """From the lockfile (shots in order, their frames, QC takes) and the merge's transitions."""
    fps = float(lock["fps"])
    rate_in = float(lock["generation_fps"])
    shots = lock["shots"]
    half = crossfade_seconds * fps / 2
    timeline = otio.schema.Timeline(name=lock["title"], metadata={"farm": {
        "job": lock["job"], "seed": lock["seed"], "quality": lock["quality"], "fps": fps,
        "models": {role: m["source"] for role, m in lock["models"].items()}, "licence_note": lock["licence_note"]}})
    video = otio.schema.Track(name="shots", kind=otio.schema.TrackKind.Video)
    rejected = otio.schema.Track(name="rejected takes", kind=otio.schema.TrackKind.Video)
    rejected.enabled = False
    at, placed = 0.0, 0.0  # where the shot starts on the timeline; how far the rejected track is filled
    for i, shot in enumerate(shots):
        frames = round(shot["frames"] / rate_in * fps)  # the merge brings every clip to the film's rate
        head = half if i > 0 and transitions[i - 1] == "crossfade" else 0.0
        tail = half if i + 1 < len(shots) and transitions[i] == "crossfade" else 0.0
        if head:
            video.append(otio.schema.Transition(name=f"{shots[i - 1]['id']} > {shot['id']}",
                                                transition_type=otio.schema.TransitionTypes.SMPTE_Dissolve,
                                                in_offset=_rt(half, fps), out_offset=_rt(half, fps)))
        whole = otio.opentime.TimeRange(_rt(0, fps), _rt(frames, fps))
        qc = shot.get("qc") or {}
        meta = {"farm": {"shot": shot["id"], "prompt": lock["manifest"]["shots"][i]["prompt"], "seed": shot["seed"],
                         "tier": shot["tier"], "first_frame_from": shot["first_frame_from"],
                         "families": {role: m["family"] for role, m in lock["models"].items()},
                         "qc": {"take": qc.get("take"), "passed": qc.get("passed")}}}
        video.append(otio.schema.Clip(
            name=shot["id"], metadata=meta,
            media_reference=otio.schema.ExternalReference(
                target_url=layout.shot_clip(shot["id"]).relative_to(layout.root).as_posix(), available_range=whole),
            source_range=otio.opentime.TimeRange(_rt(head, fps), _rt(frames - head - tail, fps))))
        start = at - head  # the shot's first frame, under the dissolve
        for take in qc.get("takes", []):
            if take["take"] == qc.get("take"):
                continue
            if start > placed:
                rejected.append(otio.schema.Gap(source_range=otio.opentime.TimeRange(
                    _rt(0, fps), _rt(start - placed, fps))))
                placed = start
            path = layout.take_clip(shot["id"], take["take"]).relative_to(layout.root).as_posix()
            rejected.append(otio.schema.Clip(
                name=f"{shot['id']} take {take['take']}", source_range=whole,
                metadata={"farm": {"shot": shot["id"], "take": take["take"], "failed": take["failed"],
                                   "score": take["score"], "metrics": take["metrics"]}},
                media_reference=otio.schema.ExternalReference(target_url=path, available_range=whole)))
            placed += frames
        at += frames - head - tail  # the clip's visible range (a dissolve adds no time of its own)
    timeline.tracks.append(video)
    if len(rejected):
        timeline.tracks.append(rejected)
    return timeline


def write_timeline(path: Path, timeline: otio.schema.Timeline) -> Path:
    with atomic_path(path) as tmp:
        otio.adapters.write_to_file(timeline, str(tmp), adapter_name="otio_json")
    return path
