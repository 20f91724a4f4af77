"""A bound on request bodies: a declared Content-Length over the limit is refused at once;
a body without one (chunked) is read up to the limit and refused as soon as it passes it,
else handed on whole. No request can make a worker buffer more than `max_bytes`.

Every body the service reads is JSON, so a body of another content type (text/plain, a
form, multipart, none named) is a 415 before any route sees it: FastAPI would otherwise
hand such bytes to a JSON route's validation, which answered 500."""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send: Send, status: int = 413, detail: str | None = None) -> None:
        detail = detail or f"request body over {self.max_bytes} bytes"
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        has_body = headers.get(b"transfer-encoding") is not None or declared not in (None, b"0")
        if has_body and not _is_json(headers.get(b"content-type", b"")):
            await self._refuse(
                send, 415, "the request body must be JSON (content-type: application/json)"
            )
            return
        if not has_body:  # nothing to bound: most requests, every GET
            await self.app(scope, receive, send)
            return
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _is_json(content_type: bytes) -> bool:
    """application/json, or a +json type, with or without parameters (charset)."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )
