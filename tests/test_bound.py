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
