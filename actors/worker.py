"""The GPU worker actor: `farm.gpu.worker.StageWorker` placed on a node of its tier."""

from __future__ import annotations

from typing import Any

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.remote import actor_class
from farm.config import FarmConfig, install
from farm.gpu.worker import StageWorker
from farm.rayenv import take_back_priority


def tier_resource(tier: str) -> str:
    """The custom Ray resource a node of this tier advertises (cluster.yaml sets the same names)."""
    return f"farm_tier_{tier}"


class ActorWorker(StageWorker):
    """A StageWorker that owns its process: the config its director handed it is the process's config
    (model downloads, compile), whatever node it runs on, and the process's priority: Ray starts
    workers at nice 15, which slows a pipeline call that shares cores (farm/rayenv.py)."""

    def __init__(self, worker_id: str, tier: str = "auto", threads: int | None = None,
                 config: FarmConfig | None = None) -> None:
        take_back_priority()
        if config is not None:
            install(config)
        super().__init__(worker_id, tier, threads, config=config)


# Threaded (3): `cancel` must run while a stage is denoising, and the director may send a worker its next
# stage before the current one ends (prefetch); `run` takes them one at a time, in order.
GpuWorker = actor_class(ActorWorker, max_restarts=0, max_concurrency=3)


def start_worker(worker_id: str, tier: str, *, gpu: bool, threads: int | None = None, node_id: str | None = None,
                 backend: type | None = None, backend_args: dict[str, Any] | None = None,
                 config: FarmConfig | None = None) -> Any:
    """One actor per GPU. A forced tier is placed through that tier's resource; `auto` only asks for a
    GPU and reads its tier from the card. `node_id` pins it to a node (the pool follows nodes).
    `backend` swaps in another worker class with the same methods (the simulator's SimWorker)."""
    # CPU workers need no resource: every node can run one.
    resources = {tier_resource(tier): 1} if tier not in ("auto", "cpu") else {}
    cls = GpuWorker if backend is None else actor_class(backend, max_restarts=0, max_concurrency=3)
    options: dict[str, Any] = {"num_gpus": 1 if gpu else 0, "num_cpus": 0, "resources": resources}
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    args = dict(backend_args or {})
    if backend is None:
        args["config"] = config  # the farm config reaches every node with the actor
    return cls.options(**options).remote(worker_id, tier, threads, **args)
