"""How the farm starts and runs inside Ray: the environment a local Ray gets, and the priority a
worker process takes back.

Why the niceness: Ray starts every worker process at `nice 15` (its `worker_niceness`), so that its
own daemons stay responsive. A stage's pipeline call then loses the core to every nice-0 process that
wakes (raylet, GCS, the driver), and with OpenMP each lost slice stalls the call's other threads at
the next barrier too: `bench/overhead.py` measured pipeline calls 1.14x slower in the worker than in
a bare loop, and parity once the worker ran at nice 0 (BENCHMARKS.md, "Farm overhead").
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

# What every Ray the farm starts itself gets (a cluster's `ray start` lines in cluster.yaml set the same):
# no usage reports leave the machine, and workers run at the same priority as everything else.
TASK_EVENTS_ENV = "RAY_task_events_max_num_task_in_gcs"  # the GCS's cap on kept task events

LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_worker_niceness": "0",
    # Ray's single-machine mode (its default on macOS and Windows): the node's address is 127.0.0.1,
    # so the GCS, raylet, agents and workers listen on loopback only, and Ray does not open a socket
    # towards 8.8.8.8 to find an address of its own. (ray.init's _node_ip_address="127.0.0.1" is
    # turned back into the machine's address by Ray.)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray's dashboard process still runs its usage-stats module, which probes the cloud-metadata
    # address (169.254.169.254, metadata.google.internal) to name the cloud, and would send its report
    # to usage-stats.ray.io. There is no switch for the probe: plain-http requests from the local
    # farm's processes go to a closed loopback port instead (refused at once, no DNS lookup), and the
    # report URL is that port too. Loopback is exempt; https (opted-in model downloads) is untouched;
    # a proxy the user set wins; the farm's webhooks do not read these variables.
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "http_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "no_proxy": "localhost,127.0.0.1,::1",
    "NO_PROXY": "localhost,127.0.0.1,::1",
    # Every actor call is a task whose events the GCS keeps, the last 100,000 by default: a farm that
    # follows jobs (status and event polls several times a second) grows gcs_server steadily for
    # days until that cap (measured ~7 MiB per 1,000 stages). A tenth of it bounds the growth; the
    # farm's own pages and ledger are where its history lives.
    TASK_EVENTS_ENV: "10000",
}

# Arrow's buffers from glibc's allocator, not its default mimalloc, in every farm process: mimalloc
# keeps a heap per thread and what it freed there, and the director writes a parquet ledger per job
# from whichever of its threads finished it (a cancel comes in on any of its 16): bench/soak.py saw it
# grow 2 MiB per cancelled job. Arrow reads this once, when it first allocates, so it is set before
# the process starts (pyarrow's set_memory_pool does not reach the parquet writer's own buffers).
ARROW_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system"}
LOCAL_RAY_ENV.update(ARROW_ENV)

# Serve's request path in one event loop per process (two of the switches its throughput-optimised
# mode sets): by default a replica runs the app's handlers on a second loop in a thread of its own, and
# the proxy its router on another, so every request crosses loops (and the GIL) twice more. The farm's
# handlers never block their loop (parsing runs in a worker thread), so the extra loop buys nothing;
# bench/api_load.py measured the replica and proxy ~2.8 ms of CPU per submit cheaper with both off.
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
LOCAL_RAY_ENV.update(SERVE_ENV)

# A local farm's API served by its replica itself (Serve's direct ingress): uvicorn in the API replica
# listens on the farm's port, so a request reaches the app without Serve's proxy actor in between. Behind
# the proxy each submit cost ~3.5 ms of proxy CPU plus ~2 ms more in the replica (fetching the body back
# from the proxy, the router): bench/api_load.py measures both paths side by side against a bare app
# (BENCHMARKS.md; docs/cluster.md has the figures). Serve takes the replica's port
# from a range, set here to the one port; a restarted replica takes it back at once (no quarantine, which
# only guards an HAProxy in front) and a stopping one does not hold it for a load balancer to notice (no
# minimum drain). Serve's proxy still runs, on an internal loopback port of its own (farm.driver.serve_api).
# Only for a loopback farm: the replica binds the host the proxy binds, and a farm on another interface
# would show that extra port there too; a cluster keeps its proxy (one per node, behind an ingress).
DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
_DIRECT_PORTS = ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT")


def direct_ingress_env(port: int) -> dict[str, str]:
    """The environment a local Ray needs for its API replica to serve `port` itself."""
    low, high = _DIRECT_PORTS  # Serve hands out range(low, high)
    return {DIRECT_INGRESS: "1", low: str(port), high: str(port + 1),
            "RAY_SERVE_PORT_QUARANTINE_S": "0", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def direct_ingress_port() -> int | None:
    """The port the API replica of this process's local Ray serves itself (`prepare_local_ray(api_port=)`),
    or None where Serve's proxy serves the API."""
    low, high = (os.environ.get(name) for name in _DIRECT_PORTS)
    if os.environ.get(DIRECT_INGRESS) != "1" or low is None or high != str(int(low) + 1):
        return None
    return int(low)


# A cluster's nodes are started by `ray start` (cluster.yaml), on their private addresses, with Ray's
# token auth; none of the above applies to them but the niceness and, on the head, SERVE_ENV and ARROW_ENV.


def local_ray_options() -> dict[str, Any]:
    """ray.init(address="local", ...) options every local Ray the farm starts gets (with the
    environment of `prepare_local_ray`, which puts its node on loopback)."""
    return {"include_dashboard": False}


# The niceness a stage worker asks for: the same as a process started from a shell.
WORKER_NICENESS = 0


def prepare_local_ray(api_port: int | None = None) -> None:
    """Set the environment a Ray started from this process passes to its daemons and workers; what
    the user set already wins, but for `api_port`: the loopback port this farm's API will be served on,
    by its replica directly (`direct_ingress_env`; None: by Serve's proxy)."""
    proxied = any(os.environ.get(v) for v in ("http_proxy", "HTTP_PROXY"))
    for name, value in LOCAL_RAY_ENV.items():
        if not (proxied and "proxy" in name.lower()):  # the user's own proxy settings stay as they are
            os.environ.setdefault(name, value)
    # The API's port is this Ray's, not one inherited from the process that started this one.
    for name in direct_ingress_env(0):
        os.environ.pop(name, None)
    if api_port is not None:
        os.environ.update(direct_ingress_env(api_port))
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        # Ray imported before this call read the variable then; its address lookup reads the constant
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def take_back_priority(target: int = WORKER_NICENESS) -> int:
    """Lower this process's niceness to `target` where Ray started it higher (a cluster started
    without RAY_worker_niceness=0). Lowering niceness needs CAP_SYS_NICE or RLIMIT_NICE: without
    them the process keeps what it has. Returns the niceness it runs at, for the worker's info."""
    now = os.getpriority(os.PRIO_PROCESS, 0)
    if now > target:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, target)
    return os.getpriority(os.PRIO_PROCESS, 0)
