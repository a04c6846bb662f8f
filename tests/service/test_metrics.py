"""Observability on a real database: the live job resource, ``/metrics``, the dashboard's
auth, with the scheduler driven pass by pass.

Ray's Jobs API is the in-memory cluster of ``test_scheduler`` (the seam the scheduler
talks through); the progress snapshot is made by the pipeline's own ``ProgressTracker``
and accumulators from a batch of output rows, and written with the driver's own
``StatusFile``, so every key the service passes on is one the pipeline really reports.
The same claims on the real Ray and vLLM are in ``test_dashboard_e2e``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from llm_batch.pipeline.accumulators import AccumulatorSet, BatchView, JobContext
from llm_batch.pipeline.driver import StatusFile
from llm_batch.pipeline.progress import ProgressTracker
from llm_batch.service.app import create_app
from llm_batch.service.process import free_port
from llm_batch.service.scheduler import status_uri
from llm_batch.service.settings import Settings
from tests.service.test_scheduler import InMemoryRay, queue

CHOICES = ("positive", "negative")
ENGINE = {"actor_id": "actor-1", "node_id": "node-1"}


def live_snapshot(*, rows_total: int = 10) -> dict[str, Any]:
    """What a running job's driver reports after two batches of four rows."""
    context = JobContext(label_column="label", choices=CHOICES)
    tracker = ProgressTracker(rows_total=rows_total, models=[None], job=context)
    accumulators = AccumulatorSet(context)
    for load in (
        {"running": 4, "waiting": 2, "kv_cache_usage": 0.5, "ttft_sum": 0.2, "ttft_count": 4},
        {"running": 3, "waiting": 0, "kv_cache_usage": 0.25, "ttft_sum": 0.6, "ttft_count": 4},
    ):
        table = pa.table(
            {
                "generated_text": ["positive", "negative", "positive", None],
                "num_input_tokens": pa.array([5, 6, 7, None], pa.int32()),
                "num_output_tokens": pa.array([2, 2, 3, None], pa.int32()),
                "finish_reason": ["stop", "stop", "length", None],
                "error": [None, None, None, "prompt too long"],
                "label": ["positive", "positive", "positive", "negative"],
            }
        )
        partial = accumulators.update(
            BatchView(table, pa.array([0.1, 0.2, 0.3, None], pa.float64()), None)
        )
        tracker.report(
            model=None,
            rows=4,
            failed=1,
            input_tokens=18,
            output_tokens=7,
            seconds=0.5,
            metrics=partial,
            engine={**ENGINE, **load},
        )
    return tracker.snapshot()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        db=db_url,
        progress_interval=0,
        ray_dashboard_port=free_port(),
        storage_roots=str(tmp_path),
    )


@pytest.fixture
def ray() -> InMemoryRay:
    return InMemoryRay()


@pytest.fixture
def client(settings: Settings, ray: InMemoryRay) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_scheduler=False, jobs_api=ray)) as c:
        yield c


def scheduler_pass(client: TestClient) -> None:
    client.app.state.service.scheduler.run_once()  # type: ignore[attr-defined]


def running_job(client: TestClient, settings: Settings, ray: InMemoryRay) -> str:
    """A job the scheduler follows as running, whose driver has reported ``live_snapshot``."""
    store = client.app.state.service.store  # type: ignore[attr-defined]
    job_id = queue(store, settings, "labels")
    scheduler_pass(client)
    ray.set(job_id, "RUNNING")
    StatusFile(status_uri(settings, job_id)).write("running", live_snapshot(), force=True)
    scheduler_pass(client)
    return job_id


