"""The farm's HTTP API: a Ray Serve application with a FastAPI ingress in front of the director.

Routes and shapes follow the HTTP API contract (README, docs/architecture.md); the OpenAPI document at /openapi.json is
generated from this file. Request checks (auth, size, limits, paths) happen here, before anything
reaches the director; the director validates again, so no client can skip a rule.
"""

# No `from __future__ import annotations` here: FastAPI reads these annotations at runtime, and Serve's
# ingress wrapper loses the module globals it would need to resolve string annotations.
import asyncio
import hmac
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from jinja2 import Environment, FileSystemLoader, select_autoescape
from ray import serve
from ray.exceptions import RayActorError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from farm import __version__
from farm.coalesce import Coalescer
from farm.config import FarmConfig, current
from farm.contract import ACTIVE_STATES, JobState, Submission
from farm.egress import LOOPBACK_NAMES, is_loopback
from farm.manifest import SHOT_ID, FieldError, Manifest, ManifestError, parse_text, validate_data
from farm.paths import OutputLayout
from farm.schemas import FieldProblem, Health, JobStatus, Preflight, PriorityChange, Problem, WorkerInfo
from farm.store import IdempotencyConflict
from farm.tokens import token_problem


@dataclass(frozen=True)
class Limits:
    """Per-job limits: a shared farm refuses work no single job should be allowed to take."""

    max_body_bytes: int = 1 << 20
    max_shots: int = 500
    max_frames: int = 36_000  # 40 minutes at 15 fps
    max_side: int = 2048
    max_steps: int = 150


@dataclass(frozen=True)
class Settings:
    token: str | None = None
    host: str = "127.0.0.1"  # the address the API is bound to: which Host headers it answers
    allowed_hosts: tuple[str, ...] = ()  # more Host names (an ingress, a KubeRay service)
    metrics_open: bool | None = None  # /metrics without the token; None: only when bound to loopback
    root: str = field(default_factory=lambda: str(current().inputs_root))  # where manifest paths may point
    limits: Limits = Limits()
    director_name: str = "farm-director"
    tier: str = "auto"
    workers: int | None = None
    models: str | None = None  # "tiny": every job renders with tiny models (demo and tests)
    config: FarmConfig | None = None

    @classmethod
    def from_config(cls, config: FarmConfig | None = None, **over: Any) -> "Settings":
        """The API's settings from the farm config (file and FARM_* variables); `over` wins."""
        from farm.tokens import ensure_token

        config = config or current()
        token: str = over.pop("token", None) or ensure_token(config)[0]  # a farm always has a token
        base: dict[str, Any] = {"token": token, "limits": Limits(max_body_bytes=config.api.max_body_bytes),
                "root": str(config.inputs_root), "config": config,
                "allowed_hosts": tuple(config.api.allowed_hosts), "metrics_open": config.api.metrics_open}
        settings = cls(**(base | over))
        problem = token_problem(token, settings.host)
        if problem:
            raise ValueError(problem)
        return settings

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def host_allowed(self, header: str) -> bool:
        """Whether a request's Host is one this farm answers to: a browser page from elsewhere whose
        name resolves to this address (DNS rebinding) sends its own name, and is refused. Bound to every
        interface without a list, any name is answered (the token guards it)."""
        name = host_name(header)
        if self.host in ("0.0.0.0", "::", "") and not self.allowed_hosts:
            return True
        allowed = {self.host.lower().strip("[]"), *LOOPBACK_NAMES} | {h.lower() for h in self.allowed_hosts}
        return name in allowed


