"""Quality control of a shot: metrics measured on the CPU from its frames, and the rules that judge them.

Each metric is one line of `METRICS`: what it measures, which way is better, its default threshold,
its threshold for the tiny random-weight models (whose every clip is noise, so the real defaults
would fail every take), and whether a failure is the keyframe's fault (then a retake draws a new
keyframe too). The measuring is `farm.shot_metrics` (OpenCV, scikit-image); `judge` here is plain
arithmetic, so the job book, the tests and the report all use the same verdict, and validating a
manifest imports no image library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Metric:
    name: str
    better: Literal["higher", "lower"]
    default: float  # threshold with real models
    tiny: float  # threshold with `--models tiny` (random weights: every clip is noise)
    gates: bool  # gates by default
    keyframe: bool  # a failure is the keyframe's: a retake draws a new keyframe too
    meaning: str

    def passes(self, value: float, threshold: float) -> bool:
        return value >= threshold if self.better == "higher" else value <= threshold


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("flicker", "higher", 0.85, 0.75, True, False,
           "VBench temporal flickering score, (255 - mean abs difference of consecutive frames) / 255"),
    Metric("ssim_min", "higher", 0.30, 0.0, False, False,
           "lowest SSIM between consecutive frames (a frame jump drops it)"),
    Metric("flow_jump", "lower", 6.0, 50.0, False, False,
           "largest Farneback flow magnitude between two frames over the shot's median (a jerk in motion)"),
    Metric("frozen", "lower", 0.5, 0.5, True, False,
           "longest run of near-identical frames (freezedetect, -60 dB), as a share of the shot"),
    Metric("black", "lower", 0.25, 0.25, True, False,
           "share of black frames (blackdetect: 98 % of pixels under 10 % luma)"),
    Metric("saturation", "lower", 0.75, 0.90, True, True,
           "mean HSV saturation of the shot, 0-1 (the seed's over-saturation check)"),
    Metric("drift", "lower", 0.20, 0.50, True, False,
           "mean abs difference, 0-1, between the shot's first frame and the image it starts from"),
    Metric("seam", "lower", 3.0, 3.0, True, False,
           "largest jump at a segment seam over the shot's median frame-to-frame difference"),
    # insightface's ArcFace embeddings: the same person scores about 0.4 and up, strangers under 0.2
    # (docs/characters.md). Tiny renders measure it with the stand-in analyser, which never gates.
    Metric("identity", "higher", 0.35, -1.0, True, True,
           "cosine similarity of the keyframe's face to the character's references (lowest character)"),
)}
MetricName = Literal["flicker", "ssim_min", "flow_jump", "frozen", "black", "saturation", "drift", "seam",
                     "identity"]
NEVER_GATES_TINY = ("identity",)  # measured by a stand-in on tiny renders: shown, never a reason to retake
assert set(get_args(MetricName)) == set(METRICS), "every metric has a name in MetricName"
DEFAULT_GATES = tuple(name for name, m in METRICS.items() if m.gates)
MAX_RETAKES = 3


class QcRules(BaseModel):
    """`qc:` at job level and per shot (a shot's fields override the job's, field by field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool | None = None  # default: on
    gate: list[MetricName] | None = None  # which metrics gate (default: DEFAULT_GATES)
    thresholds: dict[MetricName, Annotated[float, Field(ge=0, le=1000)]] = {}
    retakes: Annotated[int, Field(ge=0, le=MAX_RETAKES)] | None = None  # default 1
    on_fail: Literal["keep_best", "fail"] | None = None  # default keep_best: keep it, marked


@dataclass(frozen=True)
class Gates:
    """The rules a shot is judged by, every default filled in."""

    enabled: bool
    thresholds: Mapping[str, float]  # only the metrics that gate
    retakes: int
    on_fail: Literal["keep_best", "fail"]

    def as_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "thresholds": dict(self.thresholds), "retakes": self.retakes,
                "on_fail": self.on_fail}


def resolve(job: QcRules | None, shot: QcRules | None, *, tiny: bool = False,
            config: Mapping[str, Any] | None = None) -> Gates:
    """Farm config, then the job's `qc:`, then the shot's; thresholds default to the metric's own (its
    tiny-model one with `--models tiny`)."""
    layers = [QcRules.model_validate(config or {}), job or QcRules(), shot or QcRules()]
    enabled, gate, retakes, on_fail = True, list(DEFAULT_GATES), 1, "keep_best"
    thresholds: dict[str, float] = {}
    for rules in layers:
        enabled = rules.enabled if rules.enabled is not None else enabled
        gate = list(rules.gate) if rules.gate is not None else gate
        retakes = rules.retakes if rules.retakes is not None else retakes
        on_fail = rules.on_fail or on_fail
        thresholds.update({str(k): v for k, v in rules.thresholds.items()})
    chosen = {name: thresholds.get(name, METRICS[name].tiny if tiny else METRICS[name].default) for name in gate
              if not (tiny and name in NEVER_GATES_TINY)}
    return Gates(enabled, chosen, retakes if enabled else 0, on_fail)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Verdict:
    passed: bool
    failed: tuple[str, ...]  # metrics that failed their gate
    score: float  # lower is better: failed gates first, then how far past the gates it went

    @property
    def keyframe_at_fault(self) -> bool:
        return any(METRICS[name].keyframe for name in self.failed)


def judge(metrics: Mapping[str, float | None], gates: Gates) -> Verdict:
    """Which gates a take fails, and its score for choosing the best take: the count of failed gates,
    plus for each gate the distance past (or short of) its threshold, relative to the threshold, so
    a take that barely fails beats one that fails badly."""
    failed, margin = [], 0.0
    for name, threshold in gates.thresholds.items():
        value = metrics.get(name)
        if value is None:  # not measurable for this shot (no seam, no start image)
            continue
        metric = METRICS[name]
        if not metric.passes(value, threshold):
            failed.append(name)
        scale = max(abs(threshold), 1e-6)
        margin += (threshold - value) / scale if metric.better == "higher" else (value - threshold) / scale
    return Verdict(not failed, tuple(failed), len(failed) + 0.01 * margin)


def failed_gates(metrics: Mapping[str, Any], verdict: Verdict, gates: Gates) -> list[str]:
    """Each failed gate in words, "metric value (gate threshold)": for status, errors and the CLI."""
    def value(name: str) -> Any:
        v = metrics.get(name)
        return round(v, 4) if isinstance(v, float) else v

    return [f"{name} {value(name)} (gate {gates.thresholds.get(name)})" for name in verdict.failed]


def best_take(verdicts: Sequence[Verdict]) -> int:
    """Index of the take to keep: the lowest score (the earlier take on a tie)."""
    return min(range(len(verdicts)), key=lambda i: (verdicts[i].score, i))
