"""`ray.remote` with actor options, in one place.

Ray's type stubs describe `ray.remote(...)` by overloads that know no actor options such as
`max_concurrency`; passed through here as plain keyword options, every actor module type-checks.
"""

from __future__ import annotations

from typing import Any

import ray


def actor_class(cls: type, **options: Any) -> Any:
    """`ray.remote(**options)(cls)`: the Ray actor class of `cls`."""
    return ray.remote(**options)(cls)
