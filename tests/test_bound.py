"""The analytic lower bound against CP-SAT's optimum on instances small enough to prove it
(bench/cpsat.py; ortools is a bench/test extra installed by scripts/setup.sh)."""

from __future__ import annotations

import pytest
from helpers import base_manifest

from bench.cpsat import solve
from farm.jobbook import JobBook
from farm.jobsetup import setup_job
from farm.manifest import validate_data
from farm.schedule import assign
from farm.sim.engine import lower_bound, simulate

MODELS = {"keyframe": "stabilityai/stable-diffusion-xl-base-1.0",
          "video": "stabilityai/stable-video-diffusion-img2vid-xt"}


def book_of(durations, chained=()):
    shots = [{"id": f"s{i}", "prompt": "a scene", "duration": d} for i, d in enumerate(durations)]
    for i in chained:
        shots[i]["continue_from"] = "previous"
    data = base_manifest(models=MODELS, shots=shots, output={"fps": 15, "resolution": "32x32"},
                         steps={"keyframe": 30, "video": 25})
    return JobBook("job", setup_job(validate_data(data), "/nonexistent"), "/nonexistent")


@pytest.mark.parametrize(("durations", "chained", "cluster"), [
    ((1.0, 1.0, 1.0), (), {"high": 1, "low": 1}),
    ((2.0, 1.0), (1,), {"mid": 2}),
    ((1.0, 3.0, 1.0), (2,), {"high": 1, "mid": 1, "low": 1}),
])
def test_the_analytic_bound_never_exceeds_the_optimum(durations, chained, cluster):
    found = solve(book_of(durations, chained), cluster, time_limit_s=30, unit=0.01)
    assert found.status == "OPTIMAL", found
    stages = len(book_of(durations, chained).plan.stages)
    # CP-SAT's durations are rounded down to 10 ms: the optimum may sit below the exact one by that much
    assert lower_bound(book_of(durations, chained), cluster) <= found.best_s + stages * 0.01
    # and the farm's own schedule (with every model load paid) is never shorter than the optimum
    assert simulate(book_of(durations, chained), cluster, policy=assign).makespan >= found.best_s - 1e-6


def test_gpu_work_bound_splits_work_between_unlike_tiers():
    """Tier 0 draws keyframes 3x faster than tier 1 and is as fast at video. "Work over capacity" with one
    speed per tier counts tier 1 as fast as tier 0 (it is, at video) and says 2 s; the linear program
    knows there is only 1 s of video to give it and says 2.5 s. The best real schedule takes 3 s."""
    from farm.sim.engine import gpu_work_bound

    stages = [(1.0, 3.0)] * 3 + [(1.0, 1.0)]
    assert gpu_work_bound(stages, [1, 1]) == pytest.approx(2.5)
    assert gpu_work_bound([(1.0, 2.0)] * 6, [1, 1]) == pytest.approx(4.0)  # one class: 6 / (1 + 1/2)
    assert gpu_work_bound(stages, [2, 0]) == pytest.approx(2.0)  # a tier with no workers takes nothing
    assert gpu_work_bound(stages, [0, 1]) == pytest.approx(10.0)  # all on the slow tier
