"""What every request passes before a route sees it: the Host and Origin allow-lists and the body size limit.

A server bound to 127.0.0.1 without a key is still reachable from any web page the user visits: by a
cross-site request (the page's `Origin` is not ours) or by DNS rebinding (a name the attacker controls
resolves to 127.0.0.1, so the request is same-origin for the browser, but its `Host` is the attacker's
name). As Ollama does, requests are refused unless their Host is a local name, an IP address, this
machine's name, the bound host or an allowed origin's host, and unless their Origin (when a browser
sends one) is the server's own, a localhost page, or one given with `--allow-origin`.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nomoat.errors import NomoatError
from nomoat.serve.schemas import ApiError, error_body

# Pages served from this machine at any port (a local app calling the API), for the CORS headers.
LOCAL_ORIGIN = r"https?://(localhost|[a-z0-9.-]+\.localhost|127(\.\d{1,3}){3}|\[::1\])(:\d+)?"
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def _host_name(netloc: str) -> str:
    """The host of `host[:port]` or `[v6]:port`, lower-cased, without a trailing dot."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else netloc
    if netloc.count(":") == 1:
        netloc = netloc.split(":", 1)[0]
    return netloc.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_local(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]` as browsers send it, or a NomoatError naming the bad --allow-origin value."""
    if origin == "*":
        return origin
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise NomoatError(f"--allow-origin {origin!r}: give an origin such as https://example.com or "
                          "http://my-host:8000 (or * for any)")
    return f"{parts.scheme}://{parts.netloc.lower()}"


@dataclass(frozen=True)
class Guard:
    """The allow-lists and the body limit, checked by `GuardMiddleware` on every HTTP request."""

    hosts: frozenset[str]
    origins: frozenset[str]
    max_body: int

    @classmethod
    def for_server(cls, host: str, allow_origins: Iterable[str], max_body: int) -> Guard:
        origins = frozenset(normalize_origin(o) for o in allow_origins)
        names = {_host_name(host), socket.gethostname().lower()}
        names |= {n.split(".", 1)[0] for n in names}
        names |= {_host_name(urlsplit(o).netloc) for o in origins if o != "*"}
        return cls(frozenset(n for n in names if n), origins, max_body)

    @property
    def any_origin(self) -> bool:
        return "*" in self.origins

    def host_ok(self, host_header: str) -> bool:
        """A browser sends the name it resolved as Host: only a rebinding attack sends a name of its own. As
        Ollama does, names under .local (mDNS) and .internal (private use), which no public DNS serves, pass."""
        host = _host_name(host_header)
        return (not host or self.any_origin or _is_ip(host) or _is_local(host) or host in self.hosts
                or host.endswith((".local", ".internal")))

    def origin_ok(self, origin: str, host_header: str) -> bool:
        if self.any_origin or origin.lower() in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null" (a sandboxed frame, a file:// page) and other schemes
        return parts.netloc.lower() == host_header.strip().lower() or _is_local(parts.hostname.lower())


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes", code="request_too_large")


class GuardMiddleware:
    """Refuses (403) a disallowed Host or Origin and (413) a body over the limit, before any route runs; a
    body sent without Content-Length is counted as it arrives and cut at the limit."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host, origin = headers.get("host", ""), headers.get("origin")
        g = self.guard
        if not g.host_ok(host):
            return await _refuse(send, 403, f"Host {host!r} is not allowed (DNS rebinding?); start the server with "
                                 "--allow-origin http://NAME:PORT to allow a name", "host_not_allowed")
        if origin is not None and not g.origin_ok(origin, host):
            return await _refuse(send, 403, f"Origin {origin!r} is not allowed; start the server with "
                                 "--allow-origin ORIGIN to allow a web page to call it", "origin_not_allowed")
        length = headers.get("content-length", "")
        if length.strip().isdigit() and int(length) > g.max_body:
            return await _refuse(send, 413, f"request body exceeds {g.max_body} bytes", "request_too_large")
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > g.max_body:
                    raise BodyTooLarge(g.max_body)  # the app's ApiError handler answers 413
            return message

        await self.app(scope, counted, send)


async def _refuse(send: Callable[[dict], Awaitable[None]], status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    start: dict[str, Any] = {"type": "http.response.start", "status": status,
                             "headers": [(b"content-type", b"application/json"),
                                         (b"content-length", str(len(body)).encode()), (b"connection", b"close")]}
    await send(start)
    await send({"type": "http.response.body", "body": body})
