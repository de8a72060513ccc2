"""Shared fixtures: one local Ray per test session, a private HOME/Ray token and farm state dir."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import quiet_port

from farm.rayenv import local_ray_options, prepare_local_ray

# Isolate every run before anything imports Ray or builds models: Ray 2.60 writes its auth token
# under HOME, and the tiny models are cached under FARM_HOME.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="farm-tests-"))
os.environ["HOME"] = str(_SESSION_HOME)
# Ray refuses a RAY_AUTH_TOKEN_PATH that does not exist: write this session's own token.
_TOKEN = _SESSION_HOME / ".ray" / "auth_token"
_TOKEN.parent.mkdir(parents=True)
_TOKEN.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN)
os.environ.setdefault("FARM_HOME", str(_SESSION_HOME / "farm"))
os.environ["HF_HUB_OFFLINE"] = "1"
# The environment the farm starts its own Ray with, its API served on this session's one port by the
# API replica itself (farm/rayenv.py); tests/helpers.py running_api serves it there.
prepare_local_ray(api_port=quiet_port())
os.environ["FARM_WEBHOOK_SECRET"] = "webhook-test-secret"  # the director signs job-end webhooks with it
os.environ["FARM_WEBHOOK_ALLOW_HOSTS"] = "localhost"  # test receivers listen there; 127.0.0.1 stays refused
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIERS = ("high", "mid", "low", "cpu")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, advertising every tier's resource so forced-tier workers
    can be placed on this CPU machine."""
    import ray

    ray.init(num_cpus=2, resources={f"farm_tier_{t}": 8 for t in TIERS}, log_to_driver=False,
             configure_logging=False, **local_ray_options())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models():
    """Build the tiny models once, before any worker process races to build them."""
    from farm.gpu.tiny import tiny_dir

    return {family: tiny_dir(family) for family in ("sdxl", "svd", "i2vgen", "flux", "sd3", "wan", "ltx")}


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
