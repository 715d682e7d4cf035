"""Input hardening at the edge: per-route body-size limits enforced while the body is read,
and a JSON decoder that turns every malformed, mistyped or pathologically nested body into a
400 instead of a 500.

`BodyLimitMiddleware` is plain ASGI, outermost in the app: a declared `Content-Length` over
the limit is refused before a byte is read; a body without one (chunked) is counted as it
arrives and refused as soon as it passes the limit, so nothing past the limit is read.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.errors import ArtServeError, InvalidRequestError, PayloadTooLargeError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Deeper JSON than this is not a plausible request; Python's own decoder gives up near
# 1,000 levels with a RecursionError, which must not become a 500.
MAX_JSON_DEPTH = 32


def too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than this route's limit of {limit} bytes.")


class BodyLimitMiddleware:
    """`limit_for(path)` gives the largest body (bytes) the route takes; the path is the
    one inside the app (Serve's route prefix, `root_path`, removed)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        limit = self.limit_for(path)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await send_error(send, too_large(limit))
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except PayloadTooLargeError as exc:  # raised outside a route's exception handlers
            if started:
                raise
            await send_error(send, exc)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def send_error(send: Send, error: ArtServeError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.response_headers().items()]
    # The body was not read: tell the client this connection is done with.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def decode_json_body(raw: bytes) -> Any:
    """Bytes → a JSON value, or a 400. Also refuses what decodes but would break later code:
    nesting deeper than MAX_JSON_DEPTH and strings that are not valid Unicode (lone
    surrogates written as `\\ud800` cannot be encoded back to UTF-8)."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequestError(
            "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    problem = _check(value)
    if problem:
        message, param = problem
        raise InvalidRequestError(message, param=param, code="invalid_json")
    return value


def _check(value: Any) -> tuple[str, str | None] | None:
    """Walk the value without recursion; the first problem and the top-level field it is in."""
    stack: list[tuple[Any, int, str | None]] = [(value, 0, None)]
    while stack:
        item, depth, field = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.", field
        if isinstance(item, str):
            if not _valid_unicode(item):
                return "The JSON body contains a string that is not valid Unicode.", field
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _valid_unicode(key):
                    return "The JSON body contains a key that is not valid Unicode.", field
                stack.append((child, depth + 1, key if depth == 0 else field))
        elif isinstance(item, list):
            stack.extend((child, depth + 1, field) for child in item)
    return None


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
