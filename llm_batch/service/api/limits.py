"""Limits on request bodies, checked before a route (or FastAPI's parsing) sees them.

A pure ASGI middleware, so a hostile body costs the service no more than the limit:

- a body larger than ``max_bytes`` is answered with ``413`` as soon as its
  ``Content-Length`` says so, or as soon as the bytes received pass the limit
  (a chunked body); the rest is never read;
- a JSON body that is not UTF-8, or that nests arrays and objects deeper than
  ``max_depth``, is answered with ``422`` before any route parses it (Python's
  parser would raise ``RecursionError`` on thousands of levels, and anything that
  walks the parsed value recursively later could too);
- uploads (``upload_limits``: path → bytes, for ``POST``) are not buffered: they
  stream through to their route, which enforces its own limit (``/v1/files``:
  ``max_upload_bytes``) and is backed up here: a stream past the path's limit is
  cut off with ``413`` inside the route's read.

Refusals are ``{"detail": ...}`` like every error of the native API, or OpenAI's
``{"error": {...}}`` under ``openai_paths``.

A request without a body (``GET``) passes through untouched. The cost for a normal
job body is a count of its brackets; only a body with more opening brackets than
``max_depth`` is parsed here to measure its depth.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_batch.service.api.errors import OpenAIError

__all__ = ["RequestLimits", "json_depth"]


def json_depth(value: Any, *, stop_after: int | None = None) -> int:
    """Deepest nesting of lists and dicts in a parsed JSON value (a scalar is 0); stops
    counting once past ``stop_after``. Iterative: no recursion on deep values."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if stop_after is not None and deepest > stop_after:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (list, dict)))
    return deepest


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # FastAPI parses a body without a Content-Type as JSON
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


class RequestLimits:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        max_depth: int,
        upload_limits: Mapping[str, int] | None = None,
        openai_paths: tuple[str, ...] = (),
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.upload_limits = dict(upload_limits or {})
        self.openai_paths = openai_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        length_header = headers.get(b"content-length")
        if length_header is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        path = scope["path"]
        if scope["method"] == "POST" and path in self.upload_limits:
            await self._stream(scope, receive, send, self.upload_limits[path])
            return
        declared = int(length_header) if length_header and length_header.isdigit() else 0
        if declared > self.max_bytes:
            await self._refuse(send, path, 413, _too_large(self.max_bytes))
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, path, 413, _too_large(self.max_bytes))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type")
        if body and _is_json(content_type.decode("latin-1") if content_type else None):
            problem = self._json_problem(body)
            if problem is not None:
                await self._refuse(send, path, 422, problem)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then http.disconnect, for streaming responses

        await self.app(scope, replay, send)

    def _json_problem(self, body: bytes) -> str | None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return (
                "request body is not valid JSON: it is not UTF-8 text "
                f"(byte 0x{body[e.start]:02x} at position {e.start})"
            )
        if body.count(b"[") + body.count(b"{") <= self.max_depth:
            return None  # cannot nest deeper than its brackets: the usual case, no parse
        try:
            too_deep = json_depth(json.loads(text), stop_after=self.max_depth) > self.max_depth
        except RecursionError:
            too_deep = True
        except ValueError:
            return None  # not JSON: the route says so, with the position
        if not too_deep:
            return None
        return (
            "request body nests arrays and objects deeper than this service's limit of "
            f"{self.max_depth} levels (max_json_depth)"
        )

    async def _stream(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        path = scope["path"]

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised into the route, inside its read of the stream; the route's
                    # own limit is smaller and normally answers first.
                    detail = _too_large(limit, upload=True)
                    if self._openai(path):
                        raise OpenAIError(413, detail, code="file_too_large")
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, counted, send)

    def _openai(self, path: str) -> bool:
        return bool(self.openai_paths) and path.startswith(self.openai_paths)

    async def _refuse(self, send: Send, path: str, status: int, detail: str) -> None:
        if self._openai(path):
            error = {"message": detail, "type": "invalid_request_error", "param": None}
            payload: dict[str, Any] = {"error": {**error, "code": None}}
        else:
            payload = {"detail": detail}
        body = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    # The rest of the body is not read: the connection cannot be reused.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _too_large(limit: int, *, upload: bool = False) -> str:
    what = "upload" if upload else "request body"
    setting = "max_upload_bytes" if upload else "max_request_bytes"
    return f"{what} is larger than this service's limit of {limit} bytes ({setting})"