def scrape(client: TestClient, **headers: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` parsed by prometheus_client's own parser: sample name → (labels, value)."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict, metric: str, **labels: str) -> float:
    found = [v for got, v in samples.get(metric, []) if labels.items() <= got.items()]
    assert len(found) == 1, (metric, labels, samples.get(metric))
    return found[0]


# -- the job resource ------------------------------------------------------------------


def test_a_running_job_shows_its_live_metrics(client, settings, ray):
    job_id = running_job(client, settings, ray)
    progress = client.get(f"/v1/jobs/{job_id}").json()["progress"]
    assert (progress["rows_total"], progress["rows_done"], progress["rows_failed"]) == (10, 8, 2)
    assert progress["eta_seconds"] is not None and progress["eta_seconds"] >= 0
    assert progress["elapsed_seconds"] >= 0
    assert progress["series"] and progress["series"][-1]["rows_done"] == 8
    assert progress["models"]["default"]["output_tokens"] == 14
    engine = progress["engines"][0]
    assert (engine["actor_id"], engine["node_id"], engine["rows"]) == ("actor-1", "node-1", 8)
    # The engine's load: levels as of its last report, time-to-first-token sums added up.
    assert (engine["running"], engine["waiting"], engine["kv_cache_usage"]) == (3, 0, 0.25)
    assert engine["ttft_count"] == 8 and engine["ttft_sum"] == pytest.approx(0.8)
    metrics = progress["metrics"]["default"]
    assert metrics["token_usage"]["output_tokens"] == 14
    assert metrics["finish_reasons"] == {"length": 2, "stop": 4}
    assert metrics["errors"]["count"] == 2
    assert metrics["latency"]["count"] == 6 and metrics["latency"]["p50_s"] > 0
    labels = metrics["labels"]
    assert labels["accuracy"] == pytest.approx(4 / 8)
    assert labels["confusion_matrix"]["labels"] == ["negative", "positive"]
    assert labels["confusion_matrix"]["predicted"] == ["negative", "positive", "(empty or error)"]
    assert labels["confusion_matrix"]["matrix"] == [[0, 0, 2], [2, 4, 0]]


def test_a_queued_job_shows_only_the_counts(client, settings):
    store = client.app.state.service.store
    job_id = queue(store, settings)
    progress = client.get(f"/v1/jobs/{job_id}").json()["progress"]
    assert set(progress) == {
        "rows_total", "rows_done", "rows_failed", "output_tokens", "rows_per_second",
    }  # fmt: skip


def test_the_openapi_schema_documents_the_live_fields(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobProgress"]
    assert {"eta_seconds", "series", "models", "engines", "metrics"} <= set(schema["properties"])


# -- /metrics ---------------------------------------------------------------------------


def test_jobs_by_status_and_queue_depth(client, settings):
    store = client.app.state.service.store
    for _ in range(2):
        queue(store, settings)
    samples = scrape(client)
    assert value(samples, "llm_batch_jobs", status="queued") == 2
    assert value(samples, "llm_batch_jobs", status="running") == 0
    assert value(samples, "llm_batch_queue_depth") == 2
    assert value(samples, "llm_batch_database_up") == 1


def test_per_job_and_per_model_series_of_a_running_job(client, settings, ray):
    job_id = running_job(client, settings, ray)
    s = scrape(client)
    job, model = {"job_id": job_id}, {"job_id": job_id, "model": "default"}
    assert value(s, "llm_batch_job_info", **job, name="labels", status="running") == 1
    assert value(s, "llm_batch_job_model_info", **model, path="m") == 1
    assert value(s, "llm_batch_job_input_rows", **job) == 10
    assert value(s, "llm_batch_job_rows_done", **job) == 8
    assert value(s, "llm_batch_job_progress_ratio", **job) == pytest.approx(0.8)
    assert value(s, "llm_batch_job_eta_seconds", **job) >= 0
    assert value(s, "llm_batch_rows_done_total", **model) == 8
    assert value(s, "llm_batch_rows_failed_total", **model) == 2
    assert value(s, "llm_batch_output_tokens_total", **model) == 14
    assert value(s, "llm_batch_input_tokens_total", **model) == 36
    assert value(s, "llm_batch_finish_reasons_total", **model, reason="length") == 2
    assert value(s, "llm_batch_label_accuracy", **model) == pytest.approx(0.5)
    assert value(s, "llm_batch_generation_latency_seconds_count", **model) == 6
    assert value(s, "llm_batch_generation_latency_seconds_sum", **model) == pytest.approx(1.2)
    p50 = value(s, "llm_batch_generation_latency_seconds", **model, quantile="0.5")
    assert p50 == pytest.approx(0.2, rel=0.02)
    assert value(s, "llm_batch_job_engines", **model) == 1
    engine = {**model, **ENGINE}
    assert value(s, "llm_batch_engine_requests_running", **engine) == 3
    assert value(s, "llm_batch_engine_requests_waiting", **engine) == 0
    assert value(s, "llm_batch_engine_kv_cache_usage_ratio", **engine) == 0.25
    assert value(s, "llm_batch_engine_time_to_first_token_seconds_count", **model) == 8
    # Service-wide throughput sums the running jobs' own.
    assert value(s, "llm_batch_output_tokens_per_second") == value(
        s, "llm_batch_job_output_tokens_per_second", **job
    )


def test_a_job_that_ends_is_timed_and_stays_while_recent(client, settings, ray):
    job_id = running_job(client, settings, ray)
    ray.set(job_id, "SUCCEEDED")
    scheduler_pass(client)
    s = scrape(client)
    assert value(s, "llm_batch_job_duration_seconds_count", status="succeeded") == 1
    assert value(s, "llm_batch_job_info", job_id=job_id, status="succeeded") == 1
    assert value(s, "llm_batch_rows_done_total", job_id=job_id, model="default") == 8
    # The engines are gone with the job: their load is not reported as if current.
    assert "llm_batch_engine_requests_running" not in s
    scheduler_pass(client)  # a later pass does not end it twice
    assert value(scrape(client), "llm_batch_job_duration_seconds_count", status="succeeded") == 1


def test_ended_jobs_leave_after_the_window(tmp_path, db_url, settings, ray):
    short = settings.model_copy(update={"metrics_finished_window": 0.0})
    with TestClient(create_app(short, run_scheduler=False, jobs_api=ray)) as client:
        job_id = running_job(client, short, ray)
        assert "llm_batch_job_info" in scrape(client)
        ray.set(job_id, "FAILED", logs="boom")
        scheduler_pass(client)
        s = scrape(client)
    assert value(s, "llm_batch_jobs", status="failed") == 1  # counted, but no own series
    assert "llm_batch_job_info" not in s and "llm_batch_rows_done_total" not in s


def test_request_latency_is_labelled_by_route_template(client):
    client.get("/v1/jobs/job_0123456789abcdef01234567")  # 404
    client.get("/v1/jobs")
    client.get("/no/such/page/42")
    s = scrape(client)
    routes = {labels["route"] for labels, _ in s["llm_batch_http_request_duration_seconds_count"]}
    assert {"/v1/jobs/{job_id}", "/v1/jobs", "unmatched"} <= routes
    assert not any("0123456789" in r or "/no/such" in r for r in routes)
    assert (
        value(
            s,
            "llm_batch_http_request_duration_seconds_count",
            method="GET",
            route="/v1/jobs/{job_id}",
            code="404",
        )
        == 1
    )


# -- keys -------------------------------------------------------------------------------


@pytest.fixture
def keyed(settings, ray) -> Iterator[TestClient]:
    locked = settings.model_copy(update={"api_keys": "key-alice", "admin_api_keys": "key-ops"})
    with TestClient(create_app(locked, run_scheduler=False, jobs_api=ray)) as c:
        yield c


def test_metrics_need_an_admin_key_when_keys_are_configured(keyed):
    assert keyed.get("/metrics").status_code == 401
    plain = keyed.get("/metrics", headers={"Authorization": "Bearer key-alice"})
    assert plain.status_code == 403 and "admin" in plain.json()["detail"]
    assert (
        "llm_batch_jobs" in keyed.get("/metrics", headers={"Authorization": "Bearer key-ops"}).text
    )


def test_the_dashboard_page_is_served_without_a_key(keyed):
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/v1/jobs").status_code == 401  # what the page calls still needs one
