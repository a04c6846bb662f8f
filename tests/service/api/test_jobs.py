"""``/v1/jobs``: validation before acceptance, idempotency, pagination, cancel, results."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from llm_batch.pipeline.manifest import Manifest
from llm_batch.service.app import create_app
from llm_batch.service.settings import Settings
from llm_batch.service.store import JobStatus, JobStore

PARQUET = "application/vnd.apache.parquet"


def submit(client: TestClient, body: dict, **headers: str):
    return client.post("/v1/jobs", json=body, headers=headers)


def test_submit_returns_the_persisted_job(client, job_body, settings):
    r = submit(client, job_body)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("job_")
    assert job["name"] == "reviews" and job["status"] == "queued"
    assert job["created_at"] and job["started_at"] is None and job["finished_at"] is None
    assert job["progress"] == {
        "rows_total": 3, "rows_done": 0, "rows_failed": 0, "output_tokens": 0,
        "rows_per_second": 0.0,
    }  # fmt: skip
    assert job["output"]["path"] == str(settings.outputs_dir() / job["id"])
    assert job["output"]["results_url"] == f"/v1/jobs/{job['id']}/results"
    assert job["error"] is None
    # Persisted: a second app on the same database sees it.
    with TestClient(create_app(settings, run_scheduler=False)) as other:
        assert other.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def test_spec_is_stored_validated_with_defaults(client, job_body):
    job = submit(client, job_body).json()
    spec = job["spec"]
    assert spec["sampling"]["temperature"] == 0.0  # a default filled in
    assert spec["input"]["path"] == job_body["input"]["path"]
    # The service picks the output folder, and the spec says which.
    assert spec["output"]["path"] == job["output"]["path"]
    assert job["output"]["expires_at"] is None  # kept: no retention configured


def test_an_output_path_given_is_kept(client, job_body, tmp_path):
    job = submit(client, {**job_body, "output": {"path": str(tmp_path / "mine")}}).json()
    assert job["output"]["path"] == str(tmp_path / "mine")


def test_relative_input_path_is_resolved_against_the_service_directory(
    client, job_body, reviews, monkeypatch
):
    monkeypatch.chdir(reviews.parent)
    job = submit(client, {**job_body, "input": {"path": reviews.name}}).json()
    assert job["spec"]["input"]["path"] == str(reviews)


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        ({"temprature": 0.5}, "temprature", "unknown field"),
        ({"sampling": {"temprature": 0.5}}, "sampling.temprature", "unknown field"),
        # Outside the storage roots: refused before anything looks at it (no existence
        # oracle); a missing file inside a root is in tests/service/test_hostile.py.
        ({"input": {"path": "/nowhere/in.parquet"}}, "input.path", "outside the storage roots"),
        ({"input": None}, "input", ""),
        ({"prompt": {"template": "{{ body }}"}}, "prompt.template", "'body'"),
        ({"carryover": ["id", "label"]}, "carryover", "'label'"),
        ({"sampling": {"top_p": 1.5}}, "sampling.top_p", "less than or equal to 1"),
        ({"sampling": {"temperature": -1}}, "sampling.temperature", "greater than or equal"),
        ({"sampling": {"max_tokens": 0}}, "sampling.max_tokens", "greater than 0"),
        ({"sampling": {"max_tokens": 300}}, "sampling.max_tokens=300", "max_model_len=256"),
        ({"model": "no-such-model"}, "model", "not a model this service offers"),
        ({"model": None}, "model", ""),
    ],
)
def test_invalid_jobs_get_422_naming_the_field(client, job_body, change, field, needle):
    body = {k: v for k, v in {**job_body, **change}.items() if v is not None}
    r = submit(client, body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    assert field in detail and needle in detail, detail
    assert client.get("/v1/jobs").json()["data"] == []  # nothing was accepted


def test_body_that_is_not_a_json_object_gets_422(client):
    r = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("request body is not valid JSON")
    r = client.post("/v1/jobs", json=[1, 2])
    assert r.status_code == 422
    assert "expected a JSON object" in r.json()["detail"]


def test_service_keeps_serving_after_bad_submissions(client, job_body):
    for _ in range(3):
        assert submit(client, {**job_body, "bogus": 1}).status_code == 422
    assert submit(client, job_body).status_code == 201
    assert client.get("/healthz").json() == {"status": "ok"}


def test_idempotency_key_returns_the_same_job(client, job_body):
    first = submit(client, job_body, **{"Idempotency-Key": "abc"})
    again = submit(client, job_body, **{"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(client.get("/v1/jobs").json()["data"]) == 1
    other = submit(client, job_body, **{"Idempotency-Key": "xyz"})
    assert other.json()["id"] != first.json()["id"]


def test_idempotency_key_reused_for_another_job_is_409(client, job_body):
    submit(client, job_body, **{"Idempotency-Key": "abc"})
    r = submit(client, {**job_body, "name": "other"}, **{"Idempotency-Key": "abc"})
    assert r.status_code == 409
    assert "different job spec" in r.json()["detail"]


def test_unknown_ids_are_404(client):
    for method, url in [
        ("GET", "/v1/jobs/job_nope"),
        ("POST", "/v1/jobs/job_nope/cancel"),
        ("GET", "/v1/jobs/job_nope/results"),
    ]:
        r = client.request(method, url)
        assert r.status_code == 404, url
        assert r.json() == {"detail": "no job with id 'job_nope'"}


def test_list_is_newest_first_with_cursor_pagination(client, job_body):
    ids = [submit(client, {**job_body, "name": f"j{i}"}).json()["id"] for i in range(5)]
    newest_first = ids[::-1]
    seen, after = [], None
    while True:
        params = {"limit": 2} | ({"after": after} if after else {})
        page = client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
        assert after == page["data"][-1]["id"]
    assert seen == newest_first


def test_list_filters_by_status(client, job_body):
    a = submit(client, job_body).json()["id"]
    b = submit(client, job_body).json()["id"]
    client.post(f"/v1/jobs/{a}/cancel")
    assert [j["id"] for j in client.get("/v1/jobs?status=cancelled").json()["data"]] == [a]
    assert [j["id"] for j in client.get("/v1/jobs?status=queued").json()["data"]] == [b]
    r = client.get("/v1/jobs?status=done")
    assert r.status_code == 422 and "status" in r.json()["detail"]


def test_list_with_an_unknown_cursor_is_422(client):
    r = client.get("/v1/jobs?after=job_nope")
    assert r.status_code == 422
    assert r.json()["detail"] == "after: no job with id 'job_nope'"


def test_cancel_a_queued_job(client, job_body):
    job_id = submit(client, job_body).json()["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_cancel_a_finished_job_is_409(client, job_body, settings):
    job_id = submit(client, job_body).json()["id"]
    store = JobStore(settings.database_url)
    store.claim(job_id, submission_id=job_id)
    store.finish(job_id, JobStatus.SUCCEEDED)
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409 and "already ended" in r.json()["detail"]


def test_results_of_a_queued_job_are_409(client, job_body):
    job_id = submit(client, job_body).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}/results")
    assert r.status_code == 409
    assert "written no rows yet" in r.json()["detail"]


@pytest.fixture
def finished_job(client, job_body, settings) -> tuple[str, pa.Table]:
    """A job whose output folder holds two part files, a hidden in-progress file and the
    status file, as the pipeline leaves them."""
    job_id = submit(client, job_body).json()["id"]
    out = settings.outputs_dir() / job_id
    out.mkdir(parents=True)
    table = pa.table(
        {
            "id": pa.array(range(2500), pa.int64()),
            "generated_text": [f"text {i} ünï" for i in range(2500)],
            "blob": pa.array([bytes([i % 256]) for i in range(2500)], pa.binary()),
            "ts": pa.array([i * 1_000_000 for i in range(2500)], pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(table.slice(0, 1500), out / "part-a-000000.parquet")
    pq.write_table(table.slice(1500), out / "part-a-000001.parquet")
    pq.write_table(table.slice(0, 10), out / ".part-a-000002.parquet.inprogress")
    (out / "_status.json").write_text("{}")
    Manifest("test", files=["part-a-000000.parquet", "part-a-000001.parquet"]).write(str(out))
    store = JobStore(settings.database_url)
    store.claim(job_id, submission_id=job_id)
    store.finish(job_id, JobStatus.SUCCEEDED)
    return job_id, table


def test_results_stream_as_json_lines(client, finished_job):
    job_id, table = finished_job
    with client.stream("GET", f"/v1/jobs/{job_id}/results") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        rows = [json.loads(line) for line in r.iter_lines() if line]
    assert sorted(row["id"] for row in rows) == list(range(2500))
    first = next(row for row in rows if row["id"] == 1)
    assert first["generated_text"] == "text 1 ünï"
    assert first["blob"] == "AQ=="  # base64
    assert first["ts"] == "1970-01-01T00:00:01+00:00"


def test_results_as_parquet(client, finished_job):
    job_id, table = finished_job
    r = client.get(f"/v1/jobs/{job_id}/results", headers={"Accept": PARQUET})
    assert r.status_code == 200
    assert r.headers["content-type"] == PARQUET
    got = pq.read_table(io.BytesIO(r.content)).sort_by("id")
    assert got.equals(table)


def test_openapi_documents_the_job_format(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/results", "/healthz", "/readyz",
    }  # fmt: skip
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    job = schema["components"]["schemas"]["JobSpec"]
    assert {"input", "prompt", "model", "sampling", "priority"} <= set(job["properties"])
    assert "SamplingSpec" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_named_models_from_the_models_file(tmp_path: Path, db_url, job_body):
    models = tmp_path / "models.yaml"
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "config.json").write_text("{}")
    models.write_text("small:\n  path: m1\n  engine: {max_model_len: 128}\n")
    settings = Settings(
        data_dir=tmp_path / "data", db=db_url, models=models, storage_roots=str(tmp_path)
    )
    with TestClient(create_app(settings, run_scheduler=False)) as client:
        job = submit(client, {**job_body, "model": "small"}).json()
        assert job["spec"]["model"]["path"] == str(tmp_path / "m1")
        assert job["spec"]["model"]["engine"]["max_model_len"] == 128
        r = submit(client, {**job_body, "model": "large"})
        assert r.status_code == 422
        assert r.json()["detail"] == (
            "model: 'large' is not a model this service offers (offered: small)"
        )
