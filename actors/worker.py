"""The GPU worker actor: `farm.worker.StageWorker` placed on a node of its tier."""

from __future__ import annotations

from typing import Any

import ray

from farm.worker import StageWorker


def tier_resource(tier: str) -> str:
    """The custom Ray resource a node of this tier advertises (cluster.yaml sets the same names)."""
    return f"farm_tier_{tier}"


@ray.remote(max_restarts=0)
class GpuWorker(StageWorker):
    pass


def start_worker(worker_id: str, tier: str, *, gpu: bool, threads: int | None = None) -> Any:
    """One actor per GPU. A forced tier is placed through that tier's resource; `auto` only asks
    for a GPU (or nothing, on a CPU box) and reads its tier from the card."""
    resources = {tier_resource(tier): 1} if tier != "auto" else {}
    return GpuWorker.options(
        name=None,
        num_gpus=1 if gpu else 0,
        num_cpus=0,  # CPU threads are set by `threads`; Ray's CPU slots are left to the encoders
        resources=resources,
    ).remote(worker_id, tier, threads)
