"""An exact reference for the scheduler benchmark: the same instance as a CP-SAT model (OR-Tools).

The instance is what `farm.sim.engine.simulate` runs: every stage of the job's DAG, its cost on each
tier of the cluster (farm/sim/costs.py), the GPUs per tier and the encoder pool. The model:

- each GPU stage runs on exactly one tier, as an optional interval of that tier's duration; each
  CPU stage (clip, QC, merge) on the encoder pool;
- a stage starts after all its dependencies end;
- per tier, at most `n_tier` stages at once (a cumulative of capacity n: with unit demands that is
  exactly n identical machines, and has none of their symmetry); the encoders likewise;
- model loads: on a tier of one GPU, exactly as the simulator charges them: each model used there
  is loaded once (load_s, occupying the GPU) before its first stage and kept. On a tier of several
  GPUs, which GPU loads what is left out: no GPU stage starts before the tier's load_s, later loads
  are dropped. A relaxation, so CP-SAT's proven bound stays a lower bound of the farm's real problem.

Durations are rounded down to whole `unit`s (another relaxation): the solution's makespan is
reported in those rounded units, so it is a schedule of the relaxed instance, which is what
"CP-SAT best" means in the benchmark. ortools is a bench/test extra, never a runtime dependency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from farm.jobbook import JobBook
from farm.sim.costs import DEFAULT_COSTS, TierCost, cost_table
from farm.sim.engine import cluster_tiers


@dataclass(frozen=True)
class Exact:
    status: str  # OPTIMAL, FEASIBLE, or UNKNOWN (nothing found in time)
    best_s: float | None  # the best schedule found (relaxed instance)
    bound_s: float  # CP-SAT's proven lower bound (BestObjectiveBound)
    seconds: float  # wall time spent


def solve(book: JobBook, cluster: Mapping[str, int], costs: Mapping[str, TierCost] = DEFAULT_COSTS, *,
          encoders: int = 2, time_limit_s: float = 120.0, workers: int = 2, unit: float = 0.01) -> Exact:
    from ortools.sat.python import cp_model

    tiers = cluster_tiers(cluster)
    plan = book.plan
    table = cost_table(book, [*tiers, "cpu"], costs)
    ticks = {t: {sid: int(math.floor(c / unit)) for sid, c in table[t].items()} for t in table}
    release = {t: int(math.floor(costs[t].load_s / unit)) for t in tiers}
    horizon = sum(max(ticks[t][sid] for t in tiers) if s.gpu else ticks["cpu"][sid]
                  for sid, s in plan.stages.items()) + max(release.values())
    model = cp_model.CpModel()
    start: dict[str, cp_model.IntVar] = {}
    end: dict[str, cp_model.IntVar] = {}
    per_tier: dict[str, list[cp_model.IntervalVar]] = {t: [] for t in [*tiers, "cpu"]}
    placed: dict[str, list[tuple[str, cp_model.IntVar]]] = {t: [] for t in tiers}
    for sid, stage in plan.stages.items():
        start[sid] = model.new_int_var(0, horizon, f"s_{sid}")
        end[sid] = model.new_int_var(0, horizon, f"e_{sid}")
        if not stage.gpu:
            per_tier["cpu"].append(model.new_interval_var(start[sid], ticks["cpu"][sid], end[sid], f"i_{sid}"))
            continue
        chosen = []
        for tier in tiers:
            on = model.new_bool_var(f"on_{sid}_{tier}")
            per_tier[tier].append(model.new_optional_interval_var(start[sid], ticks[tier][sid], end[sid], on,
                                                                  f"i_{sid}_{tier}"))
            model.add(start[sid] >= release[tier]).only_enforce_if(on)
            chosen.append(on)
            placed[tier].append((sid, on))
        model.add_exactly_one(chosen)
    for tier in tiers:  # a one-GPU tier: one load per model it runs, before that model's stages
        if cluster[tier] != 1:
            continue
        for key in sorted({book.model_key(plan.stages[sid]) for sid, _ in placed[tier]}):
            users = [(sid, on) for sid, on in placed[tier] if book.model_key(plan.stages[sid]) == key]
            used = model.new_bool_var(f"used_{tier}_{key}")
            model.add_max_equality(used, [on for _, on in users])
            load_start = model.new_int_var(0, horizon, f"ls_{tier}_{key}")
            load_end = model.new_int_var(0, horizon, f"le_{tier}_{key}")
            per_tier[tier].append(model.new_optional_interval_var(load_start, release[tier], load_end, used,
                                                                  f"load_{tier}_{key}"))
            for sid, on in users:
                model.add(start[sid] >= load_end).only_enforce_if(on)
    for sid, stage in plan.stages.items():
        for dep in stage.deps:
            model.add(start[sid] >= end[dep])
    makespan = model.new_int_var(0, horizon, "makespan")
    model.add_max_equality(makespan, list(end.values()))
    for tier, intervals in per_tier.items():
        capacity = encoders if tier == "cpu" else cluster[tier]
        if intervals:
            model.add_cumulative(intervals, [1] * len(intervals), capacity)
    # Redundant, for a stronger bound: a tier's stages fit in its GPUs x makespan (energetic reasoning).
    for tier in tiers:
        model.add(sum(ticks[tier][sid] * on for sid, on in placed[tier]) <= cluster[tier] * makespan)
    model.minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_search_workers = workers
    status = solver.solve(model)
    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    return Exact(solver.status_name(status), solver.objective_value * unit if found else None,
                 solver.best_objective_bound * unit, solver.wall_time)
