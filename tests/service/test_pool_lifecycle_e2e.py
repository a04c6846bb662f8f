"""An engine pool's life in a service on a multi-node cluster with a logical GPU: started
on first use, released for a job of another model that needs the GPU it holds while
idle, and released after ``LLM_BATCH_ENGINE_IDLE_SECONDS`` without requests.

The cluster (``gpu_cluster.py``) runs in a process of its own: a CPU-only head with
Ray's Jobs API and one node with one GPU; both models ask for a GPU (``device: gpu``,
the CPU engine holding a logical GPU), so only one pool fits at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

ROOT = Path(__file__).resolve().parents[2]
IDLE_SECONDS = 60


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.service.gpu_cluster"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = ""
    deadline = time.monotonic() + 180
    while not line.startswith("GPU-CLUSTER ") and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail("the cluster did not start")
    dashboard = json.loads(line.removeprefix("GPU-CLUSTER "))["dashboard"]
    try:
        yield dashboard
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            import os
            import signal

            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def service(cluster: str, tmp_path_factory, tiny_model: Path, tiny_model_b: Path):
    from llm_batch.service.process import ServiceProcess

    folder = tmp_path_factory.mktemp("lifecycle")
    engine = "{max_model_len: 512, enforce_eager: true, dtype: bfloat16}"
    (folder / "models.yaml").write_text(
        f"first:\n  path: {tiny_model}\n  device: gpu\n  engine: {engine}\n"
        f"second:\n  path: {tiny_model_b}\n  device: gpu\n  engine: {engine}\n"
    )
    svc = ServiceProcess(
        folder / "data",
        env={
            "RAY_ADDRESS": cluster,
            "LLM_BATCH_SHARED_ROOTS": "/",
            "LLM_BATCH_MODELS": str(folder / "models.yaml"),
            "LLM_BATCH_STORAGE_ROOTS": str(tmp_path_factory.getbasetemp()),
            "LLM_BATCH_ENGINE_IDLE_SECONDS": str(IDLE_SECONDS),
            "VLLM_LOGGING_LEVEL": "WARNING",
        },
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def run(service, input_path: Path, model: str) -> dict[str, Any]:
    body = {
        "name": model,
        "input": {"path": str(input_path)},
        "prompt": {"template": "{{ text }}:"},
        "model": model,
        "sampling": {"max_tokens": 4, "ignore_eos": True},
        "carryover": ["id"],
    }
    r = httpx.post(f"{service.url}/v1/jobs", json=body, timeout=60)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = httpx.get(f"{service.url}/v1/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", job["error"]
            return dict(job)
        time.sleep(0.5)
    pytest.fail(f"{model} job did not end: {job}\n{diagnosis(service, job_id)}")


def diagnosis(service, job_id: str) -> str:
    """What a failure report needs: the pools, the engine host's state and logs' ends."""
    parts = [f"engines: {engines(service)}", f"service log:\n{service.log_tail(60)}"]
    for path in sorted(service.data_dir.rglob("*")):
        if path.is_file() and (path.name in ("state.json", "status.json") or path.suffix == ".log"):
            tail = path.read_text(errors="replace")[-3000:]
            parts.append(f"--- {path.relative_to(service.data_dir)}:\n{tail}")
    try:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(service.extra_env["RAY_ADDRESS"])
        for info in client.list_jobs():
            logs = client.get_job_logs(info.submission_id)[-3000:] if info.submission_id else ""
            parts.append(f"--- ray job {info.submission_id} {info.status}:\n{logs}")
    except Exception as exc:  # a diagnosis never hides the failure it reports
        parts.append(f"(ray jobs unavailable: {exc!r})")
    return "\n".join(parts)


def engines(service) -> dict[str, Any]:
    return dict(httpx.get(f"{service.url}/v1/engines", timeout=30).json())


def wait_pools(service, done, *, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = engines(service)
        if done(current):
            return current
        time.sleep(1)
    pytest.fail(f"the pools never got there: {current}")


def test_idle_pools_give_way_to_a_model_that_needs_their_gpu_then_are_released(service, tmp_path):
    pq.write_table(pa.table({"id": list(range(8)), "text": ["x"] * 8}), tmp_path / "in.parquet")

    run(service, tmp_path / "in.parquet", "first")
    # Idle (its job detached), still up.
    now = wait_pools(
        service,
        lambda e: (
            [(p["model"], p["state"], p["jobs"]) for p in e["data"]] == [("first", "running", [])]
        ),
        timeout=60,
    )
    (first,) = now["data"]

    # The GPU is the first pool's: the second model's job gets it by that pool's release
    # for the GPU (not by its idle time, whose release would say "unused").
    run(service, tmp_path / "in.parquet", "second")
    now = engines(service)
    assert [p["model"] for p in now["data"]] == ["second"]
    (why,) = [r["why"] for r in now["released"] if r["pool"] == first["id"]]
    assert "GPU" in why and "needed by" in why

    # Unused, the second pool goes after its idle time.
    released = wait_pools(service, lambda e: not e["data"], timeout=IDLE_SECONDS + 120)
    (why,) = [r["why"] for r in released["released"] if r["pool"] != first["id"]]
    assert why.startswith("unused for ")
