"""Soak: one worker renders hundreds of tiny stages over many jobs; does anything grow?

A local farm (one CPU worker, tiny models) renders `--jobs` storyboards one after another, with
model swaps (the keyframe family alternates between jobs), cancellations (every 10th job, once it
runs) and OOM-ladder rungs (every 5th job, an injected out-of-memory on its first video call).
After each job it samples the worker's resident memory, open file descriptors and threads, the
director's resident memory and Ray's `gcs_server`'s. Reported: growth from the sample at the 50th
stage (after warm-up) to the last. Targets (issue 18): the worker's memory grows under 5%, its
descriptors and threads stay flat, and the director's memory stays flat.

    python -m bench.soak [--jobs 50] [--shots 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.report import table, write_section
from farm.rayenv import LOCAL_RAY_ENV, TASK_EVENTS_ENV

WARM_STAGES = 50  # the sample at or after this many stages is the baseline


def storyboard(i: int, shots: int) -> dict[str, Any]:
    keyframe = "tiny:sdxl" if i % 2 == 0 else "tiny:flux"  # a model swap on the one worker every job
    return {"version": 1, "title": f"soak {i}", "seed": 5000 + i,
            "models": {"keyframe": keyframe, "video": "tiny"},
            "output": {"fps": 8, "resolution": "32x32"},
            "shots": [{"id": f"s{k}", "prompt": f"soak {i} shot {k}", "duration": 0.5} for k in range(shots)]}


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def gcs_pid() -> int | None:
    for proc in psutil.process_iter(["name", "cmdline"]):
        if "gcs_server" in (proc.info["name"] or "") or any("gcs_server" in c for c in proc.info["cmdline"] or []):
            return proc.pid
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--task-events", type=int, default=None,
                    help="the GCS's cap on kept task events for this run (default: the farm's, farm/rayenv.py)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.task_events is not None:  # before Ray starts: its GCS reads the cap once
        os.environ[TASK_EVENTS_ENV] = str(args.task_events)
    home = Path(tempfile.mkdtemp(prefix="farm-soak-"))
    os.environ["FARM_HOME"] = str(home)
    import ray

    from actors.director import KEEP_FINISHED
    from farm.config import current
    from farm.driver import local_director, start_ray
    from farm.pool import PoolConfig

    pool = PoolConfig(tier="cpu", workers=1)
    start_ray(pool)
    director = local_director(pool, current())
    director_pid = ray.get(director.pid.remote())
    while not (workers := ray.get(director.workers_info.remote())):
        time.sleep(0.5)
    worker = workers[0]
    gcs = gcs_pid()
    samples: list[dict[str, Any]] = []
    stages = 0
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(args.jobs):
        if i % 5 == 4:  # an OOM on this job's first video call: the ladder's next rung runs it
            ray.get(director.set_faults.remote(worker["id"], [{"match": "*/video:*", "kind": "oom", "times": 1}]))
        job = ray.get(director.submit.remote(storyboard(i, args.shots), str(home), str(home / "out" / str(i)),
                                             options={"models": None, "preview": False, "cache": True}))
        while (state := ray.get(director.status.remote(job["id"])))["state"] in ("queued", "running"):
            if i % 10 == 9 and state["state"] == "running" and state["progress"] > 0.2:
                ray.get(director.cancel.remote(job["id"]))
            time.sleep(0.1)
        attempts = ray.get(director.attempts.remote(job["id"]))
        for a in attempts:
            outcomes[a["outcome"]] = outcomes.get(a["outcome"], 0) + 1
        stages += sum(1 for a in attempts if a["worker"] == worker["id"])
        proc = psutil.Process(worker["pid"])
        samples.append({"job": i, "state": state["state"], "stages": stages, "worker_rss": proc.memory_info().rss,
                        "fds": proc.num_fds(), "threads": proc.num_threads(),
                        "director_rss": rss(director_pid) if director_pid else None,
                        "gcs_rss": rss(gcs) if gcs else None})
        print(f"job {i:3d} {state['state']:9s} stages {stages:4d} worker {samples[-1]['worker_rss'] / 2**20:7.1f} MiB "
              f"fds {samples[-1]['fds']} threads {samples[-1]['threads']} "
              f"director {(samples[-1]['director_rss'] or 0) / 2**20:.1f} MiB "
              f"gcs {(samples[-1]['gcs_rss'] or 0) / 2**20:.1f} MiB", flush=True)
    wall = time.perf_counter() - started
    ray.shutdown()

    base = next((s for s in samples if s["stages"] >= WARM_STAGES), samples[0])
    last = samples[-1]
    after = samples[samples.index(base):]

    def growth_from(first: dict[str, Any], key: str) -> str:
        if first[key] is None:
            return "n/a"
        return f"{(last[key] / first[key] - 1) * 100:+.1f}%"

    def growth(key: str) -> str:
        return growth_from(base, key)

    def spread(key: str) -> str:
        return f"{min(s[key] for s in after)}-{max(s[key] for s in after)}"

    rows = [{"measure": "worker resident memory", "at warm-up": f"{base['worker_rss'] / 2**20:.1f} MiB",
             "last": f"{last['worker_rss'] / 2**20:.1f} MiB", "growth": growth("worker_rss"),
             "target": "< 5%", "met": "yes" if last["worker_rss"] < 1.05 * base["worker_rss"] else "NO"},
            {"measure": "worker open fds (min-max after warm-up)", "at warm-up": base["fds"], "last": last["fds"],
             "growth": spread("fds"), "target": "flat",
             "met": "yes" if last["fds"] <= base["fds"] else "NO"},
            {"measure": "worker threads (min-max after warm-up)", "at warm-up": base["threads"],
             "last": last["threads"], "growth": spread("threads"),
             "target": "flat", "met": "yes" if last["threads"] <= base["threads"] else "NO"}]
    if base["director_rss"]:
        rows.append({"measure": "director resident memory", "at warm-up": f"{base['director_rss'] / 2**20:.1f} MiB",
                     "last": f"{last['director_rss'] / 2**20:.1f} MiB", "growth": growth("director_rss"),
                     "target": "flat (< 5%)", "met": "yes" if last["director_rss"] < 1.05 * base["director_rss"]
                     else "NO"})
        full = next((s for s in after if s["job"] >= KEEP_FINISHED), None)
        if full is not None and full is not last:  # what it keeps of finished jobs no longer grows from here
            per_job = (last["director_rss"] - full["director_rss"]) / max(last["job"] - full["job"], 1) / 1024
            rows.append({"measure": f"director resident memory from job {full['job']} (by then it keeps its "
                                    f"{KEEP_FINISHED} latest finished jobs' status and events)",
                         "at warm-up": f"{full['director_rss'] / 2**20:.1f} MiB",
                         "last": f"{last['director_rss'] / 2**20:.1f} MiB", "growth": growth_from(full, "director_rss"),
                         "target": "flat", "met": f"{per_job:+.0f} KiB a job"})
    if base["gcs_rss"]:
        half = after[len(after) // 2]
        rows.append({"measure": "Ray gcs_server resident memory", "at warm-up": f"{base['gcs_rss'] / 2**20:.1f} MiB",
                     "last": f"{last['gcs_rss'] / 2**20:.1f} MiB", "growth": growth("gcs_rss"),
                     "target": "bounded", "met": f"second half {(last['gcs_rss'] / half['gcs_rss'] - 1) * 100:+.1f}%"})
    body = (f"One CPU worker, tiny models at 32x32: {args.jobs} jobs of {args.shots} shots, {stages} stage attempts on "
            f"the worker in {wall:.0f} s (outcomes {dict(sorted(outcomes.items()))}), the keyframe family "
            "swapped every job, every 10th job cancelled while it runs, every 5th with an injected OOM on a "
            f"video call. Baseline: the sample after job {base['job']} ({base['stages']} stages).\n\n"
            + table(rows) + "\n")
    cap = os.environ.get(TASK_EVENTS_ENV, LOCAL_RAY_ENV[TASK_EVENTS_ENV])
    body += f"\nThe GCS kept at most {cap} task events in this run.\n"
    print(body)
    if not args.no_write:
        extra = f" --task-events {args.task_events}" if args.task_events is not None else ""
        key = "soak" if args.task_events is None else "soak-task-events"
        write_section(key, "Soak: memory, descriptors and threads over hundreds of stages (issue 18)"
                      + ("" if args.task_events is None else f", GCS task events capped at {args.task_events}"),
                      f"python -m bench.soak --jobs {args.jobs} --shots {args.shots}{extra}", body)


if __name__ == "__main__":
    main()
