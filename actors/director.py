"""The director: walks a job's plan, hands ready stages to workers, and records what happened.

Decisions come from plain functions (`farm.schedule.assign`, `farm.effective`, `farm.presets`);
this module only moves object refs between actors and keeps the books.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from farm.artifacts import load_image
from farm.effective import keyframe_params, video_params
from farm.encode import EncodeSettings
from farm.manifest import Manifest, inside_root
from farm.models import ModelSpec
from farm.paths import OutputLayout
from farm.plan import Plan, ShotPlan, Stage
from farm.presets import base_preset, memory_knobs
from farm.schedule import ReadyStage, WorkerView, assign

MAX_ATTEMPTS = 3
Event = dict[str, Any]


class RenderError(RuntimeError):
    pass


@dataclass
class Job:
    id: str
    manifest: Manifest
    root: Path
    plan: Plan
    models: dict[str, ModelSpec]
    layout: OutputLayout
    encode: EncodeSettings
    merge_options: dict[str, Any]
    priority: int = 0


@dataclass
class WorkerSlot:
    id: str
    handle: Any
    tier: str
    models: set[str] = field(default_factory=set)
    busy: str | None = None  # the stage id it is running


@dataclass
class Inflight:
    stage: Stage
    worker: str | None  # None for CPU (encoder) stages
    refs: tuple[Any, ...]
    started: float
    attempt: int
    detail: dict[str, Any]


def model_key(spec: ModelSpec) -> str:
    return f"{spec.family}:{spec.location}"


def now() -> datetime:
    return datetime.now(UTC)


class Director:
    def __init__(self, workers: dict[str, tuple[Any, str]], encoder: Any,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.workers = {wid: WorkerSlot(wid, handle, tier) for wid, (handle, tier) in workers.items()}
        self.encoder = encoder
        self.on_event = on_event or (lambda event: None)
        self.ledger: list[dict[str, Any]] = []
        self.records: dict[str, dict[str, Any]] = {}  # stage id -> what ran (params, observed, tier)

    # --- the loop ------------------------------------------------------------------------------

    def run(self, job: Job) -> None:
        plan, shots = job.plan, {sp.shot.id: sp for sp in job.plan.shots}
        done: set[str] = set()
        attempts: dict[str, int] = {}
        avoid: dict[str, set[str]] = {}
        inflight: dict[Any, Inflight] = {}
        side: list[Any] = []  # keyframe PNG writes: must finish, nothing waits on them
        outputs: dict[str, tuple[Any, ...]] = {}  # stage id -> result refs
        images = self._given_images(job)
        costs = stage_costs(job)
        tails = plan.tail_lengths(costs)
        seq = {sid: i for i, sid in enumerate(plan.stages)}
        self.on_event({"type": "job_started", "job": job.id, "stages": len(plan.stages),
                       "frames": sum(sp.frames for sp in plan.shots)})

        while len(done) < len(plan.stages):
            started = {f.stage.id for f in inflight.values()}
            ready = plan.ready(done, started)
            for stage in [s for s in ready if not s.gpu]:
                inflight[self._dispatch_cpu(job, stage, outputs)] = Inflight(
                    stage, None, (), time.time(), attempts.get(stage.id, 0) + 1, {})
            gpu_ready = [s for s in ready if s.gpu]
            if gpu_ready:
                if not self.workers:
                    raise RenderError("no GPU workers left in the pool")
                views = [WorkerView(w.id, w.tier, frozenset(w.models), w.busy is None) for w in self.workers.values()]
                wanted = [ReadyStage(s.id, model_key(job.models[s.kind]), job.priority, tails[s.id], seq[s.id],
                                     frozenset(avoid.get(s.id, ()))) for s in gpu_ready]
                for stage_id, worker_id in assign(wanted, views):
                    stage, slot = plan.stages[stage_id], self.workers[worker_id]
                    flight = self._dispatch_gpu(job, stage, slot, shots[stage.shot], outputs, images)
                    flight.attempt = attempts.get(stage_id, 0) + 1
                    inflight[flight.refs[-1]] = flight
            if not inflight:
                raise RenderError("nothing is running and nothing is ready: the plan has a cycle")
            finished, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in finished:
                flight = inflight.pop(ref)
                ok = self._finish(job, flight, ref, outputs, side, shots)
                if ok:
                    done.add(flight.stage.id)
                    continue
                attempts[flight.stage.id] = flight.attempt
                if flight.worker:
                    avoid.setdefault(flight.stage.id, set()).add(flight.worker)
                if flight.attempt >= MAX_ATTEMPTS:
                    self._cancel(inflight)
                    raise RenderError(f"stage {flight.stage.id} failed {flight.attempt} times: "
                                      f"{self.ledger[-1]['error']}")
        ray.get(side)
        self.on_event({"type": "job_finished", "job": job.id, "state": "succeeded"})

    # --- dispatch ------------------------------------------------------------------------------

    def _given_images(self, job: Job) -> dict[str, Any]:
        size = job.manifest.output.size
        return {sp.shot.id: ray.put(load_image(inside_root(job.root, sp.shot.keyframe), size))
                for sp in job.plan.shots if sp.first_frame_from == "image"}

    def _dispatch_gpu(self, job: Job, stage: Stage, slot: WorkerSlot, sp: ShotPlan,
                      outputs: dict[str, tuple[Any, ...]], images: dict[str, Any]) -> Inflight:
        manifest, spec = job.manifest, job.models[stage.kind]
        slot.busy = stage.id
        slot.models.add(model_key(spec))
        if stage.kind == "keyframe":
            params = keyframe_params(manifest, sp)
            req = {"model": spec, "knobs": memory_knobs(slot.tier), "params": params, "preset": slot.tier,
                   "lora": manifest.models.lora and str(inside_root(job.root, manifest.models.lora)),
                   "vae": manifest.models.vae and str(inside_root(job.root, manifest.models.vae))}
            refs = slot.handle.keyframe.options(num_returns=2).remote(req)
            detail = {"params": params, "preset": slot.tier}
        else:
            assert stage.segment is not None and stage.seed is not None
            preset = base_preset(manifest.quality, sp.shot.scene, slot.tier)
            params = video_params(manifest, sp, stage.segment, stage.seed, spec.family, preset, job.plan.fps)
            req = {"model": spec, "knobs": preset.knobs, "params": params, "preset": preset.label(),
                   "drop": stage.segment.drop, "kept": stage.segment.kept}
            refs = slot.handle.video.options(num_returns=3).remote(req, self._input_image(stage, outputs, images))
            detail = {"params": params, "preset": preset.label()}
        self.on_event({"type": "stage_started", "job": job.id, "stage": stage.id, "kind": stage.kind,
                       "shot": stage.shot, "worker": slot.id, "tier": slot.tier})
        return Inflight(stage, slot.id, tuple(refs), time.time(), 1, detail)

    def _input_image(self, stage: Stage, outputs: dict[str, tuple[Any, ...]], images: dict[str, Any]) -> Any:
        if not stage.deps:
            return images[stage.shot]
        dep = stage.deps[0]
        refs = outputs[dep]
        return refs[0] if dep.startswith("keyframe:") else refs[1]  # keyframe image / segment's last frame

    def _dispatch_cpu(self, job: Job, stage: Stage, outputs: dict[str, tuple[Any, ...]]) -> Any:
        if stage.kind == "clip":
            assert stage.shot is not None
            frames = [outputs[dep][0] for dep in stage.deps]
            ref = self.encoder.encode_clip.remote(str(job.layout.shot_clip(stage.shot)), job.plan.fps,
                                                  job.encode, *frames)
        else:
            clips = [str(job.layout.shot_clip(sp.shot.id)) for sp in job.plan.shots]
            ref = self.encoder.merge.remote(clips, str(job.layout.final), job.encode, job.merge_options)
        self.on_event({"type": "stage_started", "job": job.id, "stage": stage.id, "kind": stage.kind,
                       "shot": stage.shot, "worker": "encoder", "tier": "cpu"})
        outputs[stage.id] = (ref,)
        return ref

    # --- results -------------------------------------------------------------------------------

    def _finish(self, job: Job, flight: Inflight, ref: Any, outputs: dict[str, tuple[Any, ...]],
                side: list[Any], shots: dict[str, ShotPlan]) -> bool:
        stage = flight.stage
        slot = self.workers.get(flight.worker) if flight.worker else None
        if slot is not None:
            slot.busy = None
        row = {"job": job.id, "shot": stage.shot, "stage": stage.id, "attempt": flight.attempt,
               "worker": flight.worker or "encoder", "tier": slot.tier if slot else "cpu",
               "preset": flight.detail.get("preset", "encode"), "start": datetime.fromtimestamp(flight.started, UTC),
               "cache_hit": False}
        try:
            result = ray.get(ref)
        except (RayTaskError, RayActorError) as exc:
            if isinstance(exc, RayActorError) and flight.worker:
                self.workers.pop(flight.worker, None)  # a dead worker leaves the pool
            end = now()
            self.ledger.append({**row, "end": end, "seconds": (end - row["start"]).total_seconds(),
                                "outcome": "failed", "error": _short(exc)})
            self.on_event({"type": "stage_failed", "job": job.id, "stage": stage.id, "error": _short(exc)})
            return False
        end = now()
        record: dict[str, Any] = {"tier": row["tier"], "worker": row["worker"], "preset": row["preset"]}
        frames = 0
        if stage.gpu:
            outputs[stage.id] = flight.refs
            report = result
            record.update(params=flight.detail["params"], observed=report["observed"], knobs=report["knobs"],
                          device=report["device"], input_sha=report.get("input_sha"),
                          output_sha=report["output_sha"])
            row["peak_vram_bytes"] = report["observed"]["peak_vram_bytes"]
            if stage.kind == "keyframe" and stage.shot is not None:
                params = {**flight.detail["params"], "model": job.models["keyframe"].source}
                side.append(self.encoder.write_keyframe.remote(str(job.layout.keyframe(stage.shot)), params,
                                                               flight.refs[0]))
            else:
                assert stage.segment is not None
                frames = stage.segment.kept
        elif stage.kind == "clip":
            record["frames"] = result
        self.records[stage.id] = record
        self.ledger.append({**row, "end": end, "seconds": (end - row["start"]).total_seconds(),
                            "outcome": "succeeded", "error": None})
        self.on_event({"type": "stage_finished", "job": job.id, "stage": stage.id, "kind": stage.kind,
                       "shot": stage.shot, "worker": row["worker"], "tier": row["tier"],
                       "seconds": self.ledger[-1]["seconds"], "frames": frames})
        return True

    def _cancel(self, inflight: dict[Any, Inflight]) -> None:
        for ref in inflight:
            ray.cancel(ref, force=False)


def stage_costs(job: Job) -> dict[str, float]:
    """Relative cost of each stage for ordering: denoising steps x frames (a keyframe ~ one frame)."""
    manifest = job.manifest
    kf = manifest.steps.keyframe or 40
    vs = manifest.steps.video or 60
    costs: dict[str, float] = {}
    for sid, stage in job.plan.stages.items():
        if stage.kind == "keyframe":
            costs[sid] = kf
        elif stage.kind == "video" and stage.segment is not None:
            costs[sid] = vs * stage.segment.frames
        else:
            costs[sid] = 1.0
    return costs


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]

