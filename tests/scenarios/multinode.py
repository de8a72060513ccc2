"""Three-node cluster, one node per VRAM tier; a node is removed mid-render. Prints a JSON report.

Run by tests/test_multinode.py in its own process: a ray.cluster_utils.Cluster cannot share a
process with the test session's local Ray."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from actors.director import get_director
from farm.config import PolicyConfig
from farm.pool import PoolConfig
from farm.sim.costs import DEFAULT_COSTS


def main(root: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {t: cluster.add_node(num_cpus=1, resources={f"farm_tier_{t}": 1}) for t in ("high", "mid", "low")}
    ray.init(address=cluster.address, log_to_driver=False)
    # Tiny models load in well under a second; the assumed load times (20-60 s) are real weights', and
    # would rightly keep a planning policy from loading them onto the slower tiers for so small a job.
    costs = {tier: replace(cost, load_s=0.5) for tier, cost in DEFAULT_COSTS.items()}
    director = get_director(PoolConfig(), name="multinode", store_path=str(root / "farm.sqlite"),
                            cache_dir=str(root / "cache"), policy=PolicyConfig(backoff_s=0.05, reconcile_s=0.5),
                            threads=1, costs=costs)
    deadline = time.time() + 180
    while len(ray.get(director.workers_info.remote())) < 3:
        assert time.time() < deadline, "workers did not start"
        time.sleep(0.5)
    before = {w["id"]: w["tier"] for w in ray.get(director.workers_info.remote())}
    shots = [{"id": f"m{i}", "prompt": f"shot {i}", "duration": 1.0, "steps": {"video": 12}} for i in range(8)]
    data = {"version": 1, "title": "multinode", "seed": 5, "models": {"keyframe": "tiny", "video": "tiny"},
            "output": {"fps": 8, "resolution": "64x64", "preset": "ultrafast"}, "steps": {"keyframe": 2},
            "shots": shots}
    job = ray.get(director.submit.remote(data, str(root), str(root / "out"), options={"models": "tiny"}))
    removed_at = None
    mid = next(w for w, tier in before.items() if tier == "mid")
    while (status := ray.get(director.status.remote(job["id"])))["state"] in ("queued", "running"):
        # Removed once the job is under way and the mid node has done some of it (its worker may start
        # later than the others on a busy machine): the test is that all tiers work, then one leaves.
        if removed_at is None and status["progress"] >= 0.3 and any(
                r["worker"] == mid and r["outcome"] == "succeeded" and not r["cache_hit"]
                and r["stage"].split(":")[0] in ("keyframe", "video")
                for r in ray.get(director.attempts.remote(job["id"]))):
            cluster.remove_node(nodes["mid"])
            removed_at = time.time()
        assert time.time() < deadline + 300, "job did not finish"
        time.sleep(0.1)
    after = {w["id"]: w["tier"] for w in ray.get(director.workers_info.remote())}
    attempts = [dict(r) for r in ray.get(director.attempts.remote(job["id"]))]
    print(json.dumps({"state": status["state"], "error": status["error"], "before": before, "after": after,
                      "removed_at": removed_at, "attempts": attempts}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
