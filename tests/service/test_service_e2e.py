"""The job service end to end: ``llm-batch serve`` on loopback, its own Ray head, the real
vLLM CPU engine, everything over HTTP.

Engines take tens of seconds to start, so one job carries every claim: it is
watched while ``rows_done`` grows, then the service is SIGKILLed mid-run and started
again on the same data folder; the job (which kept running on Ray) must finish with
every input id exactly once, as JSON lines and as Parquet. Cancelling, and the shared
engine pools, are ``test_pools_e2e.py``'s.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e

PARQUET = "application/vnd.apache.parquet"
ROWS = 3000


def job_spec(input_path: Path, model: Path, *, name: str, max_tokens: int) -> dict[str, Any]:
    return {
        "name": name,
        "input": {"path": str(input_path)},
        "prompt": {"template": "Review {{ id }}: {{ text }}\nSentiment:"},
        "model": {
            "path": str(model),
            "engine": {"max_model_len": 512, "enforce_eager": True, "dtype": "bfloat16"},
            "batch_size": 32,
        },
        "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
        "carryover": ["id"],
        # Small files: rows become readable (and cancellable work visible) early.
        "output": {"path": str(input_path.parent / f"out-{name}"), "rows_per_file": 256},
    }


def write_input(path: Path, rows: int) -> Path:
    words = ["good", "bad", "fine", "broken", "great", "slow"]
    texts = [" ".join(words[(i * k) % 6] for k in range(1, 2 + i % 5)) for i in range(rows)]
    pq.write_table(pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts}), path)
    return path


def get(service, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{service.url}/v1/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(service, job_id: str, done, *, timeout: float, every: float = 0.3) -> list[dict]:
    """Poll the job until ``done(job)``; returns every state seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get(service, job_id)
        seen.append(job)
        if done(job):
            return seen
        if job["status"] in ("failed", "cancelled", "succeeded"):
            pytest.fail(f"job ended {job['status']} while waiting: {job['error']}")
        time.sleep(every)
    pytest.fail(f"job {job_id} not there after {timeout}s: {seen[-1] if seen else None}")


@pytest.fixture(scope="module")
def restarted(service, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Submit, watch rows_done grow, SIGKILL the service mid-run, restart it, let the job end."""
    root = tmp_path_factory.mktemp("restart")
    spec = job_spec(
        write_input(root / "in.parquet", ROWS), tiny_model, name="restart", max_tokens=8
    )
    r = httpx.post(f"{service.url}/v1/jobs", json=spec, timeout=60)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    def grew(job: dict) -> bool:
        done = sorted({s["progress"]["rows_done"] for s in seen_so_far + [job]} - {0})
        seen_so_far.append(job)
        return len(done) >= 2

    seen_so_far: list[dict] = []
    before_kill = wait_for(service, job_id, grew, timeout=400)
    service.kill()
    try:
        killed_at = time.monotonic()
        service.start()
        restart_seconds = time.monotonic() - killed_at
    finally:
        if service.proc is None or service.proc.poll() is not None:
            service.start()
    after = wait_for(service, job_id, lambda j: j["status"] == "succeeded", timeout=400)
    return {
        "id": job_id,
        "submitted": r.json(),
        "before_kill": before_kill,
        "final": after[-1],
        "restart_seconds": restart_seconds,
    }


def test_rows_done_grows_while_the_job_runs(restarted):
    running = [j for j in restarted["before_kill"] if j["status"] == "running"]
    done = [j["progress"]["rows_done"] for j in running]
    assert done == sorted(done)
    assert len({d for d in done if 0 < d < ROWS}) >= 2, done
    assert running[-1]["started_at"] is not None
    assert running[-1]["progress"]["rows_total"] == ROWS


def test_job_survives_a_sigkill_of_the_service(restarted):
    final = restarted["final"]
    assert final["status"] == "succeeded", final["error"]
    assert final["error"] is None
    # Followed, not started again: the run that was under way when the service died.
    assert final["started_at"] == restarted["before_kill"][-1]["started_at"]
    assert final["finished_at"] >= final["started_at"]
    assert final["progress"]["rows_done"] == ROWS
    assert final["progress"]["rows_failed"] == 0
    assert final["progress"]["output_tokens"] == ROWS * 8
    assert restarted["restart_seconds"] < 120


def test_results_as_json_lines_one_row_per_input_id(service, restarted):
    with httpx.stream("GET", f"{service.url}/v1/jobs/{restarted['id']}/results", timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        rows = [json.loads(line) for line in r.iter_lines() if line]
    assert sorted(row["id"] for row in rows) == list(range(ROWS))
    assert all(row["error"] is None and row["num_output_tokens"] == 8 for row in rows)
    assert all(isinstance(row["generated_text"], str) for row in rows)


def test_results_as_parquet_one_row_per_input_id(service, restarted):
    r = httpx.get(
        f"{service.url}/v1/jobs/{restarted['id']}/results",
        headers={"Accept": PARQUET},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == PARQUET
    table = pq.read_table(io.BytesIO(r.content))
    assert sorted(table.column("id").to_pylist()) == list(range(ROWS))
    assert {"generated_text", "num_output_tokens", "finish_reason", "error"} <= set(
        table.column_names
    )


def test_the_job_is_listed_as_succeeded(service, restarted):
    page = httpx.get(f"{service.url}/v1/jobs", params={"status": "succeeded"}, timeout=30).json()
    assert restarted["id"] in [j["id"] for j in page["data"]]
    ready = httpx.get(f"{service.url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
