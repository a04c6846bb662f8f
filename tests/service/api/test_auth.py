"""API keys: 401 without a valid key, one key cannot see another's jobs, admins see all."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from llm_batch.service.app import create_app
from llm_batch.service.process import free_port
from llm_batch.service.settings import Settings


@pytest.fixture
def client(tmp_path, db_url):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nkey-carol admin\n")
    settings = Settings(
        data_dir=tmp_path / "data",
        db=db_url,
        api_keys="key-alice, key-bob",
        api_keys_file=keys,
        ray_dashboard_port=free_port(),
        storage_roots=str(tmp_path),
    )
    with TestClient(create_app(settings, run_scheduler=False)) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(client, key: str, job_body) -> str:
    r = client.post("/v1/jobs", json=job_body, headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/v1/jobs"),
        ("get", "/v1/jobs/job_x"),
        ("post", "/v1/jobs/job_x/cancel"),
        ("get", "/v1/jobs/job_x/results"),
        ("post", "/v1/jobs"),
        ("get", "/readyz"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "key-alice"},
        {"Authorization": "Basic a2V5LWFsaWNlOg=="},
    ],
)
def test_every_route_but_healthz_needs_a_valid_key(client, method, path, headers):
    r = getattr(client, method)(path, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "API key" in r.json()["detail"]


def test_healthz_needs_no_key(client):
    assert client.get("/healthz").status_code == 200


def test_one_key_cannot_read_anothers_jobs(client, job_body):
    alice = submit(client, "key-alice", job_body)
    bob = submit(client, "key-bob", job_body)
    assert client.get(f"/v1/jobs/{alice}", headers=auth("key-alice")).status_code == 200
    for path in (f"/v1/jobs/{alice}", f"/v1/jobs/{alice}/results"):
        assert client.get(path, headers=auth("key-bob")).status_code == 404
    assert client.post(f"/v1/jobs/{alice}/cancel", headers=auth("key-bob")).status_code == 404
    listed = [j["id"] for j in client.get("/v1/jobs", headers=auth("key-bob")).json()["data"]]
    assert listed == [bob]
    # The admin key sees both.
    everyone = client.get("/v1/jobs", headers=auth("key-carol")).json()["data"]
    assert {j["id"] for j in everyone} == {alice, bob}


def test_keys_never_stored(client, job_body, tmp_path):
    job = submit(client, "key-alice", job_body)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"key-alice" not in f.read_bytes(), f
    assert "key-alice" not in str(client.get(f"/v1/jobs/{job}", headers=auth("key-alice")).json())


def test_a_key_cannot_point_a_job_at_the_service_data(client, job_body, tmp_path):
    alice = submit(client, "key-alice", job_body)
    theirs = tmp_path / "data" / "outputs" / alice
    theirs.mkdir(parents=True, exist_ok=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1], "text": ["secret"]}), theirs / "x.parquet")
    for field in ("input", "output"):
        body = {**job_body, field: {"path": str(theirs / "x.parquet")}}
        r = client.post("/v1/jobs", json=body, headers=auth("key-bob"))
        assert r.status_code == 422, r.text
        assert f"{field}.path" in r.json()["detail"]
        assert "data directory" in r.json()["detail"]
