"""One job's plan and progress, and every rule about what happens next: a pure state machine.

The director (and the simulator, and `bench/gpu.py`) ask the book which stages are ready, what to
send a worker for a stage, and what a result means; the book answers with typed requests and
decisions, and writes what it did into an outbox of effects (store rows, ledger rows, events) for the
caller to carry out. No Ray, no torch, no I/O, no clock: time comes in as `now`, so every rule is a
unit test away (tests/test_jobbook.py) and the simulator runs the very same rules.

The shape follows vLLM's scheduler (`schedule()` then `update_from_output()`) and Ray autoscaler
v2 (decide, then a reconciler acts): decide here, act in `actors/director.py`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from farm import cache as keys
from farm.contract import (
    EncodeRequest,
    EncodeResult,
    FailureKind,
    JobState,
    Outcome,
    StageKind,
    StageRequest,
    StageResult,
)
from farm.effective import keyframe_params, video_params
from farm.families import Draft
from farm.hashing import derive_seed
from farm.jobsetup import JobSetup, hashed_identity_key, identity_adapter
from farm.paths import OutputLayout
from farm.plan import ShotPlan, Stage, character_of, decode_id, identity_id, take_id
from farm.presets import TIERS, Preset, Scene, as_tier
from farm.qc import Verdict, best_take, failed_gates, judge
from farm.schedule import ReadyStage

# --- what the book tells its caller --------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3  # per stage, errors only (an OOM walks the ladder, a lost worker requeues)
    backoff_s: float = 1.0  # retry n waits backoff_s * 2**(n-1) ...
    backoff_cap_s: float = 60.0  # ... but never longer than this
    max_worker_losses: int = 5  # per stage: a stage that kills every worker it touches fails the job


@dataclass(frozen=True)
class Retry:
    """Run the stage again, not before `after`, on a worker it has not failed on where one exists."""

    after: float


@dataclass(frozen=True)
class Descend:
    """Out of memory: run it again one rung lower on the preset ladder."""

    preset: Preset


@dataclass(frozen=True)
class Requeue:
    """Run it again at once; no attempt was spent (its worker died, or the job was requeued under it)."""

    reason: str


@dataclass(frozen=True)
class FailJob:
    reason: str


@dataclass(frozen=True)
class Ignore:
    """The job has ended (cancelled, failed): nothing more to do for this stage."""

    reason: str


Decision = Retry | Descend | Requeue | FailJob | Ignore


@dataclass(frozen=True)
class Emit:
    """An event for the job's stream (SSE, progress bars, webhooks)."""

    event: dict[str, Any]


@dataclass(frozen=True)
class LedgerRow:
    row: dict[str, Any]


@dataclass(frozen=True)
class SaveStage:
    stage: str
    state: str
    worker: str | None
    tier: str | None
    key: str
    record: dict[str, Any]


@dataclass(frozen=True)
class SetJobState:
    state: JobState
    error: str | None = None


@dataclass(frozen=True)
class CancelStage:
    stage: str
    worker: str


@dataclass(frozen=True)
class WriteKeyframe:
    shot: str
    key: str
    params: dict[str, Any]


@dataclass(frozen=True)
class CacheRecord:
    """Store a GPU stage's record beside its output, so a later cache hit can show what made it."""

    key: str
    record: dict[str, Any]


@dataclass(frozen=True)
class PromoteTake:
    """A later QC take won: its clip becomes the shot's (`shots/<id>.mp4`), take 1's moves to `takes/`."""

    shot: str
    take: int


Effect = Emit | LedgerRow | SaveStage | SetJobState | CancelStage | WriteKeyframe | CacheRecord | PromoteTake

CPU_WORKER = "encoder"  # the name CPU stages run under in the ledger and events
CACHE_WORKER = "cache"


@dataclass(frozen=True)
class Running:
    worker: str
    tier: str
    preset: str
    started: float
    expected_end: float
    key: str
    attempt: int
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    key: str
    record: dict[str, Any]


@dataclass(frozen=True)
class Pending:
    """A stage not yet finished, as a planning policy sees it: what it waits for, and when it is
    expected to end if it runs now."""

    id: str
    kind: StageKind
    deps: tuple[str, ...]  # unfinished dependencies only
    worker: str | None = None
    expected_end: float | None = None


@dataclass(frozen=True)
class Take:
    """One render of a shot, as quality control judged it."""

    take: int
    qc_stage: str
    clip_key: str
    metrics: Mapping[str, Any]
    verdict: Verdict
    keyframe: str | None  # its own keyframe stage, where the retake drew a new one
    gated: tuple[str, ...] = ()  # the metrics its gates checked

    def summary(self) -> dict[str, Any]:
        return {"take": self.take, "passed": self.verdict.passed, "failed": list(self.verdict.failed),
                "gated": list(self.gated), "score": round(self.verdict.score, 4), "metrics": numbers(self.metrics),
                "qc_stage": self.qc_stage}


def numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics without their per-frame curves (events, ledger rows and the lockfile's summary)."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if k != "curves"}


def take_of(stage_id: str) -> int:
    """Which take a stage belongs to (`clip:a~take2` -> 2; plan stages are take 1)."""
    return int(stage_id.rsplit("~take", 1)[1]) if "~take" in stage_id else 1


# --- the book ------------------------------------------------------------------------------------


class JobBook:
    def __init__(self, job_id: str, setup: JobSetup, out_dir: str, *, priority: int = 0, created: float = 0.0,
                 use_cache: bool = True, policy: RetryPolicy | None = None,
                 image_keys: Mapping[str, str] | None = None) -> None:
        self.id = job_id
        self.setup = setup
        self.layout = OutputLayout(out_dir)
        self.priority = priority
        self.created = created
        self.use_cache = use_cache  # `--no-cache` renders every stage again (outputs are still stored)
        self.policy = policy or RetryPolicy()
        self.image_keys = dict(image_keys or {})  # shot -> cache key of the user's own first frame
        self.plan = setup.plan.copy()  # the book's own: stages may be added while the job runs
        self.shots: dict[str, ShotPlan] = {sp.shot.id: sp for sp in self.plan.shots}
        self.seq = {sid: i for i, sid in enumerate(self.plan.stages)}
        self.ranks: dict[str, float] = {}
        self.costs: dict[str, dict[str, float]] = {}
        self.state = JobState.QUEUED
        self.error: str | None = None
        self.outbox: list[Effect] = []
        self._reset()

    def _reset(self) -> None:
        self._backlog: dict[str, float] | None = None  # backlog(), until a stage finishes or is added
        self.done: dict[str, Done] = {}
        self.running: dict[str, Running] = {}
        self.tries: dict[str, int] = {}  # dispatches, for the ledger's attempt numbers
        self.errors: dict[str, int] = {}  # failed attempts, against max_attempts
        self.losses: dict[str, int] = {}
        self.avoid: dict[str, set[str]] = {}  # workers a stage failed on
        self.not_before: dict[str, float] = {}
        self.ladder: dict[str, Preset] = {}
        self.probed: set[str] = set()
        self.takes: dict[str, list[Take]] = {}  # shot -> its QC'd takes so far, in order

    # --- questions ---------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.plan.stages)

    @property
    def progress(self) -> float:
        if self.state == JobState.SUCCEEDED:
            return 1.0
        return len(self.done) / max(len(self.plan.stages), 1)

    def stage(self, stage_id: str) -> Stage:
        return self.plan.stages[stage_id]

    def ready(self, now: float) -> list[Stage]:
        """Stages that may start now: the job is active, their dependencies are done, they are not
        running, and any back-off has elapsed. In plan order."""
        if not self.active:
            return []
        return [s for s in self.plan.stages.values()
                if s.id not in self.done and s.id not in self.running and all(d in self.done for d in s.deps)
                and self.not_before.get(s.id, 0.0) <= now]

    def waiting_gpu(self) -> int:
        """GPU stages not finished and not running: the demand the autoscaler hears about."""
        if not self.active:
            return 0
        return sum(1 for s in self.plan.stages.values()
                   if s.gpu and s.id not in self.done and s.id not in self.running)

    def model_key(self, stage: Stage) -> str:
        """What a worker must hold to run the stage without loading: the model, and beside it the
        identity adapters a character's stage needs (the worker keeps that pipeline apart)."""
        key = self.setup.specs[StageKind(stage.kind).role].key
        if stage.kind == StageKind.IDENTITY:
            return f"{key}+{self.setup.characters[character_of(stage.id)].method}:1"
        names = self._cast_names(stage)
        return f"{key}+{self.cast_method(stage)}:{len(names)}" if names else key

    def ready_stage(self, stage: Stage) -> ReadyStage:
        """The stage as the dispatch policy sees it (`farm.schedule.assign`): its cost per tier (a
        retake costs what its first take did) and the worker that rendered what it continues."""
        base = take_id(stage.id.split("~take")[0], 1)
        costs = tuple((tier, table.get(stage.id, table.get(base, 0.0))) for tier, table in self.costs.items())
        prefer = next((self.done[d].record.get("worker") for d in stage.deps
                       if d in self.done and self.plan.stages[d].gpu), None)
        return ReadyStage(f"{self.id}/{stage.id}", self.model_key(stage), self.priority, self.ranks.get(stage.id, 0.0),
                          self.seq[stage.id], frozenset(self.avoid.get(stage.id, ())), costs,
                          prefer if isinstance(prefer, str) else None, str(stage.kind))

    def set_ranks(self, costs: Mapping[str, float]) -> None:
        """Rank stages by the work on the longest chain from each (costs: stage -> seconds)."""
        self.ranks = self.plan.tail_lengths(dict(costs))

    def backlog(self) -> dict[str, float]:
        """model key -> seconds of GPU work not finished (ready or not), at each stage's best tier.
        Kept until a stage finishes, stages are added or repriced (the director asks at every dispatch)."""
        if not self.active:
            return {}
        if self._backlog is not None:
            return self._backlog
        out: dict[str, float] = {}
        for stage in self.plan.stages.values():
            if stage.gpu and stage.id not in self.done:
                seconds = min((t.get(stage.id, 0.0) for t in self.costs.values()), default=0.0)
                key = self.model_key(stage)
                out[key] = out.get(key, 0.0) + seconds
        self._backlog = out
        return out

    def set_costs(self, table: Mapping[str, Mapping[str, float]]) -> None:
        """tier -> stage -> seconds on one worker of that tier (model load excluded): what the
        planning policy weighs workers by."""
        self.costs = {tier: dict(stages) for tier, stages in table.items()}
        self._backlog = None

    def remaining(self) -> list[Pending]:
        """The job's unfinished DAG, running stages with their expected end: what a planning policy
        reserves workers against."""
        out = []
        for s in self.plan.stages.values():
            if s.id in self.done:
                continue
            run = self.running.get(s.id)
            out.append(Pending(s.id, StageKind(s.kind), tuple(d for d in s.deps if d not in self.done),
                               run.worker if run else None, run.expected_end if run else None))
        return out

    def shot_states(self) -> list[dict[str, Any]]:
        """Per shot: state, the stage it runs now, on which worker and tier."""
        out = []
        for sp in self.plan.shots:
            ids = [s.id for s in self.plan.stages.values() if s.shot == sp.shot.id]
            active = [sid for sid in ids if sid in self.running]
            current = active[0] if active else None
            run = self.running.get(current) if current else None
            state = "succeeded" if all(sid in self.done for sid in ids) else ("running" if active else "queued")
            out.append({"id": sp.shot.id, "state": state, "stage": current,
                        "worker": run.worker if run else None, "tier": run.tier if run else None,
                        "qc": self._qc_state(sp.shot.id)})
        return out

    def _qc_state(self, shot: str) -> dict[str, Any] | None:
        takes = self.takes.get(shot)
        if not takes:
            return None
        last = takes[-1]
        failed = failed_gates(last.metrics, last.verdict, self.setup.gates(shot))
        return {"take": last.take, "passed": last.verdict.passed, "failed": failed, "takes": len(takes)}

    def add_stages(self, stages: Iterable[Stage], rewire: Mapping[str, Iterable[str]] | None = None) -> None:
        """Stages added while the job runs: a QC retake, a job-level stage several shots wait for (a
        character's identity). `rewire` gives unfinished stages new dependencies (the merge waits for
        the retake's clip instead of the first take's)."""
        self._backlog = None
        for stage in stages:
            self.plan.add(stage)
            self.seq[stage.id] = len(self.seq)
        for sid, deps in (rewire or {}).items():
            if sid in self.done or sid in self.running:
                raise ValueError(f"cannot rewire {sid}: it has already started")
            self.plan.stages[sid] = replace(self.plan.stages[sid], deps=tuple(deps))
        self.plan.topological()  # refuses a cycle

    # --- requests ----------------------------------------------------------------------------

    def preset(self, stage: Stage, tier: str) -> Preset:
        """The preset a stage runs with on a worker of `tier`: its ladder rung after an OOM, else the
        tier's own."""
        held = self.ladder.get(stage.id)
        if held is not None:
            return held
        spec = self.setup.specs[StageKind(stage.kind).role]
        preset = spec.rules.preset(as_tier(tier), self.setup.manifest.quality, self._scene(stage), spec.variant)
        # The decode chunk is the decode's: the denoising has none (its OOM ladder starts at the knobs).
        return replace(preset, decode_chunk_size=None) if stage.kind == StageKind.VIDEO else preset

    def params(self, stage_id: str, tier: str) -> dict[str, Any]:
        """A GPU stage's effective parameters on a worker of `tier` (what the pipeline is called with)."""
        setup, stage = self.setup, self.plan.stages[stage_id]
        if stage.kind == StageKind.IDENTITY:
            character = setup.characters[character_of(stage.id)]
            return {"character": character.name, "method": character.method, "images": list(character.sha256)} | (
                {"faces": setup.faces} if character.method == "instantid" else {})
        sp = self.shots[stage.shot or ""]
        if stage.kind == StageKind.KEYFRAME:
            if stage.seed is not None and stage.seed != sp.seed:
                sp = replace(sp, seed=stage.seed)  # a QC retake's new keyframe
            return keyframe_params(setup.manifest, sp, setup.specs["keyframe"], as_tier(tier), self._draft("keyframe"))
        if stage.kind not in (StageKind.VIDEO, StageKind.DECODE) or stage.segment is None or stage.seed is None:
            raise ValueError(f"{stage_id} is not a GPU stage")
        spec = setup.specs["video"]
        call = video_params(setup.manifest, sp, stage.segment, stage.seed, spec, self.preset(stage, tier),
                            setup.plan.film_fps, self._draft("video"))
        denoise, decode = spec.rules.split_params(call)
        return denoise if stage.kind == StageKind.VIDEO else decode

    def tier_dependence(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per shot, the call parameters that would not be the same on every tier (tier -> value), for
        the lockfile: pinned steps make a shot alike on any tier except for what this names (each
        tier's decode chunk, its own steps where none are pinned, a smaller size on a low tier)."""
        setup, spec = self.setup, self.setup.specs["video"]
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for sp in self.plan.shots:
            stage = self.plan.stages[f"video:{sp.shot.id}:0"]
            assert stage.segment is not None and stage.seed is not None
            calls = {tier: video_params(setup.manifest, sp, stage.segment, stage.seed, spec,
                                        spec.rules.preset(tier, setup.manifest.quality, sp.shot.scene, spec.variant),
                                        setup.plan.film_fps, self._draft("video")) for tier in TIERS}
            names = sorted({name for call in calls.values() for name in call})
            differ = {name: {str(tier): call.get(name) for tier, call in calls.items()} for name in names
                      if len({repr(call.get(name)) for call in calls.values()}) > 1}
            if differ:
                out[sp.shot.id] = differ
        return out

    def _draft(self, role: str) -> Draft | None:
        """The family's distilled draft path where this job drafts with it."""
        choice = self.setup.drafts.get(role)
        return self.setup.specs[role].rules.draft if choice is not None and choice.distilled else None

    def request(self, stage_id: str, tier: str, cache_dir: str = "") -> StageRequest:
        """The worker request for a GPU stage on a worker of `tier`; its output_key is the cache key."""
        setup, stage = self.setup, self.plan.stages[stage_id]
        preset = self.preset(stage, tier)
        params = self.params(stage_id, tier)
        role = StageKind(stage.kind).role
        options, key_options = setup.pipeline_options(role), setup.key_options(role)
        common: dict[str, Any] = {"loras": setup.loras(role), "vae": options["vae"], "scheduler": options["scheduler"],
                                  "step_cache": options["step_cache"],
                                  "embeddings": setup.overrides.embeddings if role == "keyframe" else ()}
        if stage.kind == StageKind.IDENTITY:
            character = setup.characters[params["character"]]
            encoder = identity_adapter(setup.specs["keyframe"], character.method)
            key = character.key or hashed_identity_key(setup.specs["keyframe"], character.method, character.sha256)
            return StageRequest(self.id, stage.id, StageKind.IDENTITY, setup.specs["keyframe"], params, preset.knobs,
                                preset.label(), preset.tier, key, cache_dir, adapter=encoder,
                                references=character.images, **common)
        if stage.kind == StageKind.KEYFRAME:
            cast = self.cast(stage)
            method = self.cast_method(stage)
            adapter = identity_adapter(setup.specs["keyframe"], method, len(cast)) if method else None
            if cast:  # only then: the keys of shots without characters stay what they were
                key_options = {**key_options, "identity": [list(c) for c in cast]}
            key = keys.keyframe_key(setup.identity["keyframe"], params, key_options)
            return StageRequest(self.id, stage.id, StageKind.KEYFRAME, setup.specs["keyframe"], params, preset.knobs,
                                preset.label(), preset.tier, key, cache_dir,
                                frame_size=setup.manifest.output.keyframe_size, adapter=adapter, identity=cast,
                                **common)
        assert stage.segment is not None  # params() refused anything but keyframe, video and decode stages
        input_key = self.input_key(stage)
        if stage.kind == StageKind.VIDEO:
            key = keys.latents_key(setup.identity["video"], params, input_key, key_options)
            return StageRequest(self.id, stage.id, StageKind.VIDEO, setup.specs["video"], params, preset.knobs,
                                preset.label(), preset.tier, key, cache_dir, input_key=input_key, **common)
        drop, kept = stage.segment.drop, stage.segment.kept
        key = keys.decode_key(input_key, params, preset.knobs.vae_tiling, drop, kept)
        return StageRequest(self.id, stage.id, StageKind.DECODE, setup.specs["video"], params, preset.knobs,
                            preset.label(), preset.tier, key, cache_dir, input_key=input_key, drop=drop, kept=kept,
                            frame_size=setup.manifest.output.size, **common)

    def _cast_names(self, stage: Stage) -> list[str]:
        """A keyframe's characters, in the shot's order (its identity dependencies); none for other stages."""
        if stage.kind != StageKind.KEYFRAME:
            return []
        return [character_of(d) for d in stage.deps if self.plan.stages[d].kind == StageKind.IDENTITY]

    def cast(self, stage: Stage) -> tuple[tuple[str, float], ...]:
        """A keyframe's characters: each one's embeddings (the identity stage's output key) and strength."""
        return tuple((self.done[identity_id(n)].key, self.setup.characters[n].strength)
                     for n in self._cast_names(stage))

    def cast_method(self, stage: Stage) -> str | None:
        """How a keyframe's characters are drawn: one method per keyframe (validation refuses an
        InstantID character beside others)."""
        methods = {self.setup.characters[n].method for n in self._cast_names(stage)}
        return methods.pop() if methods else None

    def input_key(self, stage: Stage) -> str:
        """The cache key of what a stage starts from: a video stage's first frame (its dependency's
        output, or the user's own image), a decode's latents."""
        if stage.deps:
            return self.done[stage.deps[0]].key
        return self.image_keys[stage.shot or ""]

    def encode_request(self, stage_id: str) -> EncodeRequest:
        """The encoder's request for a clip, QC or merge; its output_key is the cache key."""
        setup, stage = self.setup, self.plan.stages[stage_id]
        encode = setup.encode_identity()
        shot = stage.shot or ""
        if stage.kind == StageKind.CLIP:
            segments = tuple(self.done[d].key for d in stage.deps)
            key = keys.clip_key(list(segments), setup.fps, encode)
            take = take_of(stage_id)
            dest = self.layout.shot_clip(shot) if take == 1 else self.layout.take_clip(shot, take)
            return EncodeRequest(self.id, stage.id, StageKind.CLIP, str(dest), segments, setup.fps, setup.encode, key)
        if stage.kind == StageKind.QC:
            clip = self.plan.stages[stage.deps[0]]
            segments = tuple(self.done[d].key for d in clip.deps)
            start = self.input_key(self._first_call(clip))
            kept = [self.plan.stages[d].segment.kept for d in clip.deps]  # type: ignore[union-attr]
            seams = [sum(kept[:i]) for i in range(1, len(kept))]
            options: dict[str, Any] = {"start_key": start, "seams": seams}
            cast = [setup.characters[n] for n in self.shots[shot].shot.characters if n in setup.characters]
            identity = None
            if cast and self.shots[shot].first_frame_from == "keyframe":
                options["identity"] = {"faces": setup.faces, "characters": {c.name: list(c.images) for c in cast}}
                identity = {"faces": setup.faces, "characters": {c.name: list(c.sha256) for c in cast}}
            key = keys.qc_key(list(segments), start, seams, identity)
            return EncodeRequest(self.id, stage.id, StageKind.QC, "", segments, setup.fps, setup.encode, key,
                                 options=options)
        if stage.kind != StageKind.MERGE:
            raise ValueError(f"{stage_id} is not a CPU stage")
        clip_keys = [self.done[d].record["clip_key"] for d in stage.deps]  # each shot's accepted take
        key = keys.merge_key(clip_keys, setup.merge_options, encode)
        clips = tuple(str(self.layout.shot_clip(self.stage(d).shot or "")) for d in stage.deps)
        return EncodeRequest(self.id, stage.id, StageKind.MERGE, str(self.layout.final), clips, setup.fps,
                             setup.encode, key, options=dict(setup.merge_options))

    def needs_probe(self, stage: Stage) -> bool:
        """Look in the cache once per stage (keys are hashes of its inputs, which do not change while
        it waits)."""
        return self.use_cache and stage.id not in self.probed

    def probe_keys(self, stage: Stage, tiers: Iterable[str]) -> list[str]:
        """Where a finished copy of the stage may be: its key on each tier the farm has (a tier's
        presets may change the parameters, so each tier has its own key)."""
        self.probed.add(stage.id)
        if not stage.gpu:
            return [self.encode_request(stage.id).output_key]
        return list(dict.fromkeys(self.request(stage.id, t).output_key for t in sorted(tiers) or ["cpu"]))

    # --- events in ---------------------------------------------------------------------------

    def dispatched(self, stage_id: str, worker: str, tier: str, preset: str, key: str, now: float,
                   expected_s: float = 0.0, params: Mapping[str, Any] | None = None) -> None:
        stage = self.plan.stages[stage_id]
        self.tries[stage_id] = self.tries.get(stage_id, 0) + 1
        self.running[stage_id] = Running(worker, tier, preset, now, now + expected_s, key, self.tries[stage_id],
                                         params or {})
        self._start()
        self._emit(now, "stage_started", stage=stage_id, kind=stage.kind, shot=stage.shot, worker=worker, tier=tier,
                   preset=preset)

    def began(self, stage_id: str, when: float) -> None:
        """A stage sent to its worker ahead of time (prefetch) began there at `when`, not when it was
        sent: its ledger row counts from then, so one worker's rows never overlap."""
        run = self.running.get(stage_id)
        if run is not None and when > run.started:
            self.running[stage_id] = replace(run, started=when)

    def on_success(self, stage_id: str, result: StageResult | EncodeResult, now: float) -> None:
        """A dispatched stage finished: GPU stages report a StageResult, CPU stages an EncodeResult. A
        result for a stage the book does not see running (it was requeued meanwhile) is dropped."""
        run = self.running.pop(stage_id, None)
        if run is None:
            return
        stage = self.plan.stages[stage_id]
        note = None
        if isinstance(result, EncodeResult) and stage.kind == StageKind.QC:
            if self.active:
                self._judge_take(stage, run.key, dict(result.metrics), started=run.started, now=now,
                                 attempt=run.attempt, cache_hit=False)
            return
        if isinstance(result, EncodeResult):
            record: dict[str, Any] = {"frames": result.frames} if stage.kind == StageKind.CLIP else {}
            if result.note:
                record["note"] = note = result.note
            tier, preset, peak = "cpu", "encode", None
        else:
            record = {"tier": result.tier, "worker": result.worker, "preset": result.preset,
                      "params": dict(run.params), "observed": dict(result.observed), "knobs": dict(result.knobs),
                      "device": result.device, "input_sha": result.input_sha, "output_sha": result.output_sha,
                      "cache_key": run.key}
            tier, preset, peak = result.tier, result.preset, result.peak_vram_bytes
        if not self.active:
            return  # a cancelled job's stage that finished anyway: its output is cached all the same
        if isinstance(result, StageResult):
            self.outbox.append(CacheRecord(run.key, record))
        kept = stage.segment.kept if stage.segment and stage.kind == StageKind.DECODE else 0
        worker = result.worker if isinstance(result, StageResult) else run.worker
        self._finish(stage, run.key, record, worker=worker, tier=tier, preset=preset, started=run.started, now=now,
                     attempt=run.attempt, cache_hit=False, peak=peak, frames=kept, note=note)

    def on_cache_hit(self, stage_id: str, key: str, record: Mapping[str, Any], now: float) -> None:
        """A finished copy of the stage is in the cache (a QC stage's record is its measurements)."""
        stage = self.plan.stages[stage_id]
        if stage.kind == StageKind.QC:
            self._start()
            self._judge_take(stage, key, dict(record), started=now, now=now,
                             attempt=self.tries.get(stage_id, 0) + 1, cache_hit=True)
            return
        rec = dict(record) | {"cache_hit": True}
        tier = rec.get("tier", "cpu") if stage.gpu else "cpu"
        preset = rec.get("preset") if stage.gpu else "encode"
        self._start()  # started (and perhaps finished) even when nothing had to be dispatched
        self._finish(stage, key, rec, worker=CACHE_WORKER, tier=tier, preset=preset, started=now, now=now,
                     attempt=self.tries.get(stage_id, 0) + 1, cache_hit=True, peak=None, frames=0)

    def on_failure(self, stage_id: str, kind: FailureKind, error: str, now: float, *,
                   workers: Iterable[str] = ()) -> Decision:
        """A dispatched stage failed. `workers`: the pool's workers now able to take work (for "has it
        failed everywhere?"). Returns what happens next; the effects are in the outbox."""
        run = self.running.pop(stage_id, None)
        if run is None:
            return Ignore(f"{stage_id} is not running")
        stage = self.plan.stages[stage_id]
        self._ledger(stage, run, kind.outcome, now, error=error)
        if not self.active:
            return Ignore(f"job {self.state}")
        if kind == FailureKind.CANCELLED:
            return Requeue("the job was requeued while this stage ran")  # else it would not be active
        if kind == FailureKind.LOST:
            self.losses[stage_id] = self.losses.get(stage_id, 0) + 1
            if self.losses[stage_id] >= self.policy.max_worker_losses:
                return self._fail(f"stage {stage_id} lost {self.losses[stage_id]} workers", now)
            return Requeue(f"worker {run.worker} was lost")
        if kind == FailureKind.DISK:
            self._emit(now, "stage_failed", stage=stage_id, shot=stage.shot, error=error)
            return self._fail(f"stage {stage_id}: {error}", now)
        if kind == FailureKind.OOM:
            self._emit(now, "stage_oom", stage=stage_id, shot=stage.shot, preset=run.preset)
            spec = self.setup.specs[StageKind(stage.kind).role]
            lower = spec.rules.next_preset(self.preset(stage, run.tier), self.setup.manifest.quality,
                                           self._scene(stage), spec.variant)
            if lower is not None and stage.kind == StageKind.VIDEO:
                lower = replace(lower, decode_chunk_size=None)  # the decode's, not the denoising's
            if lower is None:
                return self._fail(f"stage {stage_id} ran out of GPU memory on the lowest preset ({run.preset})", now)
            self.ladder[stage_id] = lower
            return Descend(lower)
        errors = self.errors[stage_id] = self.errors.get(stage_id, 0) + 1
        self.avoid.setdefault(stage_id, set()).add(run.worker)
        self._emit(now, "stage_failed", stage=stage_id, shot=stage.shot, error=error)
        if errors >= self.policy.max_attempts:
            return self._fail(f"stage {stage_id} failed {errors} times: {error}", now)
        pool = set(workers)
        if stage.gpu and not pool:
            return self._fail(f"stage {stage_id} failed ({error}) and no worker is left to retry it", now)
        delay = min(self.policy.backoff_s * 2 ** (errors - 1), self.policy.backoff_cap_s)
        self.not_before[stage_id] = now + delay
        return Retry(now + delay)

    # --- the job as a whole ------------------------------------------------------------------

    def announce(self, now: float) -> None:
        """The job's first event: how many stages and frames to expect (progress bars size on it)."""
        self._emit(now, "job_started", stages=len(self.plan.stages), frames=sum(sp.frames for sp in self.plan.shots))

    def cancel(self, now: float) -> None:
        """Nothing more is dispatched; running stages are told to stop at their next step."""
        if not self.active:
            return
        self.state, self.error = JobState.CANCELLED, "cancelled by request"
        self._stop_running()
        self.outbox.append(SetJobState(JobState.CANCELLED, self.error))
        self._emit(now, "job_finished", state=JobState.CANCELLED.value)

    def fail(self, reason: str, now: float) -> FailJob:
        return self._fail(reason, now)

    def succeed(self, now: float) -> None:
        """Every stage is done and the caller has written the outputs."""
        self.state, self.error = JobState.SUCCEEDED, None
        self.outbox.append(SetJobState(JobState.SUCCEEDED))
        self._emit(now, "job_finished", state=JobState.SUCCEEDED.value)

    def requeue(self) -> None:
        """Queue the job again from scratch: finished stages come back from the cache (and are
        written to the outputs again); a stage still running from before is kept, and is run again if
        it ends cancelled."""
        running = self.running
        self._reset()
        self.running = running
        self.state, self.error = JobState.QUEUED, None
        self.outbox.append(SetJobState(JobState.QUEUED))

    def drain(self) -> list[Effect]:
        out, self.outbox = self.outbox, []
        return out

    def records(self) -> dict[str, dict[str, Any]]:
        return {sid: done.record for sid, done in self.done.items()}

    def rest(self) -> JobBook:
        """A copy holding what is left of the job, to simulate the rest of it (deadline sizing):
        finished stages stay finished; running ones count as not started (their elapsed part is paid
        again: a sizing errs towards more GPUs); the live clock's retry times, the workers stages
        failed on and unsent effects are dropped, as a simulation has its own clock and workers."""
        rest: JobBook = copy.deepcopy(self, {id(self.setup): self.setup})  # the setup is never changed
        rest.running, rest.not_before, rest.avoid, rest.outbox = {}, {}, {}, []
        rest._backlog = None
        return rest

    # --- internals ---------------------------------------------------------------------------

    def _scene(self, stage: Stage) -> Scene | None:
        sp = self.shots.get(stage.shot or "")
        return sp.shot.scene if sp is not None else None

    def _start(self) -> None:
        if self.state == JobState.QUEUED:
            self.state = JobState.RUNNING
            self.outbox.append(SetJobState(JobState.RUNNING))

    def _fail(self, reason: str, now: float) -> FailJob:
        self.state, self.error = JobState.FAILED, reason
        self._stop_running()
        self.outbox.append(SetJobState(JobState.FAILED, reason))
        self._emit(now, "job_finished", state=JobState.FAILED.value, error=reason)
        return FailJob(reason)

    def _stop_running(self) -> None:
        for stage_id, run in self.running.items():
            self.outbox.append(CancelStage(stage_id, run.worker))

    def _finish(self, stage: Stage, key: str, record: dict[str, Any], *, worker: str, tier: str | None,
                preset: str | None, started: float, now: float, attempt: int, cache_hit: bool, peak: int | None,
                frames: int, note: str | None = None, qc: str | None = None) -> None:
        self.done[stage.id] = Done(key, record)
        self._backlog = None
        self.not_before.pop(stage.id, None)
        self.outbox.append(SaveStage(stage.id, "succeeded", worker, tier, key, record))
        self.outbox.append(LedgerRow(self._row(stage, attempt, worker, tier, preset, started, now, Outcome.SUCCEEDED,
                                               cache_hit=cache_hit, peak=peak, frames=frames, note=note, qc=qc)))
        if stage.kind == StageKind.KEYFRAME and stage.shot is not None and take_of(stage.id) == 1:
            self._write_keyframe(stage.shot, key, record)  # a retake's keyframe is written only if it wins
        shown = stage.segment.kept if stage.segment and stage.kind == StageKind.DECODE else 0
        self._emit(now, "stage_finished", stage=stage.id, kind=stage.kind, shot=stage.shot, worker=worker, tier=tier,
                   preset=preset, seconds=now - started, cache_hit=cache_hit, frames=shown)

    def _first_call(self, clip: Stage) -> Stage:
        """A take's first video call: its clip's first decode's dependency."""
        return self.plan.stages[self.plan.stages[clip.deps[0]].deps[0]]

    def _write_keyframe(self, shot: str, key: str, record: Mapping[str, Any]) -> None:
        params = {**record.get("params", {}), "model": self.setup.specs["keyframe"].source}
        self.outbox.append(WriteKeyframe(shot, key, params))

    def _judge_take(self, stage: Stage, key: str, metrics: dict[str, Any], *, started: float, now: float,
                    attempt: int, cache_hit: bool) -> None:
        """A take's measurements are in: judge them by the shot's gates, then accept it, keep the best
        of the takes, fail the job, or add the next take's stages (docs/qc.md)."""
        shot, take = stage.shot or "", take_of(stage.id)
        gates = self.setup.gates(shot)
        verdict = judge(metrics, gates) if gates.enabled else Verdict(True, (), 0.0)
        clip = self.plan.stages[stage.deps[0]]
        first_video = self._first_call(clip)
        own_keyframe = next((d for d in first_video.deps if self.plan.stages[d].kind == StageKind.KEYFRAME
                             and take_of(d) == take and take > 1), None)
        this = Take(take, stage.id, self.done[clip.id].key, metrics, verdict, own_keyframe,
                    tuple(gates.thresholds) if gates.enabled else ())
        takes = [t for t in self.takes.get(shot, []) if t.take != take]  # judged again after a requeue
        self.takes[shot] = sorted([*takes, this], key=lambda t: t.take)
        final = verdict.passed or take > gates.retakes
        record: dict[str, Any] = {"take": take, "metrics": metrics, "passed": verdict.passed,
                                  "failed": list(verdict.failed), "score": verdict.score,
                                  "clip_key": this.clip_key, "gates": gates.as_dict()}
        if final:
            winner = self.takes[shot][best_take([t.verdict for t in self.takes[shot]])]
            record |= {"accepted": winner.take, "accepted_passed": winner.verdict.passed, "clip_key": winner.clip_key,
                       "takes": [t.summary() for t in self.takes[shot]]}
        self._finish(stage, key, record, worker=CPU_WORKER, tier="cpu", preset="qc", started=started, now=now,
                     attempt=attempt, cache_hit=cache_hit, peak=None, frames=0, qc=json.dumps(this.summary()),
                     note=("passed" if verdict.passed else "failed " + ", ".join(verdict.failed)) + f" (take {take})")
        self._emit(now, "qc", shot=shot, take=take, passed=verdict.passed, failed=list(verdict.failed),
                   metrics=numbers(metrics), final=final)
        if not final:
            self._retake(stage, take + 1, verdict, now)
            return
        if not winner.verdict.passed and gates.on_fail == "fail":
            worst = ", ".join(failed_gates(winner.metrics, winner.verdict, gates))
            self._fail(f"shot {shot} failed quality control in all {len(self.takes[shot])} takes: {worst}", now)
            return
        if winner.take != take:
            self._continue_from(stage, winner)
        if winner.take > 1:  # its files become the shot's
            self.outbox.append(PromoteTake(shot, winner.take))
            if winner.keyframe is not None:
                self._write_keyframe(shot, self.done[winner.keyframe].key, self.done[winner.keyframe].record)

    def _continue_from(self, stage: Stage, winner: Take) -> None:
        """The last take was not the best: a chained shot waiting on this QC starts from the winner's
        last frame instead."""
        clip = self.plan.stages[self.plan.stages[winner.qc_stage].deps[0]]
        rewire = {}
        for sid in self.plan.dependents()[stage.id]:
            dependent = self.plan.stages[sid]
            if dependent.kind == StageKind.VIDEO:
                rewire[sid] = (clip.deps[-1], *dependent.deps[1:])
        self.add_stages((), rewire)

    def _retake(self, qc_stage: Stage, take: int, verdict: Verdict, now: float) -> None:
        """The next take of a shot: the same calls with seeds derived from the take number, from the
        same first frame, or from a new keyframe when the failure was the keyframe's; what waited for
        this take's QC waits for the new one's."""
        shot = qc_stage.shot or ""
        if take_id(f"qc:{shot}", take) in self.plan.stages:  # a requeued job judging its takes again
            return
        sp = self.shots[shot]
        clip = self.plan.stages[qc_stage.deps[0]]
        decodes = [self.plan.stages[d] for d in clip.deps]
        videos = [self.plan.stages[d.deps[0]] for d in decodes]
        start_deps = tuple(d for d in videos[0].deps if self.plan.stages[d].kind != StageKind.VIDEO
                           or self.plan.stages[d].shot != shot)  # the shot's first frame (and a QC it waits for)
        new: list[Stage] = []
        if verdict.keyframe_at_fault and sp.first_frame_from == "keyframe":
            cast = self.plan.stages[f"keyframe:{shot}"].deps  # the characters' identity stages
            keyframe = Stage(take_id(f"keyframe:{shot}", take), StageKind.KEYFRAME, shot, cast,
                             seed=derive_seed(sp.seed, "take", take))
            new.append(keyframe)
            start_deps = (keyframe.id,)
        dep: tuple[str, ...] = start_deps
        decoded = []
        for video in videos:
            assert video.segment is not None and video.seed is not None
            vid = take_id(f"video:{shot}:{video.segment.index}", take)
            seed = derive_seed(video.seed, "take", take)
            new.append(Stage(vid, StageKind.VIDEO, shot, dep, video.segment, seed=seed))
            new.append(Stage(decode_id(vid), StageKind.DECODE, shot, (vid,), video.segment, seed=seed))
            dep = (decode_id(vid),)
            decoded.append(decode_id(vid))
        new.append(Stage(take_id(f"clip:{shot}", take), StageKind.CLIP, shot, tuple(decoded)))
        check = Stage(take_id(f"qc:{shot}", take), StageKind.QC, shot, (new[-1].id,))
        new.append(check)
        swap = {qc_stage.id: check.id, clip.deps[-1]: decoded[-1]}  # a chained shot starts from the new take
        rewire = {sid: tuple(swap.get(d, d) for d in self.plan.stages[sid].deps)
                  for sid in self.plan.dependents()[qc_stage.id]}
        self.add_stages(new, rewire)
        for stage in new:
            self.ranks.setdefault(stage.id, self.ranks.get(take_id(stage.id.split("~take")[0], 1), 0.0))
        self._emit(now, "qc_retake", shot=shot, take=take, because=list(verdict.failed),
                   keyframe=any(s.kind == StageKind.KEYFRAME for s in new), stages=len(new),
                   frames=sum(v.segment.kept for v in videos if v.segment is not None))

    def _ledger(self, stage: Stage, run: Running, outcome: Outcome, now: float, error: str | None) -> None:
        self.outbox.append(LedgerRow(self._row(stage, run.attempt, run.worker, run.tier, run.preset, run.started,
                                               now, outcome, error=error)))

    def _row(self, stage: Stage, attempt: int, worker: str | None, tier: str | None, preset: str | None,
             started: float, now: float, outcome: Outcome, *, cache_hit: bool = False, peak: int | None = None,
             error: str | None = None, frames: int = 0, note: str | None = None,
             qc: str | None = None) -> dict[str, Any]:
        return {"job": self.id, "shot": stage.shot, "stage": stage.id, "attempt": attempt, "worker": worker,
                "tier": tier, "preset": preset, "start": started, "end": now, "seconds": now - started,
                "peak_vram_bytes": peak, "outcome": outcome.value, "cache_hit": int(cache_hit), "error": error,
                "frames": frames, "note": note, "qc": qc}

    def _emit(self, now: float, event_type: str, **fields: Any) -> None:
        self.outbox.append(Emit({"job": self.id, "time": now, "type": event_type, **fields}))
