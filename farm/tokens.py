"""The farm's API token: the config's (`api.token`, `FARM_API_TOKEN`), else one generated on first
start into the state dir, readable by its owner only, so a farm never serves without one.

Where it is gets printed; the token itself never is (nor logged, nor put in a URL).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from farm.config import FarmConfig
from farm.egress import is_loopback
from farm.paths import state_dir


def token_file() -> Path:
    return state_dir() / "api_token"


def stored_token() -> str | None:
    """The generated token, if this state dir has one."""
    try:
        return token_file().read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def ensure_token(config: FarmConfig) -> tuple[str, Path | None]:
    """(token, the file it is in, or None when the config gave it). Generates one the first time,
    created 0600 in one step (O_EXCL: two farms starting at once agree on the one that won)."""
    if config.api.token:
        return config.api.token, None
    path = token_file()
    existing = stored_token()
    if existing:
        return existing, path
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process wrote it just now
        return stored_token() or token, path
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token, path


MIN_REMOTE_TOKEN = 32  # characters a token needs where the API is reachable from other machines


def token_problem(token: str | None, host: str) -> str | None:
    """Why the API must not start with this token on `host`, or None: off loopback, a short token
    is guessed long before anyone notices."""
    if not token:
        return "the API needs a token (api.token, FARM_API_TOKEN, or the generated one)"
    if not is_loopback(host) and len(token) < MIN_REMOTE_TOKEN:
        return (f"the API token has {len(token)} characters; bound to {host} it needs at least "
                f"{MIN_REMOTE_TOKEN} (leave api.token unset and the farm generates one)")
    return None
