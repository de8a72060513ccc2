"""Job-end webhooks: POSTed with retries and an HMAC-SHA256 signature of the exact body, only to
addresses farm/egress.py allows."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from farm.egress import Refused, Resolver, post, vet

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Farm-Signature"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def secret() -> str:
    """The config's webhook secret (FARM_WEBHOOK_SECRET), else the API token: receivers verify with a
    secret they already share."""
    from farm.config import current

    config = current()
    return config.webhook.secret or config.api.token or ""


# outcome label of farm_webhook_deliveries_total
OUTCOMES = ("delivered", "refused", "rejected", "failed")


def allowed_hosts() -> list[str]:
    from farm.config import current

    return list(current().webhook.allow_hosts)


def deliver(url: str, payload: dict[str, Any], *, attempts: int = 4, backoff_s: float = 1.0,
            timeout_s: float = 10.0, allow_hosts: list[str] | None = None,
            resolve: Resolver = socket.getaddrinfo) -> str:
    """POST `payload` to a vetted address (farm/egress.py); retry on connection errors and 5xx with
    exponential back-off. Returns the outcome: delivered, refused (the farm would not send it there),
    rejected (the receiver answered 4xx) or failed."""
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret(), body),
               "User-Agent": "farm-webhook"}
    allow = allowed_hosts() if allow_hosts is None else allow_hosts
    for attempt in range(attempts):
        try:
            # Resolved again on every attempt, and the connection goes to the address just checked.
            status = post(vet(url, allow, resolve), body, headers, timeout_s)
        except Refused as exc:
            log.warning("webhook for job %s refused: %s", payload.get("id"), exc)
            return "refused"
        except (OSError, http.client.HTTPException):
            status = None
        if status is not None and status < 300:
            return "delivered"
        if status is not None and status < 500:
            return "rejected"  # the receiver refused it (or redirected it: not followed); retrying will not help
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    log.warning("webhook for job %s failed after %d attempts", payload.get("id"), attempts)
    return "failed"


def deliver_later(url: str, payload: dict[str, Any],
                  done: Callable[[str], None] = lambda outcome: None) -> threading.Thread:
    """Deliver on a thread of its own: a slow or dead receiver must never stall dispatch, and nothing
    a delivery raises ends anything but its own thread. `done` gets the outcome (for the counter)."""

    def run() -> None:
        try:
            outcome = deliver(url, payload)
        except Exception:  # noqa: BLE001 - a bug here must not pass unseen, nor take the director down
            log.exception("webhook delivery crashed")
            outcome = "failed"
        done(outcome)

    thread = threading.Thread(target=run, daemon=True, name="webhook")
    thread.start()
    return thread
