"""Job-end webhooks: POSTed with retries and an HMAC-SHA256 signature of the exact body."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

SIGNATURE_HEADER = "X-Farm-Signature"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def secret() -> str:
    """The config's webhook secret (FARM_WEBHOOK_SECRET), else the API token: receivers verify with a
    secret they already share."""
    from farm.config import current

    config = current()
    return config.webhook.secret or config.api.token or ""


def deliver(url: str, payload: dict[str, Any], *, attempts: int = 4, backoff_s: float = 1.0,
            timeout_s: float = 10.0) -> bool:
    """POST `payload`; retry on connection errors and 5xx with exponential back-off. True if delivered."""
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret(), body),
               "User-Agent": "farm-webhook"}
    for attempt in range(attempts):
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - user's URL
                if response.status < 300:
                    return True
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return False  # the receiver refused it; retrying will not change its mind
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(backoff_s * 2**attempt)
    return False


def deliver_later(url: str, payload: dict[str, Any]) -> threading.Thread:
    """Deliver on a thread of its own: a slow or dead receiver must never stall dispatch."""
    thread = threading.Thread(target=deliver, args=(url, payload), daemon=True, name="webhook")
    thread.start()
    return thread