def host_name(header: str) -> str:
    """The name in a Host (or Origin netloc) header, without its port: `[::1]:8000` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def limit_errors(manifest: Manifest, limits: Limits) -> list[FieldError]:
    from farm.plan import output_fps, shot_frames

    errors = []
    if len(manifest.shots) > limits.max_shots:
        errors.append(FieldError(("shots",), f"at most {limits.max_shots} shots per job"))
    fps = output_fps(manifest)
    frames = sum(shot_frames(s.duration, fps) for s in manifest.shots)
    if frames > limits.max_frames:
        errors.append(FieldError(("shots",), f"{frames} frames in all; at most {limits.max_frames} per job"))
    for name in ("resolution", "final_resolution"):
        size = getattr(manifest.output, "size" if name == "resolution" else "final_size")
        if size and max(size) > limits.max_side:
            errors.append(FieldError(("output", name), f"sides of at most {limits.max_side} px"))
    for role in ("keyframe", "video"):
        if (getattr(manifest.steps, role) or 0) > limits.max_steps:
            errors.append(FieldError(("steps", role), f"at most {limits.max_steps} steps"))
    for i, shot in enumerate(manifest.shots):
        for role in ("keyframe", "video"):
            if shot.steps and (getattr(shot.steps, role) or 0) > limits.max_steps:
                errors.append(FieldError(("shots", i, "steps", role), f"at most {limits.max_steps} steps"))
    return errors


def model_path_errors(manifest: Manifest, root: Path, override: str | None) -> list[FieldError]:
    """Local model folders/files named over HTTP must sit inside the allowed root too."""
    from farm.jobsetup import resolve_models
    from farm.models import ModelError

    try:
        specs = resolve_models(manifest, root, override)
    except ModelError as exc:
        return [FieldError(("models",), str(exc))]
    errors = []
    for role, spec in specs.items():
        if spec.kind in ("dir", "file"):
            location = Path(spec.location).resolve()
            if location != root.resolve() and root.resolve() not in location.parents:
                errors.append(FieldError(("models", role), "local model paths must be inside the farm's input root"))
    return errors


Responses = dict[int | str, dict[str, Any]]
UNPROCESSABLE: Responses = {422: {"model": list[FieldProblem],
                                   "description": "invalid manifest: one entry per problem"}}
UNAUTHORIZED: Responses = {401: {"model": Problem, "description": "missing or wrong bearer token"}}
NOT_FOUND: Responses = {404: {"model": Problem, "description": "no such job"}}


def unprocessable(errors: list[FieldError]) -> JSONResponse:
    return JSONResponse(status_code=422, content=[{"loc": list(e.loc), "msg": e.msg} for e in errors])


# /docs and /redoc would load their JavaScript from a CDN (nothing is fetched from the internet at run
# time): off. The OpenAPI document stays at /openapi.json.
app = FastAPI(title="farm", version=__version__, docs_url=None, redoc_url=None,
              description="Submit storyboards to a Ray render farm for AI video and follow them to a film.")


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def cross_origin(request: Request) -> bool:
    """Whether a browser sent this request from another site's page: its Origin is not this Host
    (or is `null`), or the browser says so (Sec-Fetch-Site). Scripts and the CLI send neither."""
    origin = request.headers.get("origin")
    if origin is not None:
        if origin == "null":
            return True
        return origin.split("://", 1)[-1].rstrip("/").lower() != request.headers.get("host", "").lower()
    return request.headers.get("sec-fetch-site", "") == "cross-site"


class Guard:
    """Before any route: the Host must be one of this farm's names, and a state change must not come
    from another site's page (docs/security.md). `OPTIONS` and a 405 name every method of the path.
    Plain ASGI: Starlette's BaseHTTPMiddleware runs each request through extra tasks and streams,
    which a profile of submits under load showed as a large share of the replica's time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        settings = getattr(scope["app"].state, "settings", None)
        refusal: Response | None = None
        if settings is not None and request.url.path != "/healthz":
            if not settings.host_allowed(request.headers.get("host", "")):
                refusal = JSONResponse(status_code=400, content={"detail": "unknown Host: add it to api.allowed_hosts"})
            elif request.method not in SAFE_METHODS and cross_origin(request):
                refusal = JSONResponse(status_code=403,
                                       content={"detail": "cross-origin requests may not change state"})
        if refusal is None and request.method == "OPTIONS":
            allowed = allowed_methods(request)
            if allowed:
                refusal = Response(status_code=204, headers={"Allow": ", ".join(allowed)})
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def send_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                # Starlette names only the first route of the path's
                MutableHeaders(scope=message)["Allow"] = ", ".join(allowed_methods(request))
            await send(message)

        await self.app(scope, receive, send_allow)


