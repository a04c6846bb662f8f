"""Several keys on one service, through the API (no engine): each key's own folder and
uploads, roots granted per key, datasets by upload, webhooks allowed per host,
retention's refusals, usage per key, and the retention sweep's rules."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from llm_batch.service.app import create_app
from llm_batch.service.errors import SettingsError
from llm_batch.service.process import free_port
from llm_batch.service.settings import KeyGrant, Settings
from llm_batch.service.webhooks import sign

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def settings_for(tmp_path: Path, db_url: str, **extra: Any) -> Settings:
    (tmp_path / "team-a").mkdir(exist_ok=True)
    keys = tmp_path / "keys"
    keys.write_text(
        f"key-a roots={tmp_path / 'team-a'}  # team A's own folder\nkey-b\nkey-admin admin\n"
    )
    return Settings(
        data_dir=tmp_path / "data",
        db=db_url,
        api_keys_file=keys,
        ray_dashboard_port=free_port(),
        webhook_secret=SECRET,
        webhook_hosts="127.0.0.1:9",
        **extra,
    )


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return settings_for(tmp_path, db_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_scheduler=False)) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(client: TestClient, key: str, name: str, data: bytes, **fields: str) -> Any:
    return client.post(
        "/v1/files",
        files={"file": (name, data)},
        data={"purpose": "dataset", **fields},
        headers=auth(key),
    )


def job(**fields: Any) -> dict[str, Any]:
    return {
        "name": "t",
        "prompt": {"template": "Review: {{ text }}"},
        "model": {"path": "tiny-hub-id", "engine": {"max_model_len": 256}},
        "sampling": {"max_tokens": 4},
        **fields,
    }


def parquet_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "up.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["good", "bad"]}), path)
    return path.read_bytes()


def test_the_keys_file_grants_roots_per_key_and_names_a_bad_line(tmp_path, db_url):
    settings = settings_for(tmp_path, db_url)
    keys = settings.keys()
    assert keys["key-a"] == KeyGrant(admin=False, roots=(str(tmp_path / "team-a"),))
    assert keys["key-b"] == KeyGrant() and keys["key-admin"].admin
    assert settings.api_keys_file is not None
    settings.api_keys_file.write_text("key-a\nkey-c readonly\n")
    with pytest.raises(SettingsError, match=r"keys:2: unknown word 'readonly'"):
        settings.keys()


def test_a_dataset_upload_runs_as_a_job_in_the_keys_own_folder(client, settings, tmp_path):
    r = upload(client, "key-a", "reviews.parquet", parquet_bytes(tmp_path))
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    assert r.json()["purpose"] == "dataset"
    r = client.post("/v1/jobs", json=job(input={"file_id": file_id}), headers=auth("key-a"))
    assert r.status_code == 201, r.text
    created = r.json()
    out = Path(created["output"]["path"])  # <data>/keys/<key id>/outputs/<job id>
    assert out.parent.name == "outputs" and out.parent.parent.parent == settings.data_dir / "keys"
    assert Path(created["spec"]["input"]["path"]).parent == out.parent.parent / "files"
    assert created["spec"]["input"]["format"] == "parquet"
    # The template's columns are checked against the upload, as for a path.
    bad = job(input={"file_id": file_id}, prompt={"template": "{{ missing }}"})
    r = client.post("/v1/jobs", json=bad, headers=auth("key-a"))
    assert r.status_code == 422 and "missing" in r.json()["detail"]


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("x.txt", b"hello", "cannot tell the format"),
        ("x.jsonl", b"[1, 2]\n", "line 1 is not a JSON object"),
        ("x.jsonl", b"{nope\n", "line 1 is not JSON"),
        ("x.parquet", b"PAR1 truncated", "cannot be read"),
    ],
)
def test_an_unusable_dataset_is_refused_at_upload(client, settings, name, data, why):
    r = upload(client, "key-a", name, data)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "file" and why in r.json()["error"]["message"]
    assert not any(settings.data_dir.rglob("file-*"))  # nothing kept


def test_jsonl_and_csv_datasets_are_taken(client):
    for name, data in [("a.jsonl", b'{"text": "x"}\n'), ("a.csv", b"text\nx\n")]:
        r = upload(client, "key-a", name, data)
        assert r.status_code == 200, r.text
        body = job(input={"file_id": r.json()["id"]})
        assert client.post("/v1/jobs", json=body, headers=auth("key-a")).status_code == 201


def test_one_key_cannot_see_or_use_anothers_uploads_jobs_outputs_or_roots(client, tmp_path):
    file_id = upload(client, "key-a", "r.parquet", parquet_bytes(tmp_path)).json()["id"]
    created = client.post(
        "/v1/jobs", json=job(input={"file_id": file_id}), headers=auth("key-a")
    ).json()
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        assert client.get(path, headers=auth("key-b")).status_code == 404
        assert client.get(path, headers=auth("key-admin")).status_code == 200
    r = client.post("/v1/jobs", json=job(input={"file_id": file_id}), headers=auth("key-b"))
    assert r.status_code == 422 and "input.file_id" in r.json()["detail"]
    for path in ("", "/files", "/results"):
        assert (
            client.get(f"/v1/jobs/{created['id']}{path}", headers=auth("key-b")).status_code == 404
        )
    assert client.get("/v1/jobs", headers=auth("key-b")).json()["data"] == []
    # A's output folder and A's upload, named as paths by B: refused before anything is read.
    for body in (
        job(input={"path": created["spec"]["input"]["path"]}),
        job(input={"path": str(tmp_path / "team-a" / "in.parquet")}),
    ):
        r = client.post("/v1/jobs", json=body, headers=auth("key-b"))
        assert r.status_code == 422, r.text
    # Team A's root is A's: a file there runs for A.
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "team-a" / "in.parquet")
    body = job(input={"path": str(tmp_path / "team-a" / "in.parquet")})
    assert client.post("/v1/jobs", json=body, headers=auth("key-a")).status_code == 201
    r = client.post("/v1/jobs", json=body, headers=auth("key-b"))
    assert r.status_code == 422 and "input.path" in r.json()["detail"]


def test_a_webhook_to_a_host_not_allowed_is_refused_at_submission(client, tmp_path):
    file_id = upload(client, "key-a", "r.parquet", parquet_bytes(tmp_path)).json()["id"]
    for url, why in [
        ("http://127.0.0.2:9/hook", "does not call '127.0.0.2:9'"),
        ("http://127.0.0.1:10/hook", "does not call '127.0.0.1:10'"),
        ("ftp://127.0.0.1:9/hook", "expected an http"),
    ]:
        body = job(input={"file_id": file_id}, notify={"url": url})
        r = client.post("/v1/jobs", json=body, headers=auth("key-a"))
        assert r.status_code == 422 and why in r.json()["detail"], r.text
        assert r.json()["detail"].startswith("notify.url")
    body = job(input={"file_id": file_id}, notify={"url": "http://127.0.0.1:9/hook"})
    assert client.post("/v1/jobs", json=body, headers=auth("key-a")).status_code == 201


def test_retain_days_only_for_an_output_the_service_places(client, tmp_path):
    file_id = upload(client, "key-a", "r.parquet", parquet_bytes(tmp_path)).json()["id"]
    named = job(
        input={"file_id": file_id},
        output={"path": str(tmp_path / "team-a" / "out"), "retain_days": 1},
    )
    r = client.post("/v1/jobs", json=named, headers=auth("key-a"))
    assert r.status_code == 422 and r.json()["detail"].startswith("output.retain_days")
    placed = job(input={"file_id": file_id}, output={"retain_days": 2})
    r = client.post("/v1/jobs", json=placed, headers=auth("key-a"))
    assert r.status_code == 201
    assert r.json()["output"]["expires_at"] is None  # set when the job ends


def test_a_webhook_signature_verifies_with_the_openai_client():
    from openai import OpenAI

    body = json.dumps({"id": "evt_1", "type": "job.succeeded"}).encode()
    stamp = int(dt.datetime.now(dt.UTC).timestamp())
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(SECRET, "evt_1", stamp, body),
    }
    client = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    client.webhooks.verify_signature(body, headers, secret=SECRET)  # raises when wrong
    with pytest.raises(Exception, match="(?i)signature"):
        client.webhooks.verify_signature(body + b" ", headers, secret=SECRET)


def test_usage_counts_a_keys_own_jobs_and_an_admin_sees_all(client, settings, tmp_path):
    from llm_batch.service.store import JobStatus, JobStore

    file_id = upload(client, "key-a", "r.parquet", parquet_bytes(tmp_path)).json()["id"]
    a = client.post("/v1/jobs", json=job(input={"file_id": file_id}), headers=auth("key-a"))
    store = JobStore(settings.database_url)
    counts = {"rows_done": 2, "rows_failed": 0, "input_tokens": 10, "output_tokens": 8}
    store.claim(a.json()["id"], submission_id="s")
    store.finish(a.json()["id"], JobStatus.SUCCEEDED, progress={"models": {"default": counts}})
    store.close()
    mine = client.get("/v1/usage", headers=auth("key-a")).json()["data"]
    assert [
        (u["model"], u["jobs"], u["rows"], u["input_tokens"], u["output_tokens"]) for u in mine
    ] == [("tiny-hub-id", 1, 2, 10, 8)]
    assert client.get("/v1/usage", headers=auth("key-b")).json()["data"] == []
    assert client.get("/v1/usage", headers=auth("key-admin")).json()["data"] == mine


def test_the_sweep_deletes_only_what_the_manifest_lists(settings, tmp_path):
    from llm_batch.pipeline.manifest import Manifest, new_run_id, part_name
    from llm_batch.service.retention import RetentionSweep
    from llm_batch.service.store import JobStatus, JobStore

    store = JobStore(settings.database_url)
    store.create_schema()
    out = settings.outputs_dir("owner") / "job_1"
    out.mkdir(parents=True)
    run = new_run_id()
    (out / part_name(run, 0)).write_bytes(b"rows")
    (out / "_metrics.json").write_text("{}")
    (out / "notes.txt").write_text("someone else's")
    manifest = Manifest(job="t")
    manifest.add_run(run, "d", ["_metrics.json"])
    manifest.write(str(out))
    store.create(
        job_id="job_1", name="t", spec={}, output_path=str(out), owner="owner",
        retain_seconds=0.001,
    )  # fmt: skip
    store.claim("job_1", submission_id="s")
    assert store.finish("job_1", JobStatus.SUCCEEDED)
    assert store.get("job_1").expires_at is not None
    assert RetentionSweep(store, settings).sweep() == (0, 1)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # not the job's: kept
    assert store.get("job_1").expired_at is not None
    assert RetentionSweep(store, settings).sweep() == (0, 0)  # once
    store.close()


def test_an_idempotency_key_belongs_to_the_api_key_that_sent_it(client, tmp_path):
    file_id = upload(client, "key-a", "r.parquet", parquet_bytes(tmp_path)).json()["id"]
    body = job(input={"file_id": file_id})
    same = {"Idempotency-Key": "nightly-1"}
    first = client.post("/v1/jobs", json=body, headers={**auth("key-a"), **same})
    again = client.post("/v1/jobs", json=body, headers={**auth("key-a"), **same})
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"]
    mine = upload(client, "key-b", "r.parquet", parquet_bytes(tmp_path)).json()["id"]
    other = job(input={"file_id": mine})
    theirs = client.post("/v1/jobs", json=other, headers={**auth("key-b"), **same})
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
