"""ASGI middleware that refuses bodies over a byte limit (by Content-Length, or while streaming) with 413."""

from __future__ import annotations

import json

from .handlers import BadRequest, ClientError, PayloadTooLarge


async def send_json(send, status: int, detail: str) -> None:  # noqa: ANN001 - ASGI callable
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
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
