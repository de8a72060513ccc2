"""The HTTP API's bodies as pydantic models: /openapi.json is generated from these, and the director
builds its answers through them, so what the API promises is what the farm returns."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field

from farm.contract import JobState

if TYPE_CHECKING:
    from farm.jobbook import JobBook
    from farm.store import JobRow


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShotQc(_Body):
    """A shot's quality control so far: its latest judged take, and why it failed where it did."""

    take: int
    passed: bool
    failed: list[str]  # the gates it failed, each "metric value (gate threshold)"
    takes: int  # takes judged so far


class ShotStatus(_Body):
    id: str
    state: str  # queued | running | succeeded
    stage: str | None = None  # the stage it runs now
    worker: str | None = None
    tier: str | None = None
    qc: ShotQc | None = None


class FieldProblem(_Body):
    """One entry of a 422 body: where in the manifest, and what is wrong."""

    loc: list[str | int]
    msg: str


class JobStatus(_Body):
    id: str
    title: str
    state: JobState
    priority: int
    progress: float  # 0..1: finished stages over all stages
    shots: list[ShotStatus]
    created: float  # Unix times
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    out_dir: str
    warnings: list[FieldProblem] = []  # what the manifest asks for that no model will use (unused prompts)


class WorkerInfo(_Body):
    id: str
    state: str  # idle | busy | quarantined | unreachable
    tier: str
    node: str | None = None
    node_id: str | None = None
    device: str | None = None
    gpu: str | None = None
    vram_total: int | None = None
    vram_used: int | None = None
    memory_cap: float | None = None  # share of the card a forced tier may use; None: all of it
    utilization: float | None = None
    loaded_models: list[str] = []
    stage: str | None = None  # `job/stage` it runs now
    stages_run: int = 0
    pid: int | None = None
    nice: int | None = None  # its process priority: above 0 it yields the cores to Ray's daemons (farm/rayenv.py)
    failures: int = 0


class PriorityChange(_Body):
    """PATCH /v1/jobs/{id}: a job's new priority (higher first; running stages are not preempted)."""

    model_config = ConfigDict(extra="forbid")
    priority: Annotated[int, Field(ge=-100, le=100, strict=True)]  # strict: `true` is no priority


class PlannedStage(_Body):
    id: str
    kind: str
    shot: str | None = None
    deps: list[str]
    frames: int | None = None


class Preflight(_Body):
    """POST /v1/validate: a storyboard checked and planned, not submitted."""

    valid: bool
    errors: list[FieldProblem]  # each at its field path
    warnings: list[FieldProblem]  # what the job asks for that no model will use
    stages: list[PlannedStage]
    makespan_s: float | None = None  # simulated on `cluster` with the farm's cost model
    lower_bound_s: float | None = None
    cluster: dict[str, int]  # workers per tier the simulation used
    cluster_assumed: bool  # no worker was up: one CPU worker assumed


class Health(_Body):
    status: str
    version: str


class Problem(_Body):
    detail: str


@dataclass(frozen=True)
class JobView:
    """What a job's book says of it in its status: all the director keeps of a finished job (a few
    KiB, where its book holds its plan, requests and every stage's record: 65-135 KiB for 2-4 shots,
    and a farm runs for months)."""

    shots: tuple[ShotStatus, ...]
    progress: float
    warnings: tuple[FieldProblem, ...]

    @classmethod
    def of(cls, book: JobBook) -> JobView:
        return cls(tuple(ShotStatus(**s) for s in book.shot_states()), book.progress,
                   tuple(FieldProblem(loc=list(w.loc), msg=w.msg) for w in book.setup.warnings))


class KeptViews:
    """The views of the latest `keep` finished jobs, oldest first out."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._views: OrderedDict[str, JobView] = OrderedDict()

    def add(self, job_id: str, view: JobView) -> list[str]:
        """Keep `view` as the newest; answers the jobs that no longer fit, forgotten here."""
        self._views.pop(job_id, None)
        self._views[job_id] = view
        out = []
        while len(self._views) > self.keep:
            out.append(self._views.popitem(last=False)[0])
        return out

    def get(self, job_id: str) -> JobView | None:
        return self._views.get(job_id)

    def pop(self, job_id: str) -> None:
        self._views.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._views)


def job_status(row: JobRow, view: JobView | None, stage_rows: list[str] | None = None) -> JobStatus:
    """A job as the API shows it: from its book's view when the director holds one (a live book, or
    what it kept of a finished one), else from the store (`stage_rows`: the states of its stored
    stages)."""
    shots: list[ShotStatus] = []
    warnings: list[FieldProblem] = []
    if view is not None:
        shots, progress, warnings = list(view.shots), view.progress, list(view.warnings)
    else:
        rows = stage_rows or []
        progress = sum(state == JobState.SUCCEEDED for state in rows) / max(len(rows), 1)
    if row.state == JobState.SUCCEEDED:
        progress = 1.0
    return JobStatus(id=row.id, title=row.title, state=JobState(row.state), priority=row.priority,
                     progress=round(progress, 4), shots=shots, created=row.created, started=row.started,
                     finished=row.finished, error=row.error, out_dir=row.out_dir, warnings=warnings)
