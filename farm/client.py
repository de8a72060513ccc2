"""A small HTTP client for a running farm (`farm submit/status/cancel/fetch/workers`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from farm.paths import atomic_path

DEFAULT_SERVER = "http://127.0.0.1:8000"


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body
        if status == 422 and isinstance(body, list):
            text = "\n".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in body)
        else:
            text = body.get("detail", body) if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {text}")


class Client:
    def __init__(self, server: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        from farm.config import current
        from farm.tokens import stored_token

        self.server = (server or current().server or DEFAULT_SERVER).rstrip("/")
        token = token or current().api.token or stored_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)
        self.patience_s = 120.0  # how long a call waits out a restarting director

    def _call(self, send: Callable[[], httpx.Response]) -> Any:
        """One request, sent again while the farm says it is briefly away (503, Retry-After) or cannot
        be reached (its director or proxy restarting), for up to `self.patience_s`."""
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                response = send()
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
                continue
            if response.status_code != 503 or time.monotonic() > deadline:
                return self._check(response)
            time.sleep(min(float(response.headers.get("retry-after", "1") or 1), 10.0))

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise ApiError(response.status_code, body)
        return response.json()

    def submit(self, manifest_text: str, *, priority: int = 0, idempotency_key: str | None = None) -> dict[str, Any]:
        # Always a key: a submit sent again after a lost answer must not queue the job twice.
        headers = {"Content-Type": "application/yaml", "Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self._call(lambda: self.http.post("/v1/jobs", content=manifest_text.encode(), headers=headers,
                                                 params={"priority": priority}))

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call(lambda: self.http.get(f"/v1/jobs/{job_id}"))

    def jobs(self) -> list[dict[str, Any]]:
        return self._call(lambda: self.http.get("/v1/jobs"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call(lambda: self.http.delete(f"/v1/jobs/{job_id}"))

    def requeue(self, job_id: str) -> dict[str, Any]:
        return self._call(lambda: self.http.post(f"/v1/jobs/{job_id}/requeue"))

    def set_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        return self._call(lambda: self.http.patch(f"/v1/jobs/{job_id}", json={"priority": priority}))

    def validate(self, manifest_text: str) -> dict[str, Any]:
        """The storyboard checked and planned on the farm's workers, not submitted."""
        return self._call(lambda: self.http.post("/v1/validate", content=manifest_text.encode(),
                                          headers={"Content-Type": "application/yaml"}))

    def workers(self) -> list[dict[str, Any]]:
        return self._call(lambda: self.http.get("/v1/workers"))

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Server-sent events until the job ends. A stream that breaks before `job_finished` (the
        director or the proxy restarting) is opened again with Last-Event-ID, for up to
        `self.patience_s` of trying."""
        last: str | None = None
        deadline = time.monotonic() + self.patience_s
        while True:
            headers = {"Last-Event-ID": last} if last is not None else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None, headers=headers) as response:
                    if response.status_code >= 400 and response.status_code != 503:
                        response.read()
                        self._check(response)
                    if response.status_code == 200:
                        deadline = time.monotonic() + self.patience_s
                        for line in response.iter_lines():
                            if line.startswith("id: "):
                                last = line[4:].strip()
                            elif line.startswith("data: "):
                                event = json.loads(line[6:])
                                yield event
                                if event.get("type") == "job_finished":
                                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ApiError(503, {"detail": f"lost the event stream of job {job_id}"})
            time.sleep(1.0)

    def fetch(self, job_id: str, dest: Path) -> Path:
        with self.http.stream("GET", f"/v1/jobs/{job_id}/output", timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        return dest
