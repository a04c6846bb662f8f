"""Fixtures of the OpenAI-compatible API's tests.

Unit tests drive the real app (real database, real files on disk) with the real
``openai`` client through FastAPI's ``TestClient``; the scheduler is off, so jobs
stay queued and a test plays the pipeline's part by writing the Parquet rows a job
would have written (``finish_job``), then lets the batch runner take a step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from llm_batch.pipeline.manifest import Manifest
from llm_batch.service.app import create_app
from llm_batch.service.process import free_port
from llm_batch.service.settings import Settings
from llm_batch.service.store import Job, JobStatus, JobStore

GUIDE_SYSTEM = "You are a helpful assistant."


def chat_line(custom_id: str, content: str = "Hello world!", **body: Any) -> dict[str, Any]:
    """A line of OpenAI's Batch guide example (the model name changed)."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": GUIDE_SYSTEM},
                {"role": "user", "content": content},
            ],
            "max_tokens": 1000,
            **body,
        },
    }


def completion_line(custom_id: str, prompt: str = "Once upon", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": prompt, "max_tokens": 8, **body},
    }


def jsonl(lines: list[Any]) -> bytes:
    return "".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines
    ).encode()


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    # Hub ids: never loaded here (the scheduler is off), and not checked for a folder.
    path = tmp_path / "models.yaml"
    path.write_text(
        "tiny:\n  path: tiny-hub-id\n  engine: {max_model_len: 256}\n"
        "other:\n  path: other-hub-id\n  engine: {max_model_len: 256}\n"
    )
    return path


@pytest.fixture
def settings(tmp_path: Path, db_url: str, models_file: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", db=db_url, models=models_file, ray_dashboard_port=free_port()
    )


@pytest.fixture
def app(settings: Settings):
    return create_app(settings, run_scheduler=False)


@pytest.fixture
def http(app) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def client(http: TestClient):
    from openai import OpenAI

    return OpenAI(base_url="http://testserver/v1", api_key="any", http_client=http, max_retries=0)


@pytest.fixture
def runner(app):
    return app.state.openai.runner


@pytest.fixture
def store(app) -> JobStore:
    return app.state.service.store


def submit(client, lines: list[Any], *, endpoint: str = "/v1/chat/completions", **kwargs: Any):
    """Upload ``lines`` and create a batch on them."""
    f = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kwargs
    )


def batch_jobs(app, batch_id: str) -> list[Job]:
    row = app.state.openai.batches.get_batch(batch_id)
    return [app.state.service.store.get(run["job_id"]) for run in row.jobs or []]


def finish_job(
    store: JobStore,
    job: Job,
    *,
    errors: dict[str, str] | None = None,
    only: set[str] | None = None,
    status: JobStatus = JobStatus.SUCCEEDED,
    text: str = "Hi there",
) -> None:
    """Write the output rows the pipeline would write for ``job`` (every request, or
    those in ``only``; ``errors`` maps a custom_id to its row error) and end the job."""
    errors = errors or {}
    spec = job.spec
    n = spec["sampling"]["n"]
    k = spec["sampling"]["logprobs"]
    ids = pq.read_table(spec["input"]["path"], columns=["custom_id"]).column(0).to_pylist()
    rows = []
    for row_id, custom_id in enumerate(ids):
        if only is not None and custom_id not in only:
            continue
        for sample in range(n):
            error = errors.get(custom_id)
            row: dict[str, Any] = {"row_id": row_id, "custom_id": custom_id}
            if n > 1:
                row["sample_index"] = sample
            row.update(
                generated_text=None if error else f"{text} {sample}",
                num_input_tokens=None if error else 7,
                num_output_tokens=None if error else 3,
                finish_reason=None if error else "length",
                error=error,
            )
            if k is not None:
                top = [{"token": "Hi", "logprob": -0.5}] * k
                steps = [{"token": t, "logprob": -0.5, "top_logprobs": top} for t in ("Hi", " x")]
                row["logprobs"] = None if error else steps
            rows.append(row)
    out = Path(job.output_path)
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        pq.write_table(pa.Table.from_pylist(rows), out / "part-000000000000-000000.parquet")
        Manifest("test", files=["part-000000000000-000000.parquet"]).write(str(out))
    assert store.finish(
        job.id, status, from_statuses=("queued", "running", "cancelling", "cancelled")
    )
