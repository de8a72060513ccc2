"""API load: submit latency and throughput under concurrent clients, side by side with a bare app.

Three servers on this machine, measured in one run with the same clients and storyboards:
- the farm: its API on Ray Serve as `farm serve` runs it locally, the API replica listening on the
  farm's port itself (tiny models, one CPU worker, the farm held: jobs queue and are admitted, i.e.
  planned, but not rendered), where a submit is auth, parse, validate, limits, the director's submit
  and a SQLite insert;
- the same farm through Serve's proxy (the path on a cluster, and the local farm's before it served
  from its replica), on the proxy's own port;
- the bare app: one uvicorn process with a FastAPI route doing the same auth, parse, validation and
  SQLite insert, and nothing else: the limit of this machine for that work.

Each level opens that many connections at once (asyncio clients: an httpx pool, and `Lean`
connections that cost the machine an eighth of the CPU) and submits as fast as they can. Afterwards
every returned id must be listed by the server exactly once (nothing lost or duplicated).
Targets (issue 18): throughput >= 0.5 of the bare app's, p99 < 250 ms at 32 clients, and at 300
clients a p99 no more than 3x the bare app's.

    python -m bench.api_load [--clients 32 300] [--requests 600] [--repeats 3] [--client httpx lean]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import yaml

from bench.report import table, write_section
from farm.driver import free_port, start_serve
from farm.rayenv import local_ray_options, prepare_local_ray

TOKEN = "bench-token-0123456789abcdefghijklmnop"
REPO = Path(__file__).resolve().parent.parent

# The bare app: what a submit must do at the least, in one process, nothing in between.
BARE_APP = '''
import hmac, uuid
from pathlib import Path
from fastapi import FastAPI, Request, HTTPException
from fastapi.responses import JSONResponse
from farm.manifest import ManifestError, parse_text, validate_data
from farm.store import Store
TOKEN, ROOT, DB = {token!r}, Path({root!r}), {db!r}
store = Store(DB)
app = FastAPI()

@app.post("/v1/jobs", status_code=202)
async def submit(request: Request):
    given = request.headers.get("authorization", "").partition(" ")[2]
    if not hmac.compare_digest(given.encode(), TOKEN.encode()):
        raise HTTPException(401)
    try:
        data = parse_text((await request.body()).decode())
        manifest = validate_data(data, ROOT, confine=True)
    except ManifestError as exc:
        return JSONResponse(status_code=422, content=[{{"loc": list(e.loc), "msg": e.msg}} for e in exc.errors])
    job_id = uuid.uuid4().hex[:12]
    store.add_job(job_id, manifest.title, data, str(ROOT), str(ROOT / job_id))
    return {{"id": job_id, "state": "queued"}}

@app.get("/v1/jobs")
async def jobs():
    return [{{"id": j.id}} for j in store.jobs()]
'''


def manifest(i: int) -> str:
    return yaml.safe_dump({"version": 1, "title": f"load {i}", "seed": i,
                           "models": {"keyframe": "tiny", "video": "tiny"},
                           "output": {"fps": 8, "resolution": "64x64"},
                           "shots": [{"id": "a", "prompt": f"shot {i}", "duration": 1.0},
                                     {"id": "b", "prompt": "next", "duration": 1.0, "continue_from": "previous"}]})


class Lean:
    """One keep-alive HTTP/1.1 connection, requests written and answers read by hand: ~0.5 ms of CPU
    a request where httpx takes ~4 (the 'clients' CPU' column). On a 2-core machine httpx clients take
    a core of their own, and a server's tail latency is mostly their event loop catching up."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.conn
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                         f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/yaml\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            data = await reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            self.close()
            raise
        if headers.get("connection") == "close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


async def load(url: str, clients: int, requests: int, first: int, lean: bool = False) -> dict[str, Any]:
    """`clients` connections submitting `requests` storyboards in all, as fast as they can: one httpx
    client's pool, or with `lean`, a `Lean` connection each."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/yaml"}
    latencies: list[float] = []
    ids: list[str] = []
    errors: list[str] = []
    queue = list(range(first, first + requests))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as pool:
        async def send(own: Lean | None, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
            if own is not None:
                return await own.request(method, path, body)
            response = await pool.request(method, path, content=body)
            return response.status_code, response.content

        async def worker() -> None:
            own = Lean(url) if lean else None
            while queue:
                i = queue.pop()
                t = time.perf_counter()
                try:
                    status, body = await send(own, "POST", "/v1/jobs", manifest(i).encode())
                except (httpx.TransportError, OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                    errors.append(f"{type(exc).__name__} {exc}")  # counted, not retried: a lost submit is a finding
                    continue
                latencies.append(time.perf_counter() - t)
                if status == 202:
                    ids.append(json.loads(body)["id"])
                else:
                    errors.append(f"{status} {body[:200]!r}")
            if own is not None:
                own.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"p50": lat[len(lat) // 2] * 1000, "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            "rps": len(ids) / wall, "ok": len(ids), "errors": errors, "ids": ids}


def tally(url: str, ids: list[str]) -> dict[str, int]:
    """What the server lists of the ids it answered: each must be there exactly once."""
    listed = [j["id"] for j in httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"},
                                         timeout=300).json()]
    wanted = set(ids)
    found = [i for i in listed if i in wanted]
    return {"lost": len(wanted - set(found)), "duplicated": len(found) - len(set(found)) + len(ids) - len(wanted)}


PROXIED = "farm via Serve's proxy"
CLIENTS = {"httpx": False, "lean": True}  # the clients `load` runs: lean or not

# Where a submit's CPU goes: each process of this machine's farm (or the bare app), by what it is.
ROLES = (("ProxyActor", "Serve proxy"), ("ServeReplica", "API replica"), ("Director", "director"),
         ("bare_app", "bare app"))


def cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of this process ("clients") and of every process it started (Ray's daemons
    and actors, the bare app), summed by role."""
    me = psutil.Process()
    out: dict[str, float] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times, cmdline = proc.cpu_times(), " ".join(proc.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        role = "clients" if proc.pid == me.pid else next((r for key, r in ROLES if key in cmdline), "other Ray")
        out[role] = out.get(role, 0.0) + times.user + times.system
    return out


def measured_run(url: str, clients: int, requests: int, first: int, lean: bool) -> dict[str, Any]:
    """`load`, with each role's CPU milliseconds per submit over the run."""
    before = cpu_by_role()
    got = asyncio.run(load(url, clients, requests, first, lean))
    after = cpu_by_role()
    got["cpu_ms"] = {role: (after[role] - before.get(role, 0.0)) * 1000 / max(got["ok"], 1) for role in after}
    got.update(tally(url, got.pop("ids")))  # after the CPU is read: listing every job so far is not a submit's
    return got


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs; the counts of what went wrong summed (one loss is a finding)."""
    def mid(key: str) -> float:
        values = sorted(r[key] for r in runs)
        return values[len(values) // 2]
    roles = sorted({role for r in runs for role in r["cpu_ms"]})
    cpu = {role: sorted(r["cpu_ms"].get(role, 0.0) for r in runs)[len(runs) // 2] for role in roles}
    return {"rps": mid("rps"), "p50": mid("p50"), "p99": mid("p99"), "ok": sum(r["ok"] for r in runs), "cpu_ms": cpu,
            "errors": sum(len(r["errors"]) for r in runs), "lost": sum(r["lost"] for r in runs),
            "duplicated": sum(r["duplicated"] for r in runs)}


def start_bare(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    root = home / "inputs"
    root.mkdir(parents=True, exist_ok=True)
    (home / "bare_app.py").write_text(BARE_APP.format(token=TOKEN, root=str(root), db=str(home / "bare.sqlite")))
    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning", "--backlog", "2048", "--timeout-keep-alive", "120"],
                            cwd=home, env={**os.environ, "PYTHONPATH": f"{home}{os.pathsep}{REPO}"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            httpx.get(f"{url}/v1/jobs", timeout=2)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the bare app did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[32, 300])
    ap.add_argument("--requests", type=int, default=600, help="submissions per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per client count and server, alternated")
    ap.add_argument("--client", choices=sorted(CLIENTS), nargs="+", default=sorted(CLIENTS),
                    help="which clients load the servers (each measures every server)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="farm-api-load-"))
    os.environ["FARM_HOME"] = str(home / "farm")
    import ray
    from ray import serve

    from deployments.app import FarmAPI, Settings

    port = free_port("127.0.0.1")
    prepare_local_ray(api_port=port)  # as `farm serve` starts its Ray: the API replica serves `port` itself
    ray.init(address="local", log_to_driver=False, configure_logging=False, **local_ray_options())
    proxy_port = start_serve("127.0.0.1", port)
    serve.run(FarmAPI.bind(Settings(token=TOKEN, tier="cpu", workers=1, models="tiny", director_name="load",
                                    root=str(home / "inputs"))), name="farm", route_prefix="/")
    director = ray.get_actor("load", namespace="farm")
    ray.get(director.hold.remote(True))  # measure the submit path, not rendering
    bare, bare_url = start_bare(home)
    # The same farm twice: on its own port (its replica, as a local farm serves) and through Serve's proxy
    # (the path of a cluster, and of every local farm before direct ingress): one replica, one director.
    servers = {"farm": f"http://127.0.0.1:{port}", PROXIED: f"http://127.0.0.1:{proxy_port}", "bare": bare_url}
    rows, verdicts, cpu_rows, counter = [], [], [], 0
    cores = os.cpu_count() or 1
    try:
        for url in servers.values():  # warm every path once
            asyncio.run(load(url, 1, 5, 10**6))
        for clients, kind in [(n, k) for n in args.clients for k in args.client]:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
            for _ in range(args.repeats):  # alternated: a shared machine's speed drifts between runs
                for name, url in servers.items():
                    runs[name].append(measured_run(url, clients, args.requests, counter, CLIENTS[kind]))
                    counter += args.requests
                    if runs[name][-1]["errors"]:
                        print(name, clients, kind, runs[name][-1]["errors"][:3])
            measured = {name: median_run(got) for name, got in runs.items()}
            for name, m in measured.items():
                rows.append({"clients": clients, "client": kind, "server": name, "requests": m["ok"],
                             "errors": m["errors"],
                             "lost": m["lost"], "duplicated": m["duplicated"], "p50 ms": f"{m['p50']:.0f}",
                             "p99 ms": f"{m['p99']:.0f}", "req/s": f"{m['rps']:.1f}",
                             "req/s per run": ", ".join(f"{r['rps']:.0f}" for r in runs[name])})
            for name, m in measured.items():
                mine = {role: ms for role, ms in m["cpu_ms"].items() if (role == "bare app") == (name == "bare")
                        and role != "clients" and ms >= 0.05}
                server = sum(mine.values())
                idle = sum(ms for role, ms in m["cpu_ms"].items() if role not in mine and role != "clients")
                clients_ms = m["cpu_ms"].get("clients", 0.0)
                cpu_rows.append({"clients": clients, "client": kind, "server": name,
                                 "server CPU ms": f"{server:.1f}",
                                 "by process (ms)": ", ".join(f"{role} {ms:.1f}" for role, ms in sorted(
                                     mine.items(), key=lambda kv: -kv[1])),
                                 "clients' CPU ms": f"{clients_ms:.1f}",
                                 "the other server, idle (ms)": f"{idle:.1f}",
                                 "CPU-bound req/s": f"{cores * 1000 / (server + idle + clients_ms):.0f}"})
            base = measured["bare"]
            for name in ("farm", PROXIED):
                farm = measured[name]
                ratio = farm["rps"] / base["rps"]
                verdicts.append({"clients": clients, "client": kind, "server": name,
                                 "throughput farm/bare": f"{ratio:.2f}" + (
                                     f" (>= 0.5: {'met' if ratio >= 0.5 else 'missed'})" if name == "farm" else ""),
                                 "p99 farm/bare": f"{farm['p99'] / base['p99']:.2f}" + (
                                     f" (<= 3: {'met' if farm['p99'] <= 3 * base['p99'] else 'missed'})"
                                     if clients >= 300 and name == "farm" else ""),
                                 "p99 farm ms": f"{farm['p99']:.0f}" + (
                                     f" (< 250: {'met' if farm['p99'] < 250 else 'missed'})"
                                     if clients == 32 and name == "farm" else ""),
                                 "nothing lost": "yes" if farm["lost"] == farm["duplicated"] == 0 == farm["errors"]
                                 else "NO"})
    finally:
        bare.kill()
        serve.shutdown()
        ray.shutdown()
    body = ("POST /v1/jobs with a 2-shot YAML storyboard over loopback HTTP, side by side in one run: the farm "
            "as `farm serve` runs it on this machine (its API replica listening on the farm's port itself, "
            "Serve's direct ingress; the director's submit and its SQLite insert; the farm held, so jobs "
            "queue and are admitted, i.e. planned, but not rendered), the same farm through Serve's proxy "
            f"('{PROXIED}': a cluster's path, and a local farm's before direct ingress), and a bare "
            "single-process uvicorn app doing the same auth, parse, validation and insert. Each level opens "
            f"that many connections at once and submits {args.requests} storyboards as fast as they can, "
            f"{args.repeats} runs per server alternated (medians shown; errors, losses and duplicates summed); "
            "every returned id must be listed once. The clients run on the same cores as the servers, two "
            "kinds of them, each loading every server: 'httpx' (an httpx.AsyncClient pool, ~4 ms of CPU a "
            "request: on a 2-core machine it takes a core of its own, and every server's tail latency is "
            "mostly its event loop catching up) and 'lean' (a keep-alive connection each, HTTP written and "
            "read by hand, ~0.5 ms a request: the servers, not the clients, are what is measured, and the "
            "bare app runs as fast as its one core goes).\n\n"
            + table(rows) + "\n\n" + table(verdicts) + "\n\n"
            "Where a submit's CPU goes (milliseconds of CPU per accepted submit, each process by role, the "
            "runs' medians; 'other Ray' is Ray's own daemons and Serve's controller; the farm's processes "
            "idle on while the bare app is measured, holding every job submitted so far). 'CPU-bound req/s' "
            f"is what this machine's {cores} cores serve at most when the work keeps them all busy: "
            f"{cores * 1000} / (all the CPU ms); the bare app is one process, so it also stops at one core "
            "for itself.\n\n"
            + table(cpu_rows) + "\n")
    print(body)
    if not args.no_write:
        command = (f"python -m bench.api_load --clients {' '.join(map(str, args.clients))} --requests {args.requests}"
                   f" --repeats {args.repeats} --client {' '.join(args.client)}")
        write_section("api_load", "API submit under load, farm vs a bare app (issues 4, 18)", command, body)


if __name__ == "__main__":
    main()
