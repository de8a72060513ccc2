"""`farm render`: one storyboard rendered by the farm's director on a local Ray (or the cluster this
process is attached to), with progress bars fed by the director's events. An entry point: it may
import actors and Ray; the core below it may not."""

from __future__ import annotations

import errno
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.config import FarmConfig, current
from farm.contract import ACTIVE_STATES, JobState
from farm.hashing import content_hash
from farm.jobsetup import OUTPUT_SLACK, model_errors, resolve_models
from farm.manifest import FieldError, ManifestError, load
from farm.paths import OutputLayout, output_problem
from farm.pool import PoolConfig, resources_for_local
from farm.progress import ProgressBars
from farm.rayenv import direct_ingress_port, local_ray_options, prepare_local_ray


class RenderError(RuntimeError):
    pass


@dataclass
class RenderResult:
    job_id: str
    layout: OutputLayout
    lock: dict[str, Any]
    ledger: list[dict[str, Any]]
    seconds: float
    startup_seconds: float = 0.0  # Ray start, director, worker actors, model loads
    render_seconds: float = 0.0  # submit to the final film written: the part that scales with shots


def job_key(manifest: dict[str, Any], out_dir: str, options: dict[str, Any]) -> str:
    """Identity of a local render: the same storyboard, output and options is the same job, so a
    `farm render` run again after a crash attaches to the job it started instead of a duplicate."""
    return content_hash({"manifest": manifest, "out": out_dir, "options": options})


def start_ray(pool: PoolConfig, api_port: int | None = None) -> bool:
    """Start a local Ray unless this process is already attached to one (with its API to be served on
    loopback `api_port`, if given). Returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    prepare_local_ray(api_port)
    # address="local": always a fresh local cluster, never someone else's that happens to be running.
    ray.init(address="local", resources=resources_for_local(pool), log_to_driver=False, configure_logging=False,
             **local_ray_options())
    return True


def local_name(pool: PoolConfig) -> str:
    return f"farm-local-{pool.tier}-{pool.workers or 0}"


def local_director(pool: PoolConfig, config: FarmConfig) -> Any:
    """The director for local renders with this pool shape (forced tier and worker count), on this
    config's store and cache: one left in the Ray session by a render with another FARM_CACHE_DIR or
    store is retired (its workers released) and replaced, so nothing is written to the old cache."""
    import ray

    from actors.director import get_director

    name = local_name(pool)
    director = get_director(pool, name=name, config=config)
    wanted = (str(config.store_path), str(config.cache_path))
    if tuple(ray.get(director.paths.remote())) == wanted:
        return director
    if not ray.get(director.retire.remote()):
        raise RenderError(f"a local render on another store or cache ({name}) is still running in this Ray "
                          "session; wait for it, or render with its FARM_HOME and FARM_CACHE_DIR")
    ray.kill(director, no_restart=True)
    for _ in range(50):  # the name is free once the actor is gone
        try:
            ray.get_actor(name, namespace="farm")
        except ValueError:
            break
        time.sleep(0.1)
    return get_director(pool, name=name, config=config)


def serve_api(config: FarmConfig, host: str, port: int, **settings: Any) -> Path | None:
    """The farm's HTTP API and web pages (Ray Serve, on this process's Ray) on host:port; `settings`
    override the config's (deployments.app.Settings). Returns where the generated token is kept (None
    when the config gives one): the farm always has a token."""
    from ray import serve

    from deployments.app import FarmAPI, Settings
    from farm.tokens import ensure_token

    token, where = ensure_token(config)
    api = Settings.from_config(config, token=token, host=host, **settings)  # refuses a weak token off loopback
    start_serve(host, port)
    serve.run(FarmAPI.bind(api), name="farm", route_prefix="/")
    return where


def start_serve(host: str, port: int) -> int:
    """Serve started on this process's Ray for an API on `host:port` (the app is deployed after).
    Returns the port Serve's proxy listens on."""
    from ray import serve

    # Where this farm's Ray has its API replica serve the port itself (farm/rayenv.py), Serve's proxy
    # takes a free port of its own on the same host; otherwise the proxy serves the farm's port (and
    # serve.start says at once when it cannot bind it, where a replica would be retried for a minute).
    direct = direct_ingress_port() == port
    if direct and (problem := port_problem(host, port)):
        raise ValueError(problem)
    attempts = 0
    while True:
        proxy_port = free_port(host) if direct else port
        try:
            serve.start(http_options={"host": host, "port": proxy_port})
            return proxy_port
        except Exception as exc:  # Serve wraps the OSError; its message is all that says what it was
            serve.shutdown()
            attempts += 1
            if "Failed to bind" not in str(exc):
                raise
            # Direct, the free port went to another socket before Serve bound it: take another.
            if not direct or attempts == 5:
                why = port_problem(host, proxy_port) or f"cannot listen on {host}:{proxy_port}: {exc}"
                raise ValueError(why) from None


def port_problem(host: str, port: int) -> str:
    """Why Serve could not listen on `host:port` now (in use, not this machine's address), "" when it
    can. Serve binds without SO_REUSEADDR, so connections an earlier server there left closing (the
    kernel keeps them up to a minute) hold the port as much as a listener does: said as such."""
    try:
        with _bound(host, port):
            return ""
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE and not _listened(host, port):
            why = "connections of an earlier server there are still closing (up to a minute); try again then"
    return f"cannot listen on {host}:{port}: {why}"


