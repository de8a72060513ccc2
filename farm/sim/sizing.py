"""How many GPUs of which tier a job needs to finish by a deadline, and what that costs.

Answered with the simulator (the farm's own job book and dispatch policy over the cost model), by
growing the cluster one GPU at a time: each step adds the GPU of the tier that buys the most
makespan per unit of hourly price, within each tier's limit (a cluster.yaml's node types), until the
simulated makespan meets the deadline or nothing more can be added. Greedy, not exhaustive: a
sizing it returns meets the deadline when it says so, but a cheaper mix may exist.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from farm.jobbook import JobBook
from farm.presets import TIERS
from farm.sim.costs import DEFAULT_COSTS, TierCost
from farm.sim.engine import simulate

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from `90`, `90s`, `45m`, `2h`, `1.5d`."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise ValueError(f"{text!r} is not a duration (e.g. 5400, 90m, 2h)")
        seconds = float(match.group(1)) * _UNIT[match.group(2) or "s"]
    if not 1.0 <= seconds <= 30 * 86400:
        raise ValueError(f"{text!r}: a deadline must be between 1 second and 30 days")
    return seconds


@dataclass(frozen=True)
class Sizing:
    cluster: dict[str, int]  # GPUs per tier
    makespan_s: float  # simulated on that cluster
    cost: float | None  # GPU-hours x price over the makespan; None where a tier has no price
    met: bool  # the makespan is within the deadline


def cost_of(cluster: Mapping[str, int], makespan_s: float, prices: Mapping[str, float]) -> float | None:
    if any(n and tier not in prices for tier, n in cluster.items()):
        return None
    return sum(n * prices[tier] for tier, n in cluster.items()) * makespan_s / 3600


def size_for_deadline(book: Callable[[], JobBook], limits: Mapping[str, int], deadline_s: float,
                      prices: Mapping[str, float], costs: Mapping[str, TierCost] = DEFAULT_COSTS) -> Sizing:
    """The smallest-step greedy cluster within `limits` (GPUs per tier) whose simulated makespan meets
    `deadline_s`; `book` makes a fresh job book per simulation. Tiers without a price weigh 1.0."""
    tiers: list[str] = [t for t in TIERS if limits.get(t, 0) > 0 and t in costs]
    if not tiers:
        raise ValueError("no GPU tier to size: the cluster allows no GPUs")
    cache: dict[tuple[int, ...], float] = {}

    def makespan(cluster: Mapping[str, int]) -> float:
        key = tuple(cluster.get(t, 0) for t in tiers)
        if key not in cache:
            cache[key] = simulate(book(), {t: n for t, n in cluster.items() if n}, costs=costs, bound=False).makespan
        return cache[key]

    # start from the one GPU that alone would finish soonest per unit of price
    first = min(tiers, key=lambda t: makespan({t: 1}) * prices.get(t, 1.0))
    cluster = {t: 0 for t in tiers} | {first: 1}
    span = makespan(cluster)
    while span > deadline_s:
        options = [t for t in tiers if cluster[t] < limits[t]]
        if not options:
            break
        gain = {t: (span - makespan(cluster | {t: cluster[t] + 1})) / prices.get(t, 1.0) for t in options}
        best = max(options, key=lambda t: (gain[t], -prices.get(t, 1.0)))
        if gain[best] <= 0:
            break  # one more GPU of any tier does not help: the job's longest chain is the limit
        cluster[best] += 1
        span = makespan(cluster)
    used = {t: n for t, n in cluster.items() if n}
    return Sizing(used, span, cost_of(used, span, prices), span <= deadline_s)
