"""What crosses a process boundary: the typed messages between the director, the workers and the
encoder, and the names of states everyone agrees on.

Frozen dataclasses of plain data, so they pickle across Ray, hash into nothing by accident, and a
field added here is added for the director, the GPU worker, the simulator and `bench/gpu.py` at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from farm.presets import MemoryKnobs

if TYPE_CHECKING:
    from farm.encode import EncodeSettings
    from farm.manifest import Manifest
    from farm.models import ModelSpec


class JobState(StrEnum):
    """A job's life: queued -> running -> succeeded | failed | cancelled; failed and cancelled jobs
    (and succeeded ones whose outputs are wanted anew) can be requeued."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in ACTIVE_STATES


ACTIVE_STATES: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.RUNNING})
FINISHED_STATES: frozenset[JobState] = frozenset(set(JobState) - ACTIVE_STATES)


class StageKind(StrEnum):
    # a character's reference photos through the keyframe model's identity adapter (its image encoder),
    # once per job: every keyframe the character appears in reads the cached embeddings. GPU
    IDENTITY = "identity"
    KEYFRAME = "keyframe"  # text-to-image, GPU
    VIDEO = "video"  # one image-to-video call's denoising, up to its final latents, GPU
    DECODE = "decode"  # those latents through the VAE to frames, GPU (an OOM here redoes only this)
    CLIP = "clip"  # a shot's frames -> mp4, CPU (encoder)
    QC = "qc"  # a take's frames measured and judged (farm.qc), CPU (encoder): pass, retake or keep the best
    MERGE = "merge"  # every clip -> the film, CPU (encoder)

    @property
    def gpu(self) -> bool:
        return self in GPU_KINDS

    @property
    def role(self) -> str:
        """The model a GPU stage runs: a decode runs the video model's VAE."""
        if self not in GPU_KINDS:
            raise ValueError(f"a {self} stage runs no model")
        return "keyframe" if self in (StageKind.KEYFRAME, StageKind.IDENTITY) else "video"


GPU_KINDS: frozenset[StageKind] = frozenset({StageKind.IDENTITY, StageKind.KEYFRAME, StageKind.VIDEO,
                                             StageKind.DECODE})


@dataclass(frozen=True)
class IdentityAdapter:
    """The identity adapter a keyframe pipeline loads beside its model (docs/characters.md): part of
    the pipeline's residency key, so a worker keeps one loaded per (model, adapter, count)."""

    method: str  # "ip_adapter" or "instantid"
    weights: str  # the adapter's .safetensors file, or "tiny" (built in code: farm/gpu/identity.py)
    image_encoder: str  # IP-Adapter: its CLIP image encoder's folder, or "tiny"; InstantID: ""
    count: int = 1  # adapters side by side: one per character in the shot (InstantID: one)
    controlnet: str = ""  # InstantID: the IdentityNet ControlNet's folder, or "tiny"

    @property
    def tiny(self) -> bool:
        return self.weights == "tiny"


