"""A storyboard checked and planned without submitting it: what the submit page shows as it is typed.

Validation with every error at its field path, the warnings a render would give, the stage table,
and the makespan the simulator predicts on the workers the farm has now (the same job book and
dispatch policy the director runs, over the assumed or calibrated costs of farm/sim/costs.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from farm.jobsetup import setup_job
from farm.manifest import FieldError, ManifestError
from farm.sim.engine import simulate
from farm.sim.report import simulated_book

ASSUMED_CLUSTER = {"cpu": 1}  # with no worker up yet: one CPU worker, as `farm render` would start


def preflight(data: Any, root: Path, options: Mapping[str, Any], cluster: Mapping[str, int],
              extra_errors: list[FieldError] | None = None) -> dict[str, Any]:
    """{"valid", "errors", "warnings", "stages", "makespan_s", "lower_bound_s", "cluster",
    "cluster_assumed"}; errors as [{"loc", "msg"}]. `cluster`: GPU workers per tier now."""
    def problems(errors: list[FieldError]) -> list[dict[str, Any]]:
        return [{"loc": list(e.loc), "msg": e.msg} for e in errors]

    out: dict[str, Any] = {"valid": False, "errors": [], "warnings": [], "stages": [], "makespan_s": None,
                           "lower_bound_s": None, "cluster": dict(cluster or ASSUMED_CLUSTER),
                           "cluster_assumed": not cluster}
    try:
        setup = setup_job(data, root, dict(options))
    except ManifestError as exc:
        out["errors"] = problems(exc.errors)
        return out
    except ValueError as exc:  # a model that cannot be resolved
        out["errors"] = [{"loc": ["models"], "msg": str(exc)}]
        return out
    if extra_errors:
        out["errors"] = problems(extra_errors)
        return out
    result = simulate(simulated_book(setup, "preflight"), out["cluster"])
    frames = {sp.shot.id: sp.frames for sp in setup.plan.shots}
    out.update(valid=True, warnings=problems(setup.warnings), makespan_s=round(result.makespan, 2),
               lower_bound_s=round(result.lower_bound, 2),
               stages=[{"id": s.id, "kind": str(s.kind), "shot": s.shot, "deps": list(s.deps),
                        "frames": s.segment.frames if s.segment else (frames.get(s.shot or "") if s.shot else None)}
                       for s in setup.plan.stages.values()])
    return out
