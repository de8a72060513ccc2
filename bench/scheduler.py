"""Scheduler benchmark: the real director dispatching a 120-shot storyboard to simulated workers.

16 simulated GPUs (4 high, 8 mid, 4 low), every fifth shot chained to the previous one. Workers and
encoders sleep per the simulator's cost model (scaled down by --time-scale), so what is measured is
the director's own policy and overhead. Reported, for the farm policy and a FIFO round-robin baseline
run the same way: makespan / lower bound (max of total work over capacity and the longest chain),
the discrete-event simulation's prediction, and dispatch latency (stage ready -> dispatched).

    python -m bench.scheduler [--time-scale 0.01]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from bench.report import table, write_section
from farm.cache import ArtifactCache
from farm.contract import EncodeRequest, EncodeResult, StageKind
from farm.jobbook import JobBook
from farm.jobsetup import setup_job
from farm.manifest import validate_data
from farm.pool import PoolConfig
from farm.schedule import assign, assign_fifo
from farm.sim.costs import CLIP_FRAME_S, MERGE_FRAME_S, QC_FRAME_S
from farm.sim.engine import lower_bound, simulate
from farm.sim.worker import SimWorker

CLUSTER = {"high": 4, "mid": 8, "low": 4}


def storyboard(shots: int = 120, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(shots):
        shot = {"id": f"s{i:03d}", "prompt": f"shot {i}", "duration": float(rng.choice([2.0, 3.0, 4.0, 5.0]))}
        if i % 5 == 4:
            shot["continue_from"] = "previous"
        items.append(shot)
    # Real model ids (never loaded: the workers are simulated) so segments are SVD-XT's 25 frames.
    return {"version": 1, "title": "scheduler benchmark", "seed": seed, "output": {"fps": 15, "resolution": "32x32"},
            "steps": {"keyframe": 30, "video": 25}, "shots": items}


class SimEncoder:
    """Encoder with the real one's methods; sleeps per the cost model and writes placeholder files."""

    def __init__(self, cache_dir: str, time_scale: float = 1.0) -> None:
        self.cache = ArtifactCache(cache_dir)
        self.scale = time_scale
        self.frames = 0

    def set_frames(self, frames: int) -> None:
        self.frames = frames

    def write_keyframe(self, path: str, params: dict[str, Any], key: str) -> str:
        return path

    def publish(self, req: Any) -> None:
        """Nothing to tag or draw: the simulated clips are placeholders (this bench measures dispatch)."""

    def run(self, req: EncodeRequest) -> EncodeResult:
        if req.kind == StageKind.QC:  # no measuring: every simulated take passes
            frames = sum(len(self.cache.get_arrays(k)["frames"]) for k in req.inputs)
            time.sleep(frames * QC_FRAME_S * self.scale)
            self.cache.put_json(req.output_key, {})
            return EncodeResult(frames)
        if req.kind == StageKind.CLIP:
            frames = sum(len(self.cache.get_arrays(k)["frames"]) for k in req.inputs)
            seconds = frames * CLIP_FRAME_S
        else:  # the whole film's frames at the merge's per-frame cost, as in the simulator
            frames, seconds = 0, self.frames * MERGE_FRAME_S
        time.sleep(seconds * self.scale)
        Path(req.dest).parent.mkdir(parents=True, exist_ok=True)
        Path(req.dest).write_bytes(b"sim")
        self.cache.put_file(req.output_key, Path(req.dest), "mp4")
        return EncodeResult(frames)


def run_director(policy_name: str, assign_fn: Any, data: dict[str, Any], root: Path, scale: float) -> dict[str, Any]:
    from actors.director import get_director
    from farm.config import PolicyConfig

    director = get_director(PoolConfig(), name=f"bench-{policy_name}", store_path=str(root / f"{policy_name}.sqlite"),
                            cache_dir=str(root / f"cache-{policy_name}"), policy=PolicyConfig(reconcile_s=1.0),
                            backend=SimWorker, backend_args={"time_scale": scale}, encoder_backend=SimEncoder,
                            encoder_args={"time_scale": scale}, assign_fn=assign_fn)
    deadline = time.time() + 300
    while ray.get(director.stats.remote())["workers"] < sum(CLUSTER.values()):
        assert time.time() < deadline, "workers did not start"
        time.sleep(0.5)
    plan = setup_job(data, root).plan
    # the simulated encoder needs the film's length for the merge's cost
    ray.get(ray.get(director.encoder_handle.remote()).set_frames.remote(sum(sp.frames for sp in plan.shots)))
    job = ray.get(director.submit.remote(data, str(root), str(root / f"out-{policy_name}")))
    while ray.get(director.status.remote(job["id"]))["state"] in ("queued", "running"):
        time.sleep(0.2)
    status = ray.get(director.status.remote(job["id"]))
    assert status["state"] == "succeeded", status
    stats = ray.get(director.stats.remote())
    ray.kill(director, no_restart=True)
    return {"makespan": (status["finished"] - status["started"]) / scale, **stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time-scale", type=float, default=0.01, help="real seconds per simulated second")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    data = storyboard()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", resources={f"farm_tier_{t}": n for t, n in CLUSTER.items()}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = setup_job(validate_data(data, root), root)
        plan = setup.plan
        bound = lower_bound(JobBook("bench", setup, str(root)), CLUSTER)
        predicted = {name: simulate(JobBook("bench", setup, str(root)), CLUSTER, policy=fn).makespan
                     for name, fn in (("farm", assign), ("fifo", assign_fifo))}
        measured = {name: run_director(name, fn, data, root, args.time_scale)
                    for name, fn in (("farm", assign), ("fifo", assign_fifo))}
    ray.shutdown()
    rows = []
    for name, label in (("farm", "farm policy (residency, tier, longest chain first)"),
                        ("fifo", "FIFO round-robin baseline")):
        m = measured[name]
        rows.append({"policy": label, "makespan s": f"{m['makespan']:.0f}", "lower bound s": f"{bound:.0f}",
                     "makespan / bound": f"{m['makespan'] / bound:.3f}",
                     "simulated / bound": f"{predicted[name] / bound:.3f}",
                     "dispatch p50 ms": f"{m['dispatch_latency_p50'] * 1000:.1f}",
                     "dispatch p99 ms": f"{m['dispatch_latency_p99'] * 1000:.1f}"})
    shots = len(plan.shots)
    body = (f"{shots} shots ({sum(1 for sp in plan.shots if sp.first_frame_from == 'previous')} chained), "
            f"{len(plan.stages)} stages, {sum(sp.frames for sp in plan.shots)} frames at 15 fps; cluster "
            f"{CLUSTER} simulated GPUs; time scale {args.time_scale} (real s per simulated s). Costs are the "
            "simulator's assumed per-tier figures (farm/sim/costs.py; QC measured by bench/qc.py), not GPU "
            "measurements. Makespan runs from the job's first dispatch to its end, with workers started "
            "beforehand.\n\n")
    body += table(rows) + "\n"
    print(body)
    if not args.no_write:
        write_section("scheduler", "Scheduler: makespan vs. lower bound (issue 3)",
                      f"python -m bench.scheduler --time-scale {args.time_scale}", body)


if __name__ == "__main__":
    main()
