"""Request limits (``api/limits.py``): big bodies cut off while they stream in, deep JSON
refused before it is parsed, everything else passed through unchanged.

The streaming claims are checked at the ASGI level, where the test controls how the
body arrives chunk by chunk and can count how much of it was read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request

from llm_batch.service.api.errors import install_error_handlers
from llm_batch.service.api.limits import RequestLimits, json_depth

CHUNK = 64 * 1024


class Echo:
    """An app that reads the whole body and answers with its size (and seen JSON)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        payload = json.dumps({"size": len(body)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": payload})


def call(
    app: Any,
    chunks: list[bytes],
    *,
    path: str = "/v1/jobs",
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], int]:
    """(status, JSON body, chunks the app and middleware pulled) for a body in chunks."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {
                "type": "http.request",
                "body": chunks[pulled - 1],
                "more_body": pulled < len(chunks),
            }
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw = {"content-type": "application/json", **(headers or {})}
    if chunks and "content-length" not in raw:
        raw["transfer-encoding"] = "chunked"
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in raw.items()],
    }
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(body), pulled


def limited(app: Any = None, **kw: Any) -> RequestLimits:
    return RequestLimits(app or Echo(), max_bytes=kw.pop("max_bytes", 1 << 20), max_depth=64, **kw)


def test_a_big_body_is_cut_off_while_it_streams_in():
    echo = Echo()
    chunks = [b" " * CHUNK] * 200  # 12.5 MiB, chunked: no Content-Length to go by
    status, body, pulled = call(limited(echo), chunks)
    assert status == 413
    assert "larger than this service's limit of 1048576 bytes" in body["detail"]
    assert pulled == (1 << 20) // CHUNK + 1  # stopped at the first chunk past the limit
    assert echo.calls == 0  # the app never saw it


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    status, body, pulled = call(limited(), [b"{}"], headers={"content-length": str(50 << 20)})
    assert (status, pulled) == (413, 0)
    assert "max_request_bytes" in body["detail"]


def test_bodies_within_the_limit_reach_the_app_whole():
    chunks = [b'{"a": "' + b"x" * (CHUNK - 10), b'"}']
    status, body, pulled = call(limited(), chunks)
    assert (status, body["size"], pulled) == (200, CHUNK - 10 + 9, 2)
    # No body at all (a GET): untouched.
    status, body, pulled = call(limited(), [], method="GET")
    assert (status, body["size"]) == (200, 0)


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b"[" * 10_000 + b"]" * 10_000, 422, "deeper than this service's limit of 64 levels"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 422, "deeper than"),
        (b'{"a":' * 65 + b"1" + b"}" * 65, 422, "deeper than"),
        (b'{"a":' * 64 + b"1" + b"}" * 64, 200, ""),
        (b'{"brackets in strings": "' + b"[[[[" * 1000 + b'"}', 200, ""),
        (b"[" * 100, 200, ""),  # not JSON: left for the route to say so
        (b'{"name": "caf\xe9"}', 422, "not UTF-8 text (byte 0xe9 at position 13)"),
    ],
    ids=["array-10000", "object-10000", "depth-65", "depth-64", "strings", "truncated", "latin1"],
)
def test_json_bodies_nested_too_deep_or_not_utf8_are_refused(raw, status, needle):
    got, body, _ = call(limited(), [raw])
    assert got == status, body
    if needle:
        assert needle in body["detail"]


def test_non_json_bodies_are_not_parsed_here():
    status, _, _ = call(limited(), [b"[" * 10_000], headers={"content-type": "text/plain"})
    assert status == 200


def test_openai_routes_get_openai_shaped_refusals():
    app = limited(openai_paths=("/v1/batches",))
    status, body, _ = call(app, [b"[" * 1000], path="/v1/batches")
    assert status == 422
    assert body["error"]["type"] == "invalid_request_error"
    assert "deeper than" in body["error"]["message"]


def upload_api() -> FastAPI:
    """A route that streams the request like ``/v1/files`` does, with the app's handlers."""
    api = FastAPI()
    install_error_handlers(api)

    @api.post("/v1/files")
    async def upload(request: Request) -> dict[str, int]:
        return {"size": sum([len(c) async for c in request.stream()])}

    return api


def test_uploads_stream_through_and_are_cut_at_their_own_limit():
    echo = Echo()
    app = limited(echo, max_bytes=1 << 20, upload_limits={"/v1/files": 4 << 20})
    # Larger than max_request_bytes but within the upload limit: the route gets it all.
    status, body, _ = call(app, [b"x" * CHUNK] * 32, path="/v1/files")
    assert (status, body["size"]) == (200, 32 * CHUNK)
    # Past the upload limit: the route's read raises 413 at the first chunk past it.
    app = limited(upload_api(), upload_limits={"/v1/files": 4 << 20}, openai_paths=("/v1/files",))
    status, body, pulled = call(app, [b"x" * CHUNK] * 200, path="/v1/files")
    assert status == 413 and body["error"]["code"] == "file_too_large", body
    assert pulled == (4 << 20) // CHUNK + 1


def test_json_depth_is_iterative():
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    assert json_depth(deep) == 5000
    assert json_depth(deep, stop_after=10) == 11
    assert json_depth({"a": [1, {"b": []}], "c": 2}) == 4
    assert json_depth("scalar") == 0


def test_a_normal_job_body_passes_the_check():
    body = json.dumps(
        {
            "name": "reviews",
            "input": {"path": "/data/in.parquet"},
            "prompt": {"template": "Review: {{ text }}\nSentiment:" + " pad" * 200},
            "model": {"path": "tiny", "engine": {"max_model_len": 256}},
            "sampling": {"max_tokens": 4, "structured": {"choice": ["a", "b", "c"]}},
            "carryover": ["id"],
        }
    ).encode()
    assert limited()._json_problem(body) is None


def test_over_a_real_socket_the_rest_of_a_big_body_is_never_read(settings):
    """uvicorn on loopback: a 50 MiB chunked body is answered 413 after about the limit
    was sent, and the service goes on serving."""
    import threading

    import httpx
    import uvicorn

    from llm_batch.service.app import create_app
    from llm_batch.service.process import free_port

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, run_scheduler=False),
            host="127.0.0.1",
            port=free_port(),
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(800):  # 50 MiB
            sent += CHUNK
            yield b" " * CHUNK

    try:
        r = httpx.post(f"{url}/v1/jobs", content=chunks(), timeout=30)
        assert r.status_code == 413
        assert "max_request_bytes" in r.json()["detail"]
        assert sent < 8 * 1024 * 1024  # the limit and what the socket buffers held
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
