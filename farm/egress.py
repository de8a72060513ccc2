"""Where the farm may send a request of its own (job-end webhooks): http(s) URLs whose every resolved
address is public, unless the farm's config allows the host by name (`webhook.allow_hosts`).

Why every record, at delivery time, and a connection pinned to the address that was checked: a
manifest's URL is the submitter's, and a name that resolves to a public address at submit can resolve
to 169.254.169.254 (cloud credentials), loopback or a private range a minute later (DNS rebinding).
Checking the syntax at submit only gives the submitter an early, clear error (docs/security.md).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

SCHEMES = ("http", "https")
MAX_URL = 2048  # the manifest's `webhook` field takes this bound too
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

Resolver = Callable[..., list[tuple[Any, ...]]]


class Refused(Exception):
    """The farm will not send to this URL; the message says why without echoing anything resolved."""


def url_problem(url: str) -> str | None:
    """What is wrong with `url` as a webhook target, or None: the checks that need no network."""
    if len(url) > MAX_URL:
        return f"at most {MAX_URL} characters"
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        return "no spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        return "not a valid URL"
    if parts.scheme.lower() not in SCHEMES:
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (they would be logged); sign with the webhook secret instead"
    return None


def is_loopback(host: str) -> bool:
    """Whether a host name or address (IPv6 in brackets or not) stays on this machine."""
    return host.lower().strip("[]") in LOOPBACK_NAMES or host.startswith("127.")


def address_refusal(address: str) -> str | None:
    """Why an address is not a public one, or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    if not ip.is_global or ip.is_multicast:
        return "resolves to a private, loopback, link-local or reserved address"
    return None


@dataclass(frozen=True)
class Target:
    """A vetted URL: where to connect (the address that was checked) and what to ask for."""

    parts: SplitResult
    addresses: tuple[str, ...]  # every address the name had, all vetted; tried in order

    @property
    def port(self) -> int:
        return self.parts.port or (443 if self.parts.scheme.lower() == "https" else 80)

    @property
    def path(self) -> str:
        return (self.parts.path or "/") + (f"?{self.parts.query}" if self.parts.query else "")


def vet(url: str, allow_hosts: Collection[str] = (), resolve: Resolver = socket.getaddrinfo) -> Target:
    """Resolve `url`'s host now and refuse it unless every address is public or the host is allowed
    by name. Raises Refused."""
    problem = url_problem(url)
    if problem:
        raise Refused(problem)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise Refused("its host does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise Refused("its host does not resolve")
    if host.lower().rstrip(".") not in {h.lower().rstrip(".") for h in allow_hosts}:
        for address in addresses:
            reason = address_refusal(address)
            if reason:
                raise Refused(reason)
    return Target(parts, tuple(addresses))


def _connect(target: Target, timeout: float, source: Any) -> socket.socket:
    """The first of the vetted addresses that answers (localhost is ::1 and 127.0.0.1, say)."""
    error: OSError | None = None
    for address in target.addresses:
        try:
            return socket.create_connection((address, target.port), timeout, source)
        except OSError as exc:
            error = exc
    raise error or OSError("no address to connect to")


def post(target: Target, body: bytes, headers: dict[str, str], timeout_s: float,
         max_response: int = 65536) -> int:
    """POST to the vetted address (TLS still verifies the URL's host name); redirects are not followed
    and at most `max_response` bytes of the answer are read. Returns the status code."""
    cls = http.client.HTTPSConnection if target.parts.scheme.lower() == "https" else http.client.HTTPConnection
    conn = cls(target.parts.hostname or "", target.port, timeout=timeout_s)
    # http.client opens its socket through this hook: connect to the address that was checked, not to
    # whatever the name resolves to now.
    conn._create_connection = lambda _addr, timeout, source: _connect(target, timeout, source)  # type: ignore[attr-defined]
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(max_response)
        return response.status
    finally:
        conn.close()
