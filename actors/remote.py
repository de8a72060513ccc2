"""`ray.remote` with actor options, in one place.

Ray's type stubs describe `ray.remote(...)` by overloads that know no actor options such as
`max_concurrency`; passed through here as plain keyword options, every actor module type-checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import ray


def actor_class(cls: type, **options: Any) -> Any:
    """`ray.remote(**options)(cls)`: the Ray actor class of `cls`."""
    return ray.remote(**options)(cls)


F = TypeVar("F", bound=Callable[..., Any])


def untracked(method: F) -> F:
    """An actor method Ray keeps no task events for (`ray.method(enable_task_events=False)`): for the
    calls made many times a second (API submits and polls), whose events the GCS would receive, store
    and age out one by one: CPU on every call, and gcs_server's memory over days. The farm's own
    ledger, events and metrics are where its history lives."""
    ray.method(enable_task_events=False)(method)  # marks the function itself
    return method
