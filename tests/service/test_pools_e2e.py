"""Engine pools the service shares between jobs, end to end: the session's real service,
its Ray Serve pools and the real vLLM CPU engine.

Whether a job is still running when something happens is never left to speed: the
tests hold what must not move. A large job whose driver is frozen (SIGSTOP) is running
while a small job goes through; a pool whose engine processes are frozen keeps every
job's rows pending while one job is cancelled or its replica is killed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service.holds import driver_process, frozen, pool_processes

pytestmark = pytest.mark.e2e

BIG = 2400  # above the service's small_job_rows: a driver of its own
SMALL = 10


def write_input(path: Path, rows: int) -> Path:
    texts = [f"review {i}: {'good' if i % 3 else 'bad'} item" for i in range(rows)]
    pq.write_table(pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts}), path)
    return path


def job(input_path: Path, name: str, *, max_tokens: int = 8) -> dict[str, Any]:
    return {
        "name": name,
        "input": {"path": str(input_path)},
        "prompt": {"template": "{{ text }}\nSentiment:"},
        "model": "tiny",
        "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
        "carryover": ["id"],
        "output": {"path": str(input_path.parent / f"out-{name}"), "rows_per_file": 200},
        # These tests hold the pool to decide what is running when: every row must go
        # through it, not come from the response cache of an earlier test's same rows.
        "cache": {"mode": "off"},
    }


def submit(service, body: dict[str, Any]) -> str:
    r = httpx.post(f"{service.url}/v1/jobs", json=body, timeout=60)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def get(service, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{service.url}/v1/jobs/{job_id}", timeout=30).json())


def wait(service, job_id: str, done, *, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = get(service, job_id)
        if done(current):
            return current
        time.sleep(0.2)
    pytest.fail(f"job {job_id} never got there: {current}")


def ended(status: str):  # noqa: ANN201
    """A wait condition: the job ended with ``status`` (failing at once on another end)."""

    def check(current: dict[str, Any]) -> bool:
        if current["status"] in ("failed", "cancelled", "succeeded"):
            assert current["status"] == status, f"ended {current['status']}: {current['error']}"
            return True
        return False

    return check


def engines(service) -> list[dict[str, Any]]:
    return list(httpx.get(f"{service.url}/v1/engines", timeout=30).json()["data"])


def rows_of(service, job_id: str) -> list[dict[str, Any]]:
    with httpx.stream("GET", f"{service.url}/v1/jobs/{job_id}/results", timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line) for line in r.iter_lines() if line]


def tiny_pool(service) -> dict[str, Any]:
    pools = [p for p in engines(service) if p["model"] == "tiny"]
    assert len(pools) == 1, pools
    return pools[0]


def wait_in_engine(service, job_ids: set[str], *, timeout: float = 120) -> None:
    """Until each job has requests in the tiny pool's engine."""
    deadline = time.monotonic() + timeout
    while not job_ids <= set(waiting := tiny_pool(service)["requests_by_job"]):
        assert time.monotonic() < deadline, f"requests in the engine: {waiting}"
        time.sleep(0.2)


def test_a_small_job_finishes_beside_a_large_one_in_the_same_pool(service, tmp_path):
    big = submit(service, job(write_input(tmp_path / "big.parquet", BIG), "big"))
    wait(service, big, lambda j: j["progress"]["rows_done"] > 0)
    driver = driver_process(service, big)
    with frozen([driver]):  # the large job cannot end while this holds
        small = submit(service, job(write_input(tmp_path / "small.parquet", SMALL), "small"))
        done = wait(service, small, ended("succeeded"), timeout=120)
        assert get(service, big)["status"] == "running"
        pool = tiny_pool(service)
        assert pool["state"] == "running" and pool["replicas"] == 1
    assert done["progress"]["rows_done"] == SMALL
    assert sorted(r["id"] for r in rows_of(service, small)) == list(range(SMALL))
    wait(service, big, ended("succeeded"))
    ids = [r["id"] for r in rows_of(service, big)]
    assert sorted(ids) == list(range(BIG)), "each row of the large job exactly once"
    # One pool served both: the catalog model's, warm after the jobs (which the engine host
    # detaches on its next pass).
    deadline = time.monotonic() + 60
    while (attached := tiny_pool(service)["jobs"]) != []:
        assert time.monotonic() < deadline, f"jobs still attached: {attached}"
        time.sleep(0.5)


