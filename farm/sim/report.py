"""`farm plan FILE --simulate CLUSTER`: a storyboard's estimated makespan on a cluster, as text."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from farm.artifacts import user_images
from farm.jobbook import JobBook
from farm.jobsetup import JobSetup, setup_job
from farm.manifest import load
from farm.presets import TIERS
from farm.sim.cluster import load_cluster
from farm.sim.costs import DEFAULT_COSTS, TierCost
from farm.sim.engine import Faults, SimResult, simulate


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_report(result: SimResult, cluster: Mapping[str, int], faults: Faults | None = None) -> str:
    """Per tier: GPUs, busy %, stages run; then makespan, lower bound, their ratio, and retries."""
    ran: dict[str, int] = {}
    for run in result.runs:
        ran[run.worker] = ran.get(run.worker, 0) + 1
    rows = [("tier", "GPUs", "busy %", "stages")]
    groups: list[tuple[str, int, list[str]]] = [
        (t, cluster.get(t, 0), [w for w, wt in result.tiers.items() if wt == t and not w.startswith("encoder")])
        for t in TIERS if cluster.get(t, 0) > 0]
    encoders = [w for w in result.tiers if w.startswith("encoder")]
    groups.append(("encoders", len(encoders), encoders))
    for name, count, workers in groups:
        capacity = count * result.makespan
        pct = 100.0 * sum(result.busy.get(w, 0.0) for w in workers) / capacity if capacity else 0.0
        rows.append((name, str(count), f"{pct:.1f}", str(sum(ran.get(w, 0) for w in workers))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in rows]
    lines += [
        "",
        f"makespan     {result.makespan:10.1f} s  ({_duration(result.makespan)})",
        f"lower bound  {result.lower_bound:10.1f} s  ({_duration(result.lower_bound)})",
        f"ratio        {result.ratio:10.3f}",
        f"model loads  {result.loads:10d}",
        f"retries      {result.retries:10d}  (failed {result.outcomes.get('failed', 0)}, "
        f"out of memory {result.outcomes.get('oom', 0)})",
        f"cache hits   {result.cache_hits:10d}",
        f"job          {', '.join(result.jobs.values()):>10s}",
    ]
    if faults is not None and (faults.error_rate or faults.oom_rate):
        lines.append(f"(simulated faults: {faults.error_rate:.1%} of GPU attempts fail, {faults.oom_rate:.1%} run "
                     f"out of memory; seed {faults.seed})")
    lines.append("(estimated with assumed per-tier costs, cold start; see farm/sim/costs.py)")
    return "\n".join(lines)


def simulated_book(setup: JobSetup, job_id: str = "simulated") -> JobBook:
    """A job book to simulate a planned job with (its user images keyed as the director would)."""
    images = {shot: key for shot, (_, key) in user_images(setup).items()}
    return JobBook(job_id, setup, "/nonexistent", image_keys=images)


def simulate_file(manifest_path: str | Path, cluster_path: str | Path, *, models: str | None = None,
                  faults: Faults | None = None, costs: Mapping[str, TierCost] | None = None,
                  costs_label: str = "assumed figures (farm/sim/costs.py)") -> str:
    """Load both files, plan the job with the farm's own job book, simulate, and report."""
    path = Path(manifest_path)
    manifest = load(path)
    cluster = load_cluster(cluster_path)
    setup = setup_job(manifest, path.parent, {"models": models})
    book = simulated_book(setup)
    faults = faults or Faults()
    result = simulate(book, cluster, faults=faults, costs=costs or DEFAULT_COSTS)
    return format_report(result, cluster, faults) + f"\ncosts: {costs_label}"


def deadline_answer(setup: JobSetup, cluster_path: str | Path, deadline_s: float, *,
                    costs: Mapping[str, TierCost] | None = None, prices: Mapping[str, float] | None = None) -> str:
    """`farm plan --simulate CLUSTER --deadline T`: the GPUs per tier (the cluster file's counts are
    the limits) that finish the planned job by T in simulation, the makespan there, and the cost at
    `prices`."""
    from farm.sim.sizing import size_for_deadline

    limits = load_cluster(cluster_path)
    prices = dict(prices or {})
    sized = size_for_deadline(lambda: simulated_book(setup), limits, deadline_s, prices, costs or DEFAULT_COSTS)
    gpus = " + ".join(f"{n} {tier}" for tier, n in sized.cluster.items())
    cost = ("unknown: set `prices:` per tier in the farm config" if sized.cost is None
            else f"{sized.cost:.2f} (GPU-hours x prices over the makespan)")
    verdict = "meets it" if sized.met else f"cannot meet it within {limits} (the most that helps)"
    return (f"\ndeadline {deadline_s / 3600:.2f} h: {gpus} GPUs, simulated makespan {sized.makespan_s / 3600:.2f} h, "
            f"{verdict}\ncost: {cost}")
