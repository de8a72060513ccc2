"""API load: submit latency (p50/p99) and throughput for concurrent clients, over real HTTP.

Starts Ray Serve on this machine with the farm API (tiny models, one CPU worker), then N clients
each POST storyboards as fast as they can. Submitted jobs are cancelled afterwards; what is measured
is the API path (auth, parse, validate, limits, director submit, SQLite insert), not rendering.

    python -m bench.api_load [--clients 1 8 32] [--requests 200]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import socket
import tempfile
import time

import httpx
import yaml

from bench.report import table, write_section
from farm.rayenv import local_ray_options, prepare_local_ray

TOKEN = "bench-token"


def manifest(i: int) -> str:
    return yaml.safe_dump({"version": 1, "title": f"load {i}", "seed": i,
                           "models": {"keyframe": "tiny", "video": "tiny"},
                           "output": {"fps": 8, "resolution": "64x64"},
                           "shots": [{"id": "a", "prompt": f"shot {i}", "duration": 1.0},
                                     {"id": "b", "prompt": "next", "duration": 1.0, "continue_from": "previous"}]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=200, help="submissions per client count")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import os

    os.environ["FARM_HOME"] = tempfile.mkdtemp(prefix="farm-api-load-")
    import ray
    from ray import serve

    from deployments.app import FarmAPI, Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prepare_local_ray()
    ray.init(address="local", log_to_driver=False, configure_logging=False, **local_ray_options())
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(FarmAPI.bind(Settings(token=TOKEN, tier="cpu", workers=1, models="tiny", director_name="load")),
              name="farm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}",
                                                 "Content-Type": "application/yaml"}, timeout=60,
                          limits=httpx.Limits(max_connections=128))
    client.post("/v1/jobs", content=manifest(-1))  # warm the path once
    rows, counter = [], 0
    for clients in args.clients:
        def one(i: int) -> tuple[str, float]:
            t = time.perf_counter()
            response = client.post("/v1/jobs", content=manifest(i))
            assert response.status_code == 202, response.text
            return response.json()["id"], time.perf_counter() - t

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(counter, counter + args.requests)))
        wall = time.perf_counter() - t0
        ids, latencies = [r[0] for r in results], [r[1] for r in results]
        counter += args.requests
        assert len(set(ids)) == len(ids)
        lat = sorted(latencies)
        rows.append({"clients": clients, "requests": len(ids),
                     "p50 ms": f"{lat[len(lat) // 2] * 1000:.1f}",
                     "p99 ms": f"{lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000:.1f}",
                     "throughput req/s": f"{len(ids) / wall:.1f}"})
        for job_id in ids:
            client.delete(f"/v1/jobs/{job_id}")
    serve.shutdown()
    ray.shutdown()
    body = ("POST /v1/jobs with a 2-shot YAML storyboard over loopback HTTP to Ray Serve (1 replica) and the "
            "director (SQLite insert); each client count submits its requests as fast as it can.\n\n"
            + table(rows) + "\n")
    print(body)
    if not args.no_write:
        command = f"python -m bench.api_load --clients {' '.join(map(str, args.clients))} --requests {args.requests}"
        write_section("api_load", "API submit latency and throughput (issue 4)", command, body)


if __name__ == "__main__":
    main()