def test_cancelling_one_of_two_jobs_in_a_pool_leaves_the_other_exactly_once(service, tmp_path):
    inputs = [write_input(tmp_path / f"{name}.parquet", BIG) for name in ("a", "b")]
    _, engine = pool_processes(service, tiny_pool(service)["id"])
    # Held from the start: a 2,400-row job ends within seconds on the tiny model, sooner
    # than its progress could be seen and a hold put on.
    with frozen(engine):
        a, b = (submit(service, job(path, path.stem)) for path in inputs)
        wait_in_engine(service, {a, b})  # neither can have finished
        r = httpx.post(f"{service.url}/v1/jobs/{a}/cancel", timeout=30)
        assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
        cancelled = wait(service, a, ended("cancelled"), timeout=120)
    # Its requests never left the held engine: nothing done, nothing written.
    assert cancelled["progress"]["rows_done"] == 0
    r = httpx.get(f"{service.url}/v1/jobs/{a}/results", timeout=60)
    assert r.status_code == 409 and "has written no rows" in r.json()["detail"], r.text

    wait(service, b, ended("succeeded"))
    assert sorted(r["id"] for r in rows_of(service, b)) == list(range(BIG))
    # The cancelled job's requests were aborted in the engine: nothing of it is left there.
    deadline = time.monotonic() + 30
    while tiny_pool(service)["requests"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert tiny_pool(service)["requests"] == 0


def test_a_killed_replica_is_replaced_and_both_jobs_finish_exactly_once(service, tmp_path):
    inputs = [write_input(tmp_path / f"{name}.parquet", BIG) for name in ("ka", "kb")]
    pool = tiny_pool(service)["id"]
    replica, engine = pool_processes(service, pool)
    with frozen(engine):
        a, b = (submit(service, job(path, path.stem)) for path in inputs)
        wait_in_engine(service, {a, b})  # both jobs provably have batches in the replica
        assert get(service, a)["status"] == get(service, b)["status"] == "running"
        os.kill(replica.pid, signal.SIGKILL)
    for job_id in (a, b):
        wait(service, job_id, ended("succeeded"), timeout=900)
        rows = rows_of(service, job_id)
        assert sorted(r["id"] for r in rows) == list(range(BIG)), "each row exactly once"
        assert not [r for r in rows if r["error"]], "a replaced replica is no row's error"
    new_replica, _ = pool_processes(service, pool)
    assert new_replica.pid != replica.pid
    # The dead replica's engine processes went with it.
    assert not [p for p in engine if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_staged_job_runs_its_stages_on_one_shared_pool(service, tmp_path):
    """Two stages naming the same catalog model go through its one pool; every row is
    written once, and a row the judge did not keep says so in ``dropped_by``."""
    source = write_input(tmp_path / "staged.parquet", SMALL)
    body = {
        "name": "staged",
        "input": {"path": str(source)},
        "stages": [
            {
                "name": "draft",
                "prompt": {"template": "{{ text }}\nWrite:"},
                "model": "tiny",
                "sampling": {"max_tokens": 8},
            },
            {
                "name": "judge",
                "prompt": {"template": "Judge: {{ draft__generated_text }}"},
                "model": "tiny",
                "sampling": {"max_tokens": 4, "structured": {"choice": ["good", "bad"]}},
                "keep_if": "judge__generated_text == 'good'",
            },
        ],
        "carryover": ["id"],
        "output": {"path": str(tmp_path / "out-staged")},
    }
    done = wait(service, submit(service, body), ended("succeeded"), timeout=300)
    assert set(done["progress"]["models"]) == {"draft", "judge"}
    rows = rows_of(service, done["id"])
    assert sorted(r["id"] for r in rows) == list(range(SMALL))
    for row in rows:
        assert row["draft__error"] is None and row["judge__error"] is None, row
        assert row["judge__generated_text"] in ("good", "bad")
        assert row["dropped_by"] == (None if row["judge__generated_text"] == "good" else "judge")
    tiny_pool(service)  # one pool of the tiny model, not one per stage


def test_jobs_of_two_adapters_share_one_lora_pool(service, tmp_path):
    """The catalog's adapters of the tiny model: a job of each goes through one pool of the
    base model with LoRA on, and each adapter's texts are its own."""
    source = write_input(tmp_path / "adapters.parquet", SMALL)
    texts = {}
    for name in ("tiny-fr", "tiny-de"):
        body = {**job(source, name), "model": name}
        done = wait(service, submit(service, body), ended("succeeded"), timeout=300)
        texts[name] = [
            r["generated_text"] for r in sorted(rows_of(service, done["id"]), key=lambda r: r["id"])
        ]
    lora = [p for p in engines(service) if p["model"] == "tiny (LoRA adapters)"]
    assert len(lora) == 1, engines(service)
    plain = submit(service, job(source, "plain-beside-adapters"))
    done = wait(service, plain, ended("succeeded"), timeout=300)
    base = [
        r["generated_text"] for r in sorted(rows_of(service, done["id"]), key=lambda r: r["id"])
    ]
    assert texts["tiny-fr"] != texts["tiny-de"] != base
    assert tiny_pool(service)["id"] != lora[0]["id"]  # the base model's own pool
