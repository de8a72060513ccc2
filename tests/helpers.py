"""Small builders for test manifests."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


# Debian's chromium, headless, reaching out to nothing (no background networking, updates or sync).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def base_manifest(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "title": "test",
        "seed": 7,
        "models": {"keyframe": "tiny", "video": "tiny"},
        "output": {"fps": 8, "resolution": "64x64", "preset": "ultrafast"},
        "steps": {"keyframe": 2, "video": 2},
        "shots": [
            {"id": "a", "prompt": "misty valley at dawn", "duration": 1.0},
            {"id": "b", "prompt": "a river in the valley", "duration": 0.5},
        ],
    }
    data.update(over)
    return data


def write_manifest(folder: Path, data: dict[str, Any], name: str = "story.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_png(path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 120, 40)) -> Path:
    import PIL.Image

    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, color).save(path)
    return path


def quiet_port() -> int:
    """A free loopback port below the ephemeral range, so no client socket takes it meanwhile."""
    import random

    from farm.driver import port_problem

    for port in random.sample(range(20000, 30000), 200):
        if not port_problem("127.0.0.1", port):
            return port
    raise RuntimeError("no free loopback port in 20000-29999")


def port_free_again(port: int, timeout: float = 120.0) -> None:
    """Wait until Serve could bind `port` again: connections an earlier server there closed first
    (uvicorn on shutdown, a 413) keep it from a bind without SO_REUSEADDR for up to a minute."""
    from farm.driver import port_problem

    deadline = time.monotonic() + timeout
    while problem := port_problem("127.0.0.1", port):
        assert time.monotonic() < deadline, problem
        time.sleep(0.5)


@contextlib.contextmanager
def running_api(token: str, root: Path, **settings: Any) -> Iterator[tuple[str, Any]]:
    """The farm's API on Ray Serve (the session's Ray) on a loopback port, with these Settings and a
    64 KiB body limit and 20 shots per job: (its URL, an httpx client that sends the token)."""
    import httpx
    from ray import serve

    from deployments.app import FarmAPI, Limits, Settings
    from farm.driver import start_serve
    from farm.rayenv import direct_ingress_port

    port = direct_ingress_port()  # the session's API port, served by the replica (tests/conftest.py)
    assert port is not None
    port_free_again(port)
    start_serve("127.0.0.1", port)  # Serve's proxy on a port of its own, as `farm serve` starts it
    api = Settings(token=token, root=str(root), limits=Limits(max_body_bytes=64 * 1024, max_shots=20), tier="cpu",
                   models="tiny", **settings)
    serve.run(FarmAPI.bind(api), name="farm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    try:
        yield url, client
    finally:
        client.close()
        serve.shutdown()


class Receiver:
    """A loopback HTTP receiver (a webhook's) keeping what reaches it: `hits` the paths, `posts`
    (headers, body) each; `status`/`location` shape its answer."""

    def __init__(self, status: int = 204, location: str | None = None) -> None:
        self.hits: list[str] = []
        self.posts: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.hits.append(self.path)
                outer.posts.append((dict(self.headers), body))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int = 1, timeout: float = 20) -> list[tuple[dict[str, str], bytes]]:
        """The posts once there are `count` of them (fewer after `timeout`)."""
        deadline = time.time() + timeout
        while len(self.posts) < count and time.time() < deadline:
            time.sleep(0.05)
        return self.posts

    def close(self) -> None:
        self.server.shutdown()


def tree_sockets(root: Any, kind: str = "inet") -> Iterator[tuple[Any, str, Any]]:
    """(process, its name, connection) for every socket of `root` (a psutil.Process) and every process
    under it; a process that went away meanwhile is skipped."""
    import psutil

    for proc in [root, *root.children(recursive=True)]:
        try:
            conns, name = proc.net_connections(kind=kind), proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in conns:
            yield proc, name, conn