app.add_middleware(Guard)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers at this path (each method of a path is its own route; Serve
    keeps the ingress class's routes in an included router, which does not prefix them)."""
    from starlette.routing import Match

    methods: set[str] = set()
    routes = list(request.app.routes)
    while routes:
        route = routes.pop()
        nested = getattr(route, "routes", None) or getattr(getattr(route, "original_router", None), "routes", None)
        if nested:  # a mount, or FastAPI's _IncludedRouter (its routes are the original router's)
            routes.extend(nested)
        elif getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= set(route.methods)  # PARTIAL: the path matched, not the method
    return sorted(methods | {"OPTIONS"}) if methods else []


@app.exception_handler(RayActorError)
async def _director_away(request: Request, exc: RayActorError) -> JSONResponse:
    # The director died and Ray is restarting it (it reloads its jobs from SQLite): a pause, not a fault.
    return JSONResponse(status_code=503, content={"detail": "the farm's director is restarting; try again"},
                        headers={"Retry-After": "1"})


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    # One error shape for the whole API: [{"loc": [...], "msg": ...}].
    return JSONResponse(status_code=422, content=[{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()])


SESSION_COOKIE = "farm_session"


def derived(token: str, purpose: str) -> str:
    """A value derived from the token (the pages' session cookie, their CSRF header): never the token
    itself, and changing the token revokes every session."""
    return hmac.new(token.encode(), purpose.encode(), "sha256").hexdigest()


async def bearer(request: Request, authorization: str | None = Header(default=None)) -> None:
    """The token as a bearer header (CLI, scripts), or the pages' session cookie; a state-changing
    request on the cookie must carry the page's CSRF value too (SameSite=Strict already keeps other
    sites' forms out)."""
    token = request.app.state.settings.token
    if token is None:
        return  # only a Settings built by hand (no config) has none: every entry point makes one
    scheme, _, value = (authorization or "").strip().partition(" ")
    given = value.strip() if scheme.lower() == "bearer" else ""  # the scheme is case-insensitive (RFC 7235)
    if hmac.compare_digest(given.encode(), token.encode()):  # constant time: no token guessing by timing
        return
    csrf = session_csrf(request)
    if csrf is not None:
        sent = request.headers.get("x-farm-csrf", "")
        if request.method in ("GET", "HEAD") or hmac.compare_digest(sent.encode(), csrf.encode()):
            return
        raise HTTPException(status_code=403, detail="missing or wrong X-Farm-CSRF header")
    raise HTTPException(status_code=401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


# GET /v1/jobs/{id}/<name>: name -> (OutputLayout attribute, media type)
FILE_RESPONSES: Responses = {200: {"content": {"application/octet-stream": {}}}, **UNAUTHORIZED, **NOT_FOUND}
JOB_FILES = {
    "lockfile": ("lockfile", "application/json"),
    "ledger": ("ledger", "application/vnd.apache.parquet"),
    "report": ("report", "text/html"),
    "contact_sheet": ("contact_sheet", "image/png"),
    "timeline": ("timeline", "application/json"),
}


UI = Path(__file__).resolve().parent
PAGES = Environment(loader=FileSystemLoader(UI / "templates"), autoescape=select_autoescape(["html"]))
UI_ASSETS = {"farm.js": "text/javascript", "farm.css": "text/css"}


def page(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(PAGES.get_template(name).render(**context), status_code=status_code,
                        headers={"Cache-Control": "no-store"})


def session_csrf(request: Request) -> str | None:
    """The page's CSRF value when the request carries a valid session cookie, else None."""
    token = request.app.state.settings.token
    if token is None:
        return "open"
    cookie = request.cookies.get(SESSION_COOKIE, "")
    if cookie and hmac.compare_digest(cookie.encode(), derived(token, "session").encode()):
        return derived(token, "csrf")
    return None


def contract() -> dict[str, Any]:
    """The OpenAPI document as the handlers really behave, for clients and fuzzers: the storyboard
    as the request body (JSON or YAML, the manifest's own JSON Schema), the token as an HTTP bearer
    security scheme instead of a header parameter, and every 422 as the bare list of {loc, msg} the
    handlers return (FastAPI would declare its own {"detail": [...]} shape)."""
    from fastapi.openapi.utils import get_openapi

    global _CONTRACT
    if _CONTRACT is not None:
        return _CONTRACT
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    manifest = Manifest.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, schema in manifest.pop("$defs", {}).items():
        schemas.setdefault(name, schema)
    schemas["Manifest"] = manifest
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                       "description": "the farm's API token"}}
    problems = {"type": "array", "items": {"$ref": "#/components/schemas/FieldProblem"}}
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    body = {"required": True, "description": "a storyboard manifest (farm schema)",
            "content": {kind: {"schema": {"$ref": "#/components/schemas/Manifest"}}
                        for kind in ("application/json", "application/yaml")}}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            op["parameters"] = [p for p in op.get("parameters", []) if p.get("name", "").lower() != "authorization"]
            if not op["parameters"]:
                del op["parameters"]
            if path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
            elif path == "/metrics":  # open on a loopback bind (or api.metrics_open), else the token
                op["security"] = [{}, {"bearer": []}]
            if method == "post" and path in ("/v1/jobs", "/v1/validate", "/v1/simulate"):
                op["requestBody"] = body
            responses = op.setdefault("responses", {})
            for code, why, applies in [
                    ("400", "a Host this farm does not answer to, or a body that is not UTF-8", path != "/healthz"),
                    ("401", "missing or wrong bearer token", path.startswith("/v1/") or path == "/metrics"),
                    ("403", "a state change sent from another site's page", method not in ("get", "head")),
                    ("404", "no such job", "{job_id}" in path),
                    ("413", "body too large", "requestBody" in op),
                    ("503", "the director is restarting (Retry-After)", path != "/healthz")]:
                entry = responses.setdefault(code, {"description": why}) if applies else responses.get(code)
                if entry is not None and "content" not in entry:
                    entry["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
            if "422" in responses or "requestBody" in op or op.get("parameters"):
                op.setdefault("responses", {})["422"] = {
                    "description": "invalid input: one entry per problem, at its field path",
                    "content": {"application/json": {"schema": problems}}}
    # Links from a created job to every route of that job, for clients and a fuzzer's stateful phase.
    created = doc["paths"]["/v1/jobs"]["post"]["responses"]["202"]
    created["links"] = {
        op["operationId"]: {"operationId": op["operationId"], "parameters": {"job_id": "$response.body#/id"},
                            "description": f"{method.upper()} {path} of the created job"}
        for path, operations in doc["paths"].items() if path.startswith("/v1/jobs/{job_id}") and "{shot_id}" not in path
        for method, op in operations.items()}
    # A file route's 200 is that file's own media type only (FastAPI adds application/json to each).
    files = {f"/v1/jobs/{{job_id}}/{name}": media for name, (_, media) in JOB_FILES.items()}
    files |= {"/v1/jobs/{job_id}/shots/{shot_id}/keyframe": "image/png",
              "/v1/jobs/{job_id}/shots/{shot_id}/clip": "video/mp4", "/v1/jobs/{job_id}/output": "video/mp4"}
    for path, media in files.items():
        schema = {"type": "object"} if media == "application/json" else {"type": "string", "format": "binary"}
        doc["paths"][path]["get"]["responses"]["200"] = {"description": "the file",
                                                          "content": {media: {"schema": schema}}}
    for kind in ("keyframe", "clip"):  # a shot's files: the created job's first shot
        op = doc["paths"][f"/v1/jobs/{{job_id}}/shots/{{shot_id}}/{kind}"]["get"]
        created["links"][op["operationId"]] = {
            "operationId": op["operationId"], "description": f"the first shot's {kind}",
            "parameters": {"job_id": "$response.body#/id", "shot_id": "$response.body#/shots/0/id"}}
    _CONTRACT = app.openapi_schema = doc
    return doc


# Before @serve.ingress below: it freezes a copy of the app, and the document is built from the routes
# when first asked for.
_CONTRACT: dict[str, Any] | None = None
app.openapi = contract  # type: ignore[method-assign]


@serve.ingress(app)
class FarmIngress:
    def __init__(self, settings: Settings | None = None) -> None:
        from actors.director import get_director
        from farm.pool import PoolConfig

        self.settings = settings or Settings.from_config()
        app.state.settings = self.settings
        Path(self.settings.root).mkdir(parents=True, exist_ok=True)
        self.director = get_director(PoolConfig(self.settings.tier, self.settings.workers),
                                     name=self.settings.director_name, config=self.settings.config)
        # One director call out at a time, and one thread parsing storyboards: measured at 32 clients
        # (docs/cluster.md, "How many submits the API takes"), more of either only made more threads queue
        # for each process's GIL (a submit spent ~12 ms waiting for 0.4 ms of parsing, ~30 ms for the
        # director's answer), and throughput fell by about a seventh. What arrives during a call goes in
        # the next.
        self._submits: Coalescer[Submission, dict[str, Any] | Exception] = Coalescer(
            self._submit_many, max_batch=64, in_flight=1)
        self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")

    async def _submit_many(self, submissions: list[Submission]) -> list[dict[str, Any] | Exception]:
        return list(await self.director.submit_many.remote(submissions))

    async def _status(self, job_id: str) -> dict[str, Any]:
        try:
            return await self.director.status.remote(job_id)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no job {job_id}") from None

    async def _body(self, request: Request) -> str:
        """The request body as text, refused with 413 over the size limit (declared or read)."""
        limit = self.settings.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(status_code=413, detail=f"body over {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a chunked body declares no length
            size += len(chunk)
            if size > limit:
                raise HTTPException(status_code=413, detail=f"body over {limit} bytes")
            chunks.append(chunk)
        try:
            return b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HTTPException(status_code=400, detail=f"the body is not UTF-8 text (byte {exc.start})") from None

    def _check(self, text: str) -> tuple[Any, Manifest, list[FieldError]]:
        """Parse and validate a submitted storyboard under the API's rules (model paths confined to the
        input root, the per-job limits). Raises ManifestError; returns (data, manifest, further errors):
        the director plans from this manifest, validating nothing again."""
        root = Path(self.settings.root)
        data = parse_text(text)
        manifest = validate_data(data, root, confine=True)
        return data, manifest, limit_errors(manifest, self.settings.limits) + model_path_errors(
            manifest, root, self.settings.models)

    async def _queue(self, submission: Submission) -> dict[str, Any]:
        """Queue one storyboard with whatever else is being queued now (farm.coalesce: one director
        call and one store commit for the submits that arrive together); raises what the director
        refused it with."""
        got = await self._submits(submission)
        if isinstance(got, Exception):
            raise got
        return got

    async def _out_file(self, job_id: str, path: Path, media_type: str) -> FileResponse:
        if not path.is_file():
            raise HTTPException(status_code=404, detail=f"job {job_id} has no {path.name} (yet)")
        return FileResponse(path, media_type=media_type, filename=path.name)

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health(status="ok", version=__version__)

    @app.post("/v1/jobs", status_code=202, dependencies=[Depends(bearer)], response_model=JobStatus,
              responses={413: {"model": Problem, "description": "body too large"}, **UNPROCESSABLE, **UNAUTHORIZED,
                         409: {"model": Problem, "description": "Idempotency-Key reused with another request"}})
    async def submit(self, request: Request, priority: int = Query(0, ge=-100, le=100),
                     idempotency_key: str | None = Header(default=None, max_length=200)) -> Any:
        """Queue a storyboard: the manifest as JSON or YAML in the body."""
        root = Path(self.settings.root)
        text = await self._body(request)
        try:  # parsing and validation run off the event loop: other requests go on meanwhile
            data, manifest, errors = await asyncio.get_running_loop().run_in_executor(self._parser, self._check, text)
        except ManifestError as exc:
            return unprocessable(exc.errors)
        if errors:
            return unprocessable(errors)
        try:
            job = await self._queue(Submission(data, str(root), options={"models": self.settings.models},
                                               priority=priority, idempotency_key=idempotency_key,
                                               validated=manifest))
        except ManifestError as exc:
            return unprocessable(exc.errors)
        except IdempotencyConflict as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        return JSONResponse(status_code=202, content=job)

    @app.get("/v1/jobs", dependencies=[Depends(bearer)], response_model=list[JobStatus], responses=UNAUTHORIZED)
    async def list_jobs(self) -> list[dict[str, Any]]:
        return await self.director.list_jobs.remote()

    @app.get("/v1/jobs/{job_id}", dependencies=[Depends(bearer)], response_model=JobStatus,
             responses={**UNAUTHORIZED, **NOT_FOUND})
    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._status(job_id)

    @app.delete("/v1/jobs/{job_id}", dependencies=[Depends(bearer)], response_model=JobStatus,
                responses={**UNAUTHORIZED, **NOT_FOUND})
    async def cancel(self, job_id: str) -> dict[str, Any]:
        await self._status(job_id)
        return await self.director.cancel.remote(job_id)

    @app.post("/v1/jobs/{job_id}/requeue", dependencies=[Depends(bearer)], response_model=JobStatus,
              responses={**UNAUTHORIZED, **NOT_FOUND,
                         409: {"model": Problem, "description": "the job is still active"}})
    async def requeue(self, job_id: str) -> dict[str, Any]:
        """Run a finished job again (failed, cancelled, or succeeded); finished stages come from the cache."""
        status = await self._status(job_id)
        if JobState(status["state"]) in ACTIVE_STATES:
            raise HTTPException(status_code=409, detail=f"job is {status['state']}: cancel it or let it finish first")
        return await self.director.requeue.remote(job_id)

    @app.patch("/v1/jobs/{job_id}", dependencies=[Depends(bearer)], response_model=JobStatus,
               responses={**UNAUTHORIZED, **NOT_FOUND})
    async def set_priority(self, job_id: str, change: PriorityChange) -> dict[str, Any]:
        """Change a job's priority: its waiting stages go before lower-priority jobs' from the next
        dispatch on (running stages are not preempted)."""
        await self._status(job_id)
        return await self.director.set_priority.remote(job_id, change.priority)

    @app.post("/v1/validate", dependencies=[Depends(bearer)], response_model=Preflight,
              responses={413: {"model": Problem, "description": "body too large"}, **UNAUTHORIZED})
    @app.post("/v1/simulate", dependencies=[Depends(bearer)], response_model=Preflight,
              responses={413: {"model": Problem, "description": "body too large"}, **UNAUTHORIZED})
    async def validate(self, request: Request) -> Any:
        """Check and plan a storyboard (JSON or YAML body) without submitting it: every error at its
        field path, the warnings, the stage table and the makespan simulated on the workers up now."""
        from farm.preflight import preflight

        root = Path(self.settings.root)
        text = await self._body(request)
        if not text.strip():  # nothing to check is a malformed request, not an invalid storyboard
            return unprocessable([FieldError((), "no body: send a storyboard manifest (JSON or YAML)")])
        try:
            data, _, extra = await asyncio.to_thread(self._check, text)
        except ManifestError as exc:
            return Preflight(valid=False, errors=[FieldProblem(loc=list(e.loc), msg=e.msg) for e in exc.errors],
                             warnings=[], stages=[], cluster={}, cluster_assumed=True).model_dump(mode="json")
        cluster: dict[str, int] = {}
        for worker in await self.director.workers_info.remote():
            if worker["state"] != "unreachable":
                cluster[worker["tier"]] = cluster.get(worker["tier"], 0) + 1
        return await asyncio.to_thread(preflight, data, root, {"models": self.settings.models}, cluster, extra)

    @app.get("/v1/jobs/{job_id}/shots/{shot_id}/keyframe", dependencies=[Depends(bearer)],
             responses={200: {"content": {"image/png": {}}}, **UNAUTHORIZED, **NOT_FOUND})
    async def keyframe(self, job_id: str, shot_id: str = PathParam(pattern=SHOT_ID)) -> FileResponse:
        """A shot's keyframe PNG, as soon as it exists (its generation parameters in a text chunk)."""
        status = await self._status(job_id)
        return await self._out_file(job_id, OutputLayout(status["out_dir"]).keyframe(shot_id), "image/png")

    @app.get("/v1/jobs/{job_id}/shots/{shot_id}/clip", dependencies=[Depends(bearer)],
             responses={200: {"content": {"video/mp4": {}}}, **UNAUTHORIZED, **NOT_FOUND})
    async def clip(self, job_id: str, shot_id: str = PathParam(pattern=SHOT_ID)) -> FileResponse:
        """A shot's clip (its kept take), with HTTP Range support, as soon as it is encoded."""
        status = await self._status(job_id)
        return await self._out_file(job_id, OutputLayout(status["out_dir"]).shot_clip(shot_id), "video/mp4")

    @app.get("/v1/jobs/{job_id}/lockfile", dependencies=[Depends(bearer)], responses=FILE_RESPONSES)
    @app.get("/v1/jobs/{job_id}/ledger", dependencies=[Depends(bearer)], responses=FILE_RESPONSES)
    @app.get("/v1/jobs/{job_id}/report", dependencies=[Depends(bearer)], responses=FILE_RESPONSES)
    @app.get("/v1/jobs/{job_id}/contact_sheet", dependencies=[Depends(bearer)], responses=FILE_RESPONSES)
    @app.get("/v1/jobs/{job_id}/timeline", dependencies=[Depends(bearer)], responses=FILE_RESPONSES)
    async def job_file(self, request: Request, job_id: str) -> FileResponse:
        """A finished job's lockfile, ledger, QC report, contact sheet or editor's timeline (one route
        each, named as the file is; never a path)."""
        status = await self._status(job_id)
        attribute, media_type = JOB_FILES[request.url.path.rsplit("/", 1)[1]]
        return await self._out_file(job_id, getattr(OutputLayout(status["out_dir"]), attribute), media_type)

    @app.get("/v1/jobs/{job_id}/events", dependencies=[Depends(bearer)],
             responses={200: {"content": {"text/event-stream": {}}}})
    async def events(self, job_id: str, last_event_id: str | None = Header(default=None, max_length=40)) -> Any:
        """Server-sent events: stage started/finished/failed, job finished. Ends when the job does; a
        client that reconnects with Last-Event-ID gets the events after that one. Ids are
        `<director incarnation>-<n>`: a restarted director's list starts again, and so does the client."""
        await self._status(job_id)
        seen, _, last = (last_event_id or "").rpartition("-")
        start = int(last) + 1 if seen and last.isdigit() else 0

        async def stream():  # noqa: ANN202
            since, finished = start, False
            while True:
                try:
                    events, state, incarnation = await self.director.event_page.remote(job_id, since)
                except RayActorError:
                    return  # the director is restarting: the client reconnects with Last-Event-ID
                if seen and incarnation != seen and since == start:  # numbered by a director since restarted
                    events, state, incarnation = await self.director.event_page.remote(job_id, 0)
                    since = 0
                for i, event in enumerate(events):
                    finished |= event["type"] == "job_finished"
                    yield f"id: {incarnation}-{since + i}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
                since += len(events)
                if JobState(state) not in ACTIVE_STATES:
                    if not finished:  # ended before this stream saw its events (or a director restart)
                        yield f"event: job_finished\ndata: {json.dumps({'job': job_id, 'state': state})}\n\n"
                    return
                await asyncio.sleep(0.25)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/output", dependencies=[Depends(bearer)],
             responses={200: {"content": {"video/mp4": {}}}, 409: {"description": "not finished"}})
    async def output(self, job_id: str) -> FileResponse:
        """The film, with HTTP Range support (players seek without downloading it all)."""
        status = await self._status(job_id)
        if status["state"] != JobState.SUCCEEDED:
            raise HTTPException(status_code=409, detail=f"job is {status['state']}")
        return FileResponse(Path(status["out_dir"]) / "final.mp4", media_type="video/mp4",
                            filename=f"{job_id}.mp4")

    @app.get("/v1/workers", dependencies=[Depends(bearer)], response_model=list[WorkerInfo], responses=UNAUTHORIZED)
    async def workers(self) -> list[dict[str, Any]]:
        return await self.director.workers_info.remote()

    # --- the web pages (server-rendered, plain JavaScript over /v1; nothing fetched from elsewhere) ---

    @app.get("/ui", include_in_schema=False)
    async def ui(self) -> RedirectResponse:
        return RedirectResponse("/ui/queue", status_code=303)

    @app.get("/ui/login", include_in_schema=False)
    async def login_page(self) -> HTMLResponse:
        return page("login.html", title="Log in", csrf="")

    @app.post("/ui/login", include_in_schema=False)
    async def login(self, request: Request) -> Response:
        """The token in a form, once; then an HttpOnly, SameSite=Strict session cookie derived from it
        (EventSource cannot send headers: the live stream rides on the cookie, never on a URL)."""
        token = self.settings.token
        given = parse_qs(await self._body(request))
        typed = (given.get("token") or [""])[0].strip()
        if token is not None and not hmac.compare_digest(typed.encode(), token.encode()):
            return page("login.html", 401, title="Log in", csrf="", error="That is not the farm's token.")
        response = RedirectResponse("/ui/queue", status_code=303)
        if token is not None:
            response.set_cookie(SESSION_COOKIE, derived(token, "session"), httponly=True, samesite="strict",
                                path="/", secure=request.url.scheme == "https")
        return response

    @app.post("/ui/logout", include_in_schema=False)
    async def logout(self, request: Request) -> Response:
        csrf = session_csrf(request)
        form = parse_qs(await self._body(request))
        if csrf is None or not hmac.compare_digest((form.get("csrf") or [""])[0].encode(), csrf.encode()):
            raise HTTPException(status_code=403, detail="not logged in, or the form is not this farm's")
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def _page(self, request: Request, name: str, **context: Any) -> Response:
        """A page for a logged-in browser; without a session, the login page instead."""
        csrf = session_csrf(request)
        if csrf is None:
            return RedirectResponse("/ui/login", status_code=303)
        return page(name, csrf=csrf, **context)

    @app.get("/ui/queue", include_in_schema=False)
    async def queue_page(self, request: Request) -> Response:
        return await self._page(request, "queue.html", title="Queue", states=[s.value for s in JobState])

    @app.get("/ui/jobs/{job_id}", include_in_schema=False)
    async def job_page(self, request: Request, job_id: str = PathParam(pattern="^[0-9a-f]{1,64}$")) -> Response:
        if session_csrf(request) is not None:
            await self._status(job_id)
        return await self._page(request, "job.html", title=f"Job {job_id}", job_id=job_id)

    @app.get("/ui/submit", include_in_schema=False)
    async def submit_page(self, request: Request) -> Response:
        return await self._page(request, "submit.html", title="Submit", max_bytes=self.settings.limits.max_body_bytes)

    @app.get("/ui/workers", include_in_schema=False)
    async def workers_page(self, request: Request) -> Response:
        return await self._page(request, "workers.html", title="Workers")

    @app.get("/ui/static/{name}", include_in_schema=False)
    async def asset(self, request: Request, name: str) -> Response:
        if name not in UI_ASSETS:
            raise HTTPException(status_code=404, detail="no such asset")
        if session_csrf(request) is None:
            raise HTTPException(status_code=401, detail="log in first")
        return FileResponse(UI / "static" / name, media_type=UI_ASSETS[name])

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self, request: Request, authorization: str | None = Header(default=None)) -> PlainTextResponse:
        """Prometheus text: counts and timings only, never a prompt, path or token. Open on a loopback
        bind (or where the config says a private network's Prometheus scrapes it), else the token."""
        from farm.metrics import render

        opened = self.settings.metrics_open
        if not (self.settings.loopback if opened is None else opened):
            await bearer(request, authorization)
        snapshot, seconds, workers = await self.director.metrics_data.remote()
        return PlainTextResponse(render(snapshot, seconds, workers).decode(),
                                 media_type="text/plain; version=0.0.4")




# Handlers are async and mostly await the director (parsing runs in a thread): one replica holds many
# requests at once. Serve's default of 5 made 32 concurrent clients queue behind its router's back-off
# (~10 req/s), and a cap of 64 did the same to 300 (bench/api_load.py): past the cap a request waits in
# the proxy's back-off instead of a queue that drains as fast as the replica works.
HEAD_NODE = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
MAX_ONGOING_REQUESTS = 1024
FarmAPI = serve.deployment(name="FarmAPI", num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                           ray_actor_options=HEAD_NODE)(FarmIngress)


def build(args: dict[str, Any]) -> Any:
    """Builder for `serve run`/`serve deploy` (deployments/serve_config.yaml): args override the env."""
    settings = Settings.from_config(**{k: v for k, v in args.items() if k in ("director_name", "tier", "workers",
                                                                            "models", "root", "host")})
    return FarmAPI.bind(settings)
