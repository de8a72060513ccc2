"""The GPU worker actor: `farm.worker.StageWorker` placed on a node of its tier."""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from farm.worker import StageWorker


def tier_resource(tier: str) -> str:
    """The custom Ray resource a node of this tier advertises (cluster.yaml sets the same names)."""
    return f"farm_tier_{tier}"


# Threaded (2): `cancel` must run while a stage is denoising. The director never sends a worker two stages.
@ray.remote(max_restarts=0, max_concurrency=2)
class GpuWorker(StageWorker):
    pass


def start_worker(worker_id: str, tier: str, *, gpu: bool, threads: int | None = None, node_id: str | None = None,
                 backend: type | None = None, backend_args: dict[str, Any] | None = None) -> Any:
    """One actor per GPU. A forced tier is placed through that tier's resource; `auto` only asks for a
    GPU and reads its tier from the card. `node_id` pins it to a node (the pool follows nodes).
    `backend` swaps in another worker class with the same methods (the simulator's SimWorker)."""
    # CPU workers need no resource: every node can run one.
    resources = {tier_resource(tier): 1} if tier not in ("auto", "cpu") else {}
    cls = GpuWorker if backend is None else ray.remote(max_restarts=0, max_concurrency=2)(backend)
    options: dict[str, Any] = {"num_gpus": 1 if gpu else 0, "num_cpus": 0, "resources": resources}
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return cls.options(**options).remote(worker_id, tier, threads, **(backend_args or {}))