class Outcome(StrEnum):
    """How one stage attempt ended, as its ledger row says."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # an error in the stage: counts toward max_attempts
    OOM = "oom"  # out of GPU memory: the next rung of the preset ladder
    WORKER_LOST = "worker_lost"  # the process or node died under it: requeued, no attempt spent
    CANCELLED = "cancelled"  # the job was cancelled while it ran


class FailureKind(StrEnum):
    ERROR = "error"
    OOM = "oom"
    LOST = "lost"
    CANCELLED = "cancelled"
    DISK = "disk"  # a write failed for want of disk (full, read-only): the job fails at once

    @property
    def outcome(self) -> Outcome:
        return {FailureKind.ERROR: Outcome.FAILED, FailureKind.DISK: Outcome.FAILED, FailureKind.OOM: Outcome.OOM,
                FailureKind.LOST: Outcome.WORKER_LOST, FailureKind.CANCELLED: Outcome.CANCELLED}[self]


# --- jobs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """A storyboard to queue (Director.submit_many): the parsed manifest, the folder its relative
    paths are read from, and how the submitter wants it run."""

    manifest: dict[str, Any]
    root: str
    out_dir: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    idempotency_key: str | None = None
    webhook: str | None = None
    # The manifest as the API already validated it (a farm.manifest.Manifest, under the API's stricter
    # rules): the director plans from it instead of validating `manifest` a second time.
    validated: Manifest | None = None


# --- GPU stages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRequest:
    """One GPU stage for one worker: everything it needs, nothing it must look up.

    Inputs and outputs travel by cache key through the shared artifact cache, never as frames in
    the message, so a request is a few hundred bytes whatever the resolution."""

    job: str
    stage: str
    kind: StageKind
    model: ModelSpec
    params: Mapping[str, Any]  # the pipeline call's effective parameters (farm.effective)
    knobs: MemoryKnobs
    preset: str  # the preset's label, as the ledger shows it
    tier: str  # the tier whose presets the params came from
    output_key: str
    cache_dir: str
    input_key: str | None = None  # video: the stage whose last frame it starts from; decode: its latents
    drop: int = 0  # decode: leading frames that re-draw the conditioning frame
    kept: int = 0  # decode: frames the clip keeps
    loras: tuple[tuple[str, float], ...] = ()  # LoRA files/folders and their scales (the user's, a draft's)
    vae: str | None = None  # a VAE override
    embeddings: tuple[tuple[str, str], ...] = ()  # textual-inversion files and their trigger tokens
    scheduler: str | None = None  # a sampler to swap in (LCM for an LCM-LoRA draft)
    step_cache: float | None = None  # FirstBlockCache threshold, where the job asks for it
    frame_size: tuple[int, int] | None = None  # (w, h) the output must have, where the call draws another
    adapter: IdentityAdapter | None = None  # identity and keyframe stages of shots with characters
    identity: tuple[tuple[str, float], ...] = ()  # keyframe: each character's embeddings (cache key), scale
    references: tuple[str, ...] = ()  # identity: the character's reference images, as absolute paths

    @property
    def ident(self) -> str:
        """`job/stage`: what cancellation and injected faults match on."""
        return f"{self.job}/{self.stage}"


@dataclass(frozen=True)
class StageResult:
    """What a worker reports for a finished stage; the director files it, the lockfile shows it."""

    worker: str
    tier: str
    device: str
    preset: str
    knobs: Mapping[str, bool]
    observed: Mapping[str, Any]  # farm.observed.Observed.as_dict()
    wall_seconds: float
    output_sha: str
    input_sha: str | None = None
    idle_before_s: float | None = None  # the worker's gap since its previous stage ended (farm.observed.IdleClock)
    input_s: float = 0.0  # reading the stage's input (a frame or latents another worker may have made)

    @property
    def peak_vram_bytes(self) -> int | None:
        peak = self.observed.get("peak_vram_bytes")
        return int(peak) if peak is not None else None


@runtime_checkable
class Worker(Protocol):
    """A GPU worker as the director sees it: `farm.gpu.worker.StageWorker`, the simulator's
    `farm.sim.worker.SimWorker` and `bench/gpu.py` all speak it."""

    worker_id: str
    tier: str

    def run(self, req: StageRequest) -> StageResult: ...

    def cancel(self, ident: str) -> None: ...

    def info(self) -> dict[str, Any]: ...

    def set_faults(self, faults: list[dict[str, Any]]) -> None: ...

    def loaded_models(self) -> list[str]: ...

    def missing_models(self, specs: list[ModelSpec]) -> dict[str, str]: ...


# --- CPU stages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeRequest:
    """A clip, QC or merge for the encoder. `inputs` are segment cache keys (clip, QC) or clip paths
    (merge); a QC's options carry the key of the image the shot starts from and its seams."""

    job: str
    stage: str
    kind: StageKind
    dest: str
    inputs: tuple[str, ...]
    fps: int
    settings: EncodeSettings
    output_key: str
    options: Mapping[str, Any] = field(default_factory=dict)  # merge: transition, scale, interpolation

    @property
    def ident(self) -> str:
        return f"{self.job}/{self.stage}"


@dataclass(frozen=True)
class PublishRequest:
    """A finished job's last outputs, made on the encoder side (never in the director's loop): the
    provenance tags of its mp4s, the editor's timeline, the QC report and contact sheet."""

    job: str
    out_dir: str
    lock: Mapping[str, Any]  # the lockfile as written
    transitions: tuple[str, ...]  # the merge's, boundary by boundary
    crossfade_seconds: float
    frame_keys: Mapping[str, tuple[str, ...]]  # shot -> the kept take's decoded segments, by cache key
    curves: Mapping[str, Mapping[str, Any]]  # shot -> the kept take's QC curves
    seconds: Mapping[str, float]  # shot -> stage seconds from the ledger


@dataclass(frozen=True)
class EncodeResult:
    frames: int = 0
    metrics: Mapping[str, Any] = field(default_factory=dict)  # a QC stage's measurements (farm.qc.measure)
    note: str | None = None  # how it ran (the merge: "stream copy", or what it re-encoded and why)
