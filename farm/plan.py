"""Storyboard -> DAG of stages: keyframe -> video segment(s) -> decode(s) -> clip -> QC per shot; all
QCs -> merge. A chained shot starts after the QC of the shot it continues (from its accepted take).

Plain data only, so the scheduler, the simulator and tests can all walk the same plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from farm.contract import GPU_KINDS, StageKind
from farm.families import family
from farm.hashing import derive_seed
from farm.manifest import Manifest, Shot
from farm.models import ModelSpec
from farm.presets import QUALITY_TEMPLATES


@dataclass(frozen=True)
class Segment:
    """One image-to-video model call: generate `frames` frames, keep `kept` of them after the first
    `drop`.

    A segment that starts from a frame we already show (the previous segment's or shot's last
    frame) drops its first output frame, which re-draws that conditioning frame. A model that makes
    only some frame counts (Wan: 4k+1, LTX: 8k+1) may make more than the shot needs: the extra
    frames at the end are not kept, and the next segment starts from the last kept one.
    """

    index: int
    frames: int
    drop: int
    kept: int


@dataclass(frozen=True)
class Stage:
    id: str
    kind: StageKind
    shot: str | None
    deps: tuple[str, ...]
    segment: Segment | None = None
    seed: int | None = None

    @property
    def gpu(self) -> bool:
        return self.kind in GPU_KINDS


@dataclass(frozen=True)
class ShotPlan:
    shot: Shot
    index: int
    seed: int
    frames: int
    segments: tuple[Segment, ...]
    first_frame_from: Literal["keyframe", "image", "previous"]


@dataclass
class Plan:
    stages: dict[str, Stage] = field(default_factory=dict)
    shots: list[ShotPlan] = field(default_factory=list)
    fps: int = 15  # the rate frames are generated and clips encoded at
    film_fps: int = 15  # the film's rate (the merge brings every clip to it)

    def call_lengths(self) -> set[int]:
        """The distinct frame counts of the job's video calls: each is one compiled shape per worker
        (with the size), so a job should have few (`Family.call_buckets`)."""
        return {s.segment.frames for s in self.stages.values() if s.segment is not None and s.kind == StageKind.VIDEO}

    def add(self, stage: Stage) -> Stage:
        assert stage.id not in self.stages, stage.id
        self.stages[stage.id] = stage
        return stage

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {sid: [] for sid in self.stages}
        for stage in self.stages.values():
            for dep in stage.deps:
                out[dep].append(stage.id)
        return out

    def topological(self) -> list[str]:
        """Stage ids, each after all its dependencies (plan order where it already is one; stages
        added while a job runs may depend on later ones, and be depended on by earlier ones)."""
        waiting = {sid: len(s.deps) for sid, s in self.stages.items()}
        after = self.dependents()
        out = [sid for sid, n in waiting.items() if n == 0]
        for sid in out:  # grows while it is walked
            for nxt in after[sid]:
                waiting[nxt] -= 1
                if waiting[nxt] == 0:
                    out.append(nxt)
        if len(out) != len(self.stages):
            raise ValueError("the plan has a dependency cycle")
        return out

    def ready(self, done: set[str], started: set[str]) -> list[Stage]:
        """Stages whose dependencies are all done and that have not started, in plan order."""
        return [s for s in self.stages.values()
                if s.id not in done and s.id not in started and all(d in done for d in s.deps)]

    def tail_lengths(self, cost: dict[str, float]) -> dict[str, float]:
        """For each stage, the cost of the longest chain from it to the end (itself included)."""
        after = self.dependents()
        tail: dict[str, float] = {}
        for sid in reversed(self.topological()):
            tail[sid] = cost.get(sid, 0.0) + max((tail[d] for d in after[sid]), default=0.0)
        return tail

    def critical_path(self, cost: dict[str, float]) -> float:
        """Longest chain of stage costs: no schedule can finish sooner (the simulator's bound)."""
        finish: dict[str, float] = {}
        for sid in self.topological():
            finish[sid] = cost.get(sid, 0.0) + max((finish[d] for d in self.stages[sid].deps), default=0.0)
        return max(finish.values(), default=0.0)

    def copy(self) -> Plan:
        """A plan of its own to grow (stages are immutable, so sharing them is safe)."""
        return Plan(dict(self.stages), list(self.shots), self.fps, self.film_fps)


def output_fps(manifest: Manifest, video: ModelSpec | None = None) -> int:
    """The film's rate: the manifest's, else the video model's own rate where it has one (Wan 16 or
    24, LTX 25), else the quality template's."""
    if manifest.output.fps:
        return manifest.output.fps
    own = family(video.family).variant(video.variant).fps if video is not None else None
    return own or QUALITY_TEMPLATES[manifest.quality].fps


def shot_seed(manifest: Manifest, shot: Shot) -> int:
    return shot.seed if shot.seed is not None else derive_seed(manifest.seed, shot.id)


def shot_frames(duration: float, fps: int) -> int:
    return max(1, round(duration * fps))


def segments_for(frames: int, frames_per_call: int, starts_from_shown_frame: bool,
                 call_frames: Callable[[int], int] | None = None) -> tuple[Segment, ...]:
    """Split a shot into model calls of at most `frames_per_call` frames, each continuing from the
    previous call's last kept frame. `call_frames(needed)` is the family's frame rule: the count a
    call makes to give at least `needed` (default: `needed`, but at least 2, since one-frame video
    calls are degenerate for the models)."""
    out: list[Segment] = []
    remaining = frames
    drop = 1 if starts_from_shown_frame else 0
    while remaining > 0:
        needed = min(frames_per_call, remaining + drop)
        generate = call_frames(needed) if call_frames else max(2, needed)
        kept = min(generate - drop, remaining)
        out.append(Segment(len(out), generate, drop, kept))
        remaining -= kept
        drop = 1
    return tuple(out)


def take_id(stage_id: str, take: int) -> str:
    """A stage's id in a QC retake: take 1 is the plan's own (`clip:a`), take 2 `clip:a~take2`."""
    return stage_id if take == 1 else f"{stage_id}~take{take}"


def decode_id(video_stage_id: str) -> str:
    """The decode stage of a video stage: `video:a:0` -> `decode:a:0`."""
    return "decode:" + video_stage_id.split(":", 1)[1]


def identity_id(character: str) -> str:
    """The stage that computes a character's identity embeddings: `identity:mira`."""
    return f"identity:{character}"


def character_of(identity_stage_id: str) -> str:
    """The character an identity stage is for: `identity:mira` -> `mira`."""
    return identity_stage_id.split(":", 1)[1]


def draws_keyframe(shot: Shot) -> bool:
    """A shot whose first frame the keyframe model draws (not the user's image, not the previous shot)."""
    return shot.keyframe is None and shot.continue_from is None


def drawn_characters(manifest: Manifest) -> list[str]:
    """The job's characters, in its order, that some shot draws a keyframe of: those that get an
    identity stage and whose adapter a render needs."""
    drawn = {name for shot in manifest.shots if draws_keyframe(shot) for name in shot.characters}
    return [name for name in manifest.characters if name in drawn]


def build_plan(manifest: Manifest, video: ModelSpec | int) -> Plan:
    """The job's DAG for its video model (`video`; a bare frames-per-call count stands for a model that
    makes any count of frames at the film's rate)."""
    if isinstance(video, int):
        frames_per_call, call_frames, fps = video, None, output_fps(manifest)
        film = fps
    else:
        fam = family(video.family)
        frames_per_call = video.frames_per_call

        def call_frames(needed: int) -> int:
            return fam.call_frames(needed, frames_per_call)

        film = output_fps(manifest, video)
        fps = fam.generation_fps(film, video.variant)
    plan = Plan(fps=fps, film_fps=film)
    # A character's identity is computed once, before the first keyframe that shows them.
    for name in drawn_characters(manifest):
        plan.add(Stage(identity_id(name), StageKind.IDENTITY, None, ()))
    checks: list[str] = []
    previous_last: str | None = None
    previous_qc: str | None = None
    for index, shot in enumerate(manifest.shots):
        seed = shot_seed(manifest, shot)
        frames = shot_frames(shot.duration, fps)
        keyframe_id, clip_id = f"keyframe:{shot.id}", f"clip:{shot.id}"
        first_from: Literal["keyframe", "image", "previous"]
        after: tuple[str, ...] = ()  # more for the first call to wait for: the take it continues passing QC
        if shot.continue_from == "previous":
            first_from, start_dep = "previous", previous_last
            after = (previous_qc,) if previous_qc else ()
        elif shot.keyframe is not None:
            first_from, start_dep = "image", None
        else:
            first_from = "keyframe"
            cast = tuple(identity_id(name) for name in shot.characters)
            start_dep = plan.add(Stage(keyframe_id, StageKind.KEYFRAME, shot.id, cast, seed=seed)).id
        segments = segments_for(frames, frames_per_call, first_from == "previous", call_frames)
        dep = start_dep
        decoded = []
        for segment in segments:
            # Denoise to latents, then decode them as a stage of its own: the latents are cached, so a
            # decode that runs out of memory is retried alone (smaller chunk, tiling), not the denoising.
            segment_seed = derive_seed(seed, "video", segment.index)
            video_id = f"video:{shot.id}:{segment.index}"
            deps = ((dep,) if dep else ()) + (after if segment.index == 0 else ())
            plan.add(Stage(video_id, StageKind.VIDEO, shot.id, deps, segment, seed=segment_seed))
            dep = plan.add(Stage(decode_id(video_id), StageKind.DECODE, shot.id, (video_id,), segment,
                                 seed=segment_seed)).id
            decoded.append(dep)
        previous_last = decoded[-1]
        plan.add(Stage(clip_id, StageKind.CLIP, shot.id, tuple(decoded)))
        previous_qc = plan.add(Stage(f"qc:{shot.id}", StageKind.QC, shot.id, (clip_id,))).id
        checks.append(previous_qc)
        plan.shots.append(ShotPlan(shot, index, seed, frames, segments, first_from))
    plan.add(Stage("merge", StageKind.MERGE, None, tuple(checks)))
    return plan
