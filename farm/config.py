"""One farm configuration for every entry point: `farm render`, `farm serve`, the director, workers.

Where a value comes from, lowest first: the defaults here, the config file (`--config`, else
`$FARM_CONFIG`, else `<state dir>/config.yaml` when it exists), then environment variables. `farm
config show` prints every effective value with its source. Entry points load it once and hand the
validated object to the actors they start, so every node of a cluster renders with the same one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from farm.paths import state_dir
from farm.qc import QcRules

if TYPE_CHECKING:
    from farm.sim.costs import TierCost

CONFIG_ENV = "FARM_CONFIG"
CONFIG_NAME = "config.yaml"


class _Section(BaseModel):
    # A misspelt key must fail loudly, not fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiConfig(_Section):
    token: str | None = None  # bearer token of every /v1 route
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 1 << 20
    allowed_hosts: list[str] = []  # Host names besides the bound one (an ingress, a KubeRay service)
    metrics_open: bool | None = None  # /metrics without the token (None: only on a loopback bind)


class WebhookConfig(_Section):
    secret: str | None = None  # HMAC key of X-Farm-Signature (default: the API token)
    allow_hosts: list[str] = []  # hosts a webhook may reach even on a private address


class PolicyConfig(_Section):
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    backoff_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    backoff_cap_s: Annotated[float, Field(ge=0, le=86400)] = 60.0
    max_worker_losses: Annotated[int, Field(ge=1, le=100)] = 5
    quarantine_after: Annotated[int, Field(ge=1, le=100)] = 3
    quarantine_s: Annotated[float, Field(ge=0, le=86400)] = 300.0
    reconcile_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    # how often a running job's deadline sizing is done again on the work it has left (a job running
    # late asks for more GPUs, one running early for fewer); each sizing is seconds of simulation
    resize_s: Annotated[float, Field(gt=0, le=86400)] = 300.0


class ModelsConfig(_Section):
    allow_download: bool = False  # fetch missing hub models at render time
    # Named local model files and folders a manifest or a family default may refer to by name
    # (distillation LoRAs, adapters, face models): name -> path.
    paths: dict[str, str] = {}


class FarmConfig(_Section):
    cache_dir: str | None = None  # stage outputs; shared storage on a cluster (default <state dir>/cache)
    # the cache's cap: after each job, least recently used outputs go until it fits (never what a queued
    # or running job needs); null: no cap. `farm cache du` / `farm cache gc`
    cache_cap_gb: Annotated[float, Field(gt=0)] | None = 100.0
    allowed_root: str | None = None  # where paths in submitted manifests may point (default <state dir>/inputs)
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile of the denoiser on GPU workers
    server: str = "http://127.0.0.1:8000"  # the farm `farm submit` and friends talk to
    api: ApiConfig = ApiConfig()
    webhook: WebhookConfig = WebhookConfig()
    policy: PolicyConfig = PolicyConfig()
    models: ModelsConfig = ModelsConfig()
    families: dict[str, dict[str, Any]] = {}  # per model family: default overrides
    prices: dict[str, Annotated[float, Field(ge=0)]] = {}  # per VRAM tier: price of one GPU-hour
    costs: str | None = None  # a `farm calibrate` costs file: the cost model the director plans with
    # the most GPUs per tier the autoscaler may start (cluster.yaml's node types): jobs with a deadline
    # are sized within these, and the autoscaler is asked for that many of each tier
    autoscale_max: dict[str, Annotated[int, Field(ge=0)]] = {}
    qc: QcRules = QcRules()  # quality gates for every job, under each job's own `qc:` (docs/qc.md)

    @property
    def home(self) -> Path:
        return state_dir()

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.home / "cache"

    @property
    def cache_cap_bytes(self) -> int | None:
        return None if self.cache_cap_gb is None else int(self.cache_cap_gb * 1e9)

    @property
    def inputs_root(self) -> Path:
        return Path(self.allowed_root) if self.allowed_root else self.home / "inputs"

    @property
    def store_path(self) -> Path:
        return self.home / "farm.sqlite"

    def cost_model(self) -> dict[str, TierCost]:
        """tier -> TierCost: the calibrated file named by `costs`, else the assumed defaults."""
        from farm.calibration import load_costs
        from farm.sim.costs import DEFAULT_COSTS

        return load_costs(self.costs) if self.costs else dict(DEFAULT_COSTS)


class ConfigError(ValueError):
    """A config file or variable the farm cannot use; the message names the key."""


# Environment variables, each overriding one key (dotted path into FarmConfig).
ENV_KEYS: dict[str, str] = {
    "FARM_CACHE_DIR": "cache_dir",
    "FARM_CACHE_CAP_GB": "cache_cap_gb",
    "FARM_ALLOWED_ROOT": "allowed_root",
    "FARM_COMPILE": "compile",
    "FARM_SERVER": "server",
    "FARM_API_TOKEN": "api.token",
    "FARM_MAX_BODY_BYTES": "api.max_body_bytes",
    "FARM_WEBHOOK_SECRET": "webhook.secret",
    "FARM_WEBHOOK_ALLOW_HOSTS": "webhook.allow_hosts",  # comma-separated
    "FARM_API_ALLOWED_HOSTS": "api.allowed_hosts",  # comma-separated
    "FARM_ALLOW_DOWNLOAD": "models.allow_download",
    "FARM_COSTS": "costs",
}


def config_path(explicit: str | Path | None = None, env: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """The config file to read and why: (path, "--config" | "FARM_CONFIG" | "default"), or (None, ...)
    when no file applies."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit), "--config"
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), CONFIG_ENV
    default = state_dir() / CONFIG_NAME
    return (default if default.is_file() else None), "default"


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name not in ("families", "prices", "qc", "models.paths"):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_config(explicit: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> tuple[FarmConfig, dict[str, str]]:
    """The effective config and, per key, where its value came from ("default", the file's path,
    or the variable's name). Raises ConfigError naming the key (and file) that is wrong."""
    env = os.environ if env is None else env
    path, why = config_path(explicit, env)
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (named by {why})")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of keys to values")
        data = loaded or {}
        sources.update({key: str(path) for key in _flatten(data)})
    for var, key in ENV_KEYS.items():
        if env.get(var) not in (None, ""):
            value: Any = env[var]
            if key == "models.allow_download":
                value = value.strip().lower() in ("1", "true", "yes", "on")
            elif key.endswith("_hosts"):
                value = [h.strip() for h in value.split(",") if h.strip()]
            _set(data, key, value)
            sources[key] = var
    try:
        config = FarmConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            where = sources.get(key) or next((v for k, v in sources.items() if key.startswith(k)), "config")
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {msg} (from {where})")
        raise ConfigError("; ".join(problems)) from None
    return config, sources


def describe(config: FarmConfig, sources: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    """(key, effective value, source) for every key, secrets masked: what `farm config show` prints."""
    rows = [("home", str(config.home), "FARM_HOME" if os.environ.get("FARM_HOME") else "default")]
    for key, value in _flatten(config.model_dump(mode="json")).items():
        if value is not None and key in ("api.token", "webhook.secret"):
            value = "***" + str(value)[-4:] if len(str(value)) > 8 else "***"
        rows.append((key, value, sources.get(key, "default")))
    return rows


_CURRENT: FarmConfig | None = None


def current() -> FarmConfig:
    """The config of this process: the one an entry point installed, else loaded from the
    environment (a worker process on another node reads the config its director handed it)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = load_config()[0]
    return _CURRENT


def install(config: FarmConfig) -> FarmConfig:
    """Make `config` this process's config (entry points, and actors given one by their creator)."""
    global _CURRENT
    _CURRENT = config
    return config
