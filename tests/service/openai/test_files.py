"""``/v1/files`` with the real ``openai`` client: the file object, bytes on disk (not in the
database), listing, content, deletion, the upload limit enforced while the upload streams."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types import FileObject
from sqlalchemy import create_engine, inspect, text

from llm_batch.service.app import create_app
from llm_batch.service.openai.upload import UploadTooLarge, receive_upload
from llm_batch.service.process import free_port
from llm_batch.service.settings import Settings

from .conftest import chat_line, jsonl

DATA = jsonl([chat_line("request-1"), chat_line("request-2")])


def leftovers(settings: Settings) -> list[str]:
    folder = settings.files_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_upload_returns_the_file_object_and_keeps_the_bytes_on_disk(client, settings):
    f = client.files.create(file=("requests.jsonl", DATA), purpose="batch")
    assert isinstance(f, FileObject)
    assert f.id.startswith("file-") and f.object == "file"
    assert (f.bytes, f.filename, f.purpose, f.status) == (
        len(DATA),
        "requests.jsonl",
        "batch",
        "processed",
    )
    assert abs(f.created_at - __import__("time").time()) < 60
    assert (settings.files_dir() / f.id).read_bytes() == DATA
    assert leftovers(settings) == [f.id]  # no temporary file left behind
    # The database holds the file's description, not its bytes.
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM files")).mappings().one()
    engine.dispose()
    assert set(row) == {"id", "owner", "filename", "purpose", "bytes", "created_at", "expires_at"}
    assert {
        c["name"] for c in inspect(create_engine(settings.database_url)).get_columns("files")
    } == set(row)


def test_retrieve_content_list_delete(client, settings):
    a = client.files.create(file=("a.jsonl", DATA), purpose="batch")
    b = client.files.create(file=("b.jsonl", b"{}\n"), purpose="batch")
    assert client.files.retrieve(a.id) == a
    assert client.files.content(a.id).content == DATA

    listed = client.files.list()
    assert [f.id for f in listed.data] == [b.id, a.id]  # newest first
    page = client.files.list(limit=1)
    assert [f.id for f in page.data] == [b.id] and page.has_more
    assert [f.id for f in client.files.list(limit=1, after=b.id).data] == [a.id]
    assert [f.id for f in client.files.list(order="asc")] == [a.id, b.id]
    assert list(client.files.list(purpose="batch_output")) == []
    raw = client.files.with_raw_response.list(limit=1).http_response.json()
    assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == (
        "list", b.id, b.id, True,
    )  # fmt: skip

    deleted = client.files.delete(a.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (a.id, True, "file")
    assert not (settings.files_dir() / a.id).exists()
    with pytest.raises(openai.NotFoundError) as e:
        client.files.retrieve(a.id)
    assert e.value.body == {
        "message": f"No such File object: {a.id}",
        "type": "invalid_request_error",
        "param": "file_id",
        "code": None,
    }
    with pytest.raises(openai.NotFoundError):
        client.files.content(a.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(a.id)


def test_purpose_other_than_batch_is_refused_and_nothing_is_kept(client, settings):
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("a.jsonl", DATA), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"
    assert "purpose 'fine-tune' is not supported" in e.value.body["message"]
    assert leftovers(settings) == []


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"files": {"purpose": (None, "batch")}}, "send the file as the multipart field `file`"),
        ({"files": {"file": ("a.jsonl", b"{}")}}, "purpose is required"),
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, "multipart"),
        ({"files": {"other": ("a.jsonl", b"{}")}, "data": {"purpose": "batch"}}, "unexpected"),
    ],
)
def test_malformed_uploads_get_400_in_openais_shape(http, settings, kwargs, needle):
    r = http.post("/v1/files", **kwargs)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert leftovers(settings) == []


@pytest.fixture
def small(tmp_path: Path, db_url: str):
    settings = Settings(
        data_dir=tmp_path / "small",
        db=db_url,
        ray_dashboard_port=free_port(),
        max_upload_bytes=1000,
    )
    with TestClient(create_app(settings, run_scheduler=False)) as c:
        yield settings, c


def test_upload_over_the_limit_is_413_and_leaves_nothing(small):
    settings, http = small
    r = http.post(
        "/v1/files", files={"file": ("big.jsonl", b"x" * 1001)}, data={"purpose": "batch"}
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "file_too_large"
    assert leftovers(settings) == []
    # Without a Content-Length (chunked), the count while streaming refuses it.
    chunks = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n",
              b"y" * 600, b"y" * 600, b"\r\n--b--\r\n")  # fmt: skip
    r = http.post(
        "/v1/files",
        content=iter(chunks),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413
    assert leftovers(settings) == []
    # At the limit exactly is fine.
    r = http.post("/v1/files", files={"file": ("ok.jsonl", b"x" * 1000)}, data={"purpose": "batch"})
    assert r.status_code == 200 and r.json()["bytes"] == 1000


def test_the_limit_stops_reading_the_stream(tmp_path):
    """The upload is refused as soon as it passes the limit, not after reading it all."""
    from starlette.requests import Request

    consumed = 0
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'

    async def receive():
        nonlocal consumed
        consumed += 1
        body = head if consumed == 1 else b"z" * 1024
        return {"type": "http.request", "body": body, "more_body": consumed < 1000}

    scope = {
        "type": "http",
        "method": "POST",
        "headers": [(b"content-type", b"multipart/form-data; boundary=b")],
    }
    with pytest.raises(UploadTooLarge):
        asyncio.run(receive_upload(Request(scope, receive), tmp_path, max_bytes=10 * 1024))
    assert consumed <= 13  # the head, ten chunks at the limit, the one past it
    assert list(tmp_path.iterdir()) == []


def test_a_key_sees_only_its_own_files(tmp_path, db_url):
    from openai import OpenAI

    settings = Settings(
        data_dir=tmp_path / "data",
        db=db_url,
        api_keys="key-alice,key-bob",
        admin_api_keys="key-admin",
        ray_dashboard_port=free_port(),
    )
    with TestClient(create_app(settings, run_scheduler=False)) as http:

        def as_(key: str) -> OpenAI:
            return OpenAI(
                base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
            )

        alice, bob, admin = as_("key-alice"), as_("key-bob"), as_("key-admin")
        f = alice.files.create(file=("a.jsonl", DATA), purpose="batch")
        assert [x.id for x in alice.files.list()] == [f.id]
        assert list(bob.files.list()) == []
        for call in (bob.files.retrieve, bob.files.content, bob.files.delete):
            with pytest.raises(openai.NotFoundError):
                call(f.id)
        with pytest.raises(openai.NotFoundError):
            bob.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert admin.files.retrieve(f.id).id == f.id
        with pytest.raises(openai.AuthenticationError):
            as_("wrong").files.list()
        r = http.post("/v1/files", files={"file": ("a", b"{}")}, data={"purpose": "batch"})
        assert r.status_code == 401
        assert json.loads(r.text)["detail"].startswith("a valid API key is required")
