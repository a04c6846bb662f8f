"""``POST /v1/jobs/{id}/retry`` end to end on the real service, Ray and vLLM CPU engine: a job
whose long prompts failed under a small ``max_model_len`` is retried with a larger one; its
output then holds every input row exactly once, none with an error, the other rows as the
first run wrote them. The job is large enough for a driver of its own, so the retry is a
Ray submission of its own (``<job id>-retry-1``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e

ROWS = 600  # above the service's small-job size: a driver of its own
LONG = {7, 301, 599}


def body(root: Path, model: Path, max_model_len: int) -> dict[str, Any]:
    return {
        "name": "retry",
        "input": {"path": str(root / "in.parquet")},
        "prompt": {"template": "{{ text }}"},
        "model": model_block(model, max_model_len),
        "sampling": {"max_tokens": 4},
        "carryover": ["id"],
        "output": {"path": str(root / "out")},
    }


def model_block(model: Path, max_model_len: int) -> dict[str, Any]:
    return {
        "path": str(model),
        "engine": {"max_model_len": max_model_len, "enforce_eager": True, "dtype": "bfloat16"},
        "batch_size": 64,
    }


def ended(url: str, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not end in {timeout}s")


def rows(url: str, job_id: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{url}/v1/jobs/{job_id}/results",
        headers={"Accept": "application/vnd.apache.parquet"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return sorted(pq.read_table(pa.BufferReader(r.content)).to_pylist(), key=lambda r: r["id"])


def test_retry_runs_the_failed_rows_again_with_a_changed_engine(service, tiny_model, tmp_path):
    url = service.url
    texts = [
        " ".join(["a long prompt"] * 60) if i in LONG else f"Review {i}: fine" for i in range(ROWS)
    ]
    pq.write_table(pa.table({"id": list(range(ROWS)), "text": texts}), tmp_path / "in.parquet")
    r = httpx.post(f"{url}/v1/jobs", json=body(tmp_path, tiny_model, 96), timeout=60)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    # Not before it has ended.
    early = httpx.post(f"{url}/v1/jobs/{job_id}/retry", timeout=30)
    assert early.status_code == 409, early.text
    assert "can be retried once it has ended" in early.json()["detail"]

    first = ended(url, job_id)
    assert first["status"] == "succeeded", first["error"]
    assert first["progress"]["rows_failed"] == len(LONG)
    before = rows(url, job_id)
    assert {r["id"] for r in before if r["error"]} == LONG

    # A retry takes a changed model block only, and keeps the model's name.
    bad = httpx.post(f"{url}/v1/jobs/{job_id}/retry", json={"prompt": {}}, timeout=30)
    assert bad.status_code == 422, bad.text
    assert bad.json()["detail"].startswith("prompt: a retry takes only `model` or `models`")

    r = httpx.post(
        f"{url}/v1/jobs/{job_id}/retry", json={"model": model_block(tiny_model, 512)}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued"
    assert r.json()["retries"] == 1
    assert r.json()["spec"]["model"]["engine"]["max_model_len"] == 512

    second = ended(url, job_id)
    assert second["status"] == "succeeded", second["error"]
    assert second["progress"]["rows_done"] == ROWS
    assert second["progress"]["rows_failed"] == 0
    after = rows(url, job_id)
    assert [r["id"] for r in after] == list(range(ROWS))  # every row exactly once
    assert all(r["error"] is None and r["generated_text"] is not None for r in after)
    for old, new in zip(before, after, strict=True):
        if old["id"] not in LONG:
            assert new == old

    # Nothing left to retry.
    again = httpx.post(f"{url}/v1/jobs/{job_id}/retry", timeout=30)
    assert again.status_code == 409, again.text
    assert again.json()["detail"] == f"job {job_id} has no rows with errors: nothing to retry"
