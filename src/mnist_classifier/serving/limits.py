"""ASGI middleware at the edge of the service: who may talk to it, and how much they may send.

``HostGuard`` answers only requests addressed to this server (Host header) and, from browsers, only POSTs
from this server's own pages or configured origins (Origin header): a web page the user happens to visit
can neither post to a loopback server nor read it through DNS rebinding. ``BodyLimit`` refuses bodies over
a byte limit, and turns a client that vanished mid-body into one log line.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from starlette.requests import ClientDisconnect

from .handlers import BadRequest, ClientError, PayloadTooLarge

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: its lines appear with the server's own
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


async def send_json(send, status: int, detail: str, headers: tuple = ()) -> None:  # noqa: ANN001 - ASGI callable
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies over ``max_bytes``: before reading when Content-Length says so, else as they stream."""

    def __init__(self, app, max_bytes: int) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is larger than {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):  # noqa: ANN001, ANN204 - ASGI signature
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and not length.isdigit():
            return await send_json(send, BadRequest.status, "invalid Content-Length")
        if length is not None and int(length) > self.max_bytes:
            return await send_json(send, PayloadTooLarge.status, self._too_large().detail)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ClientError as exc:
            if not started:
                await send_json(send, exc.status, exc.detail)
        except ClientDisconnect:  # nobody is left to answer: one line, no traceback
            client = scope.get("client") or ("?", 0)
            log.info("%s:%s disconnected before sending the whole body of %s %s", *client, scope["method"], scope["path"])


def _hostname(value: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the host name, lower case (urlsplit parses both forms)."""
    return (urlsplit(f"//{value}").hostname or "").lower()


class HostGuard:
    """403 for a Host this server is not, and for a browser POST from an origin it does not trust."""

    def __init__(self, app, hosts: set[str], origins: set[str]) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.hosts, self.origins = app, {h.lower() for h in hosts} | set(LOCAL_NAMES), origins

    async def __call__(self, scope, receive, send):  # noqa: ANN001, ANN204 - ASGI signature
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = _hostname(headers.get(b"host", b"").decode("latin-1"))
        if host not in self.hosts:
            return await send_json(send, 403, f"this server does not answer to the Host {host!r}; "
                                              "start it with --allowed-hosts to add names")
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin not in self.origins \
                and _hostname(urlsplit(origin).netloc) not in self.hosts:
            return await send_json(send, 403, f"requests from the web origin {origin!r} are not allowed; "
                                              "start the server with --allowed-origins to allow it")
        return await self.app(scope, receive, send)