def free_port(host: str) -> int:
    """A port on `host` that nothing listens on now (the system's pick)."""
    with _bound(host, 0) as s:
        return int(s.getsockname()[1])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bound(host: str, port: int) -> socket.socket:
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def _listened(host: str, port: int) -> bool:
    """Whether something accepts connections on `host:port` (an any-address host: on loopback)."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    with socket.socket(_family(target), socket.SOCK_STREAM) as s:
        s.settimeout(2)
        return s.connect_ex((target, port)) == 0


def serve_pages(pool: PoolConfig, config: FarmConfig, models: str | None, root: Path, port: int, job_id: str) -> str:
    """The farm's API and web pages over this render's director, on loopback only; prints the page's
    URL and where the token to log in with is (never the token itself)."""
    where = serve_api(config, "127.0.0.1", port, director_name=local_name(pool), tier=pool.tier,
                      workers=pool.workers, models=models, root=str(root))
    url = f"http://127.0.0.1:{port}/ui/jobs/{job_id}"
    print(f"watch it at {url} (log in with the token in {where or 'FARM_API_TOKEN / api.token'})", flush=True)
    return url


def until_ctrl_c() -> None:
    """Block this thread until SIGINT or SIGTERM (both blocked first, so neither kills it meanwhile)."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.sigwait({signal.SIGINT, signal.SIGTERM})


def follow(director: Any, job_id: str, bars: ProgressBars, poll_s: float = 0.2) -> str:
    """Feed the director's events to the progress bars until the job ends; returns its final state."""
    import ray
    from ray.exceptions import ActorUnavailableError

    since = 0
    while True:
        try:
            events, state = ray.get(director.events.remote(job_id, since))
        except ActorUnavailableError:  # the director is restarting; it reloads the job from the store
            time.sleep(0.5)
            since = 0  # a restarted director starts a fresh event list for the job
            continue
        since += len(events)
        for event in events:
            bars(event)
        if JobState(state) not in ACTIVE_STATES:
            return state
        time.sleep(poll_s)


def render(path: Path | str, out_dir: Path | str, *, models: str | None = None, workers: int | None = None,
           tier: str = "auto", progress: bool = True, draft: bool = False, priority: int = 0,
           cache: bool = True, config: FarmConfig | None = None, ui_port: int | None = None,
           until_closed: Callable[[], None] | None = None) -> RenderResult:
    """Render a storyboard on a local Ray. With `ui_port`, the farm's web pages are served on
    127.0.0.1:`ui_port` while it renders, and `until_closed` (when given) holds them up after."""
    import ray

    config = config or current()
    started = time.perf_counter()
    path = Path(path).resolve()
    manifest = load(path)  # refuses bad input before anything starts
    resolve_models(manifest, path.parent, models)
    missing = model_errors(manifest, path.parent, models)  # checked where they will load: here
    if missing:
        raise ManifestError(missing)
    if ui_port is not None and (busy := port_problem("127.0.0.1", ui_port)):
        raise RenderError(f"the web pages: {busy}; pick another --port")
    out = OutputLayout(Path(out_dir).resolve())
    problem = output_problem(out.root, OUTPUT_SLACK)  # the first look, before Ray starts; submit sizes it
    if problem:
        raise ManifestError([FieldError(("output",), problem)])
    pool = PoolConfig(tier=tier, workers=workers)
    we_started = start_ray(pool, api_port=ui_port)
    try:
        director = local_director(pool, config)
        data = manifest.model_dump(mode="json", exclude_unset=True)
        options = {"models": models, "preview": draft, "cache": cache}
        job = ray.get(director.submit.remote(data, str(path.parent), str(out.root), options=options,
                                             priority=priority,
                                             idempotency_key=job_key(data, str(out.root), options)))
        if JobState(job["state"]) not in ACTIVE_STATES:
            # The same render ran to an end before (its outputs may since be gone or edited): run it
            # again; every finished stage comes back from the cache, so a complete one costs seconds.
            job = ray.get(director.requeue.remote(job["id"]))
        ray.get(director.ping.remote())
        if ui_port is not None:
            serve_pages(pool, config, models, path.parent, ui_port, job["id"])
        startup = time.perf_counter() - started
        bars = ProgressBars(progress)
        try:
            state = follow(director, job["id"], bars)
        finally:
            bars.close()
        rendered = time.perf_counter()
        status = ray.get(director.status.remote(job["id"]))
        if ui_port is not None and until_closed is not None:
            until_closed()
    finally:
        if we_started:
            ray.shutdown()
    if state != JobState.SUCCEEDED:
        raise RenderError(f"job {job['id']} {state}: {status['error']}")
    lock = json.loads(out.lockfile.read_text())
    import pyarrow.parquet as pq

    ledger = pq.read_table(out.ledger).to_pylist()
    total = time.perf_counter() - started
    return RenderResult(job["id"], out, lock, ledger, total, startup, rendered - started - startup)
