"""Load on the session's real service (loopback) while a job runs: several clients send a
few hundred status and list requests and many small submissions at once, some with an
Idempotency-Key and some of those retried with the same key.

Claims: no request fails (no 5xx, no connection error), no job is lost or made twice
(the jobs listed are exactly the submissions, a key's retries are one job) and none
fails. Status requests' p50/p99 are printed, not asserted (speed is the benchmark's).
The running job's driver is frozen (SIGSTOP) while the load runs, so that it is provably
running beside it; the small jobs run beside it on the shared pool. At the end every job
still going is cancelled, so nothing is left running.
"""

from __future__ import annotations

import random
import signal
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service.holds import driver_process

pytestmark = pytest.mark.e2e

CLIENTS = 8
STATUS_REQUESTS = 320
LIST_REQUESTS = 80
PLAIN_SUBMISSIONS = 30
KEYED_SUBMISSIONS = 15  # each sent twice with its key: a retry
DEADLINE = 90.0  # seconds for the whole load; the test stops by itself


def small_job(input_path: Path, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "input": {"path": str(input_path)},
        "prompt": {"template": "Review: {{ text }}\nSentiment:"},
        "model": "tiny",
        "sampling": {"max_tokens": 2},
        "carryover": ["id"],
        "priority": -100,
    }


def get(url: str, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()


def wait_status(url: str, job_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job = get(url, job_id)
    while job["status"] not in statuses and time.monotonic() < deadline:
        time.sleep(0.3)
        job = get(url, job_id)
    return job


def listed(url: str, prefix: str) -> list[dict[str, Any]]:
    """Every job whose name starts with ``prefix``, across all pages."""
    jobs, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = httpx.get(f"{url}/v1/jobs", params=params, timeout=30).json()
        jobs += [j for j in page["data"] if j["name"].startswith(prefix)]
        if not page["has_more"]:
            return jobs
        after = page["next_after"]


def test_concurrent_status_list_and_submissions_while_a_job_runs(service, tmp_path: Path):
    url = service.url
    big_input = tmp_path / "big.parquet"
    pq.write_table(
        pa.table({"id": pa.array(range(5000), pa.int64()), "text": ["a fine review"] * 5000}),
        big_input,
    )
    small_input = tmp_path / "small.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["good", "bad", "fine"]}), small_input)

    prefix = f"load-{uuid.uuid4().hex[:8]}-"
    r = httpx.post(f"{url}/v1/jobs", json=small_job(big_input, prefix + "running"), timeout=60)
    assert r.status_code == 201, r.text
    running_id = r.json()["id"]
    assert wait_status(url, running_id, {"running"}, 120)["status"] == "running"
    driver = driver_process(service, running_id)
    driver.send_signal(signal.SIGSTOP)  # it cannot end while the load runs

    # The work: one descriptor per request, shuffled, shared by the client threads.
    work: list[tuple[str, Any]] = [("status", None)] * STATUS_REQUESTS
    work += [("list", None)] * LIST_REQUESTS
    work += [("submit", (prefix + f"plain-{i}", None)) for i in range(PLAIN_SUBMISSIONS)]
    for i in range(KEYED_SUBMISSIONS):
        key = f"{prefix}key-{i}"
        work += [("submit", (prefix + f"keyed-{i}", key))] * 2
    random.Random(0).shuffle(work)
    lock = threading.Lock()
    status_latencies: list[float] = []
    failures: list[str] = []
    submitted: list[tuple[str, str | None, str]] = []  # (name, key, job id)
    deadline = time.monotonic() + DEADLINE

    def client_thread() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.monotonic() < deadline:
                with lock:
                    if not work:
                        return
                    kind, arg = work.pop()
                started = time.monotonic()
                try:
                    if kind == "status":
                        r = client.get(f"/v1/jobs/{running_id}")
                    elif kind == "list":
                        r = client.get("/v1/jobs", params={"limit": 20})
                    else:
                        name, key = arg
                        headers = {"Idempotency-Key": key} if key else {}
                        r = client.post(
                            "/v1/jobs", json=small_job(small_input, name), headers=headers
                        )
                except httpx.HTTPError as e:
                    with lock:
                        failures.append(f"{kind}: {type(e).__name__}: {e}")
                    continue
                elapsed = time.monotonic() - started
                expected = 201 if kind == "submit" else 200
                with lock:
                    if r.status_code != expected:
                        failures.append(f"{kind}: {r.status_code} {r.text[:300]}")
                    elif kind == "status":
                        status_latencies.append(elapsed)
                    elif kind == "submit":
                        submitted.append((arg[0], arg[1], r.json()["id"]))

    load_started = time.monotonic()
    threads = [threading.Thread(target=client_thread) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE + 60)
    load_seconds = time.monotonic() - load_started
    left = len(work)
    running_status = get(url, running_id)["status"]
    driver.send_signal(signal.SIGCONT)

    try:
        total = STATUS_REQUESTS + LIST_REQUESTS + PLAIN_SUBMISSIONS + 2 * KEYED_SUBMISSIONS
        assert left == 0, f"{left} of {total} requests not sent in {DEADLINE:.0f}s"
        assert not failures, failures[:10]
        assert running_status == "running"  # the load ran beside a job

        # No job lost or made twice: one job per plain submission, one per key.
        ids_by_key: dict[str, set[str]] = {}
        for _, key, job_id in submitted:
            if key is not None:
                ids_by_key.setdefault(key, set()).add(job_id)
        assert all(len(ids) == 1 for ids in ids_by_key.values()), ids_by_key
        assert len(ids_by_key) == KEYED_SUBMISSIONS
        plain_ids = [job_id for _, key, job_id in submitted if key is None]
        assert len(set(plain_ids)) == PLAIN_SUBMISSIONS
        expected_ids = set(plain_ids) | {next(iter(ids)) for ids in ids_by_key.values()}
        small = [j for j in listed(url, prefix) if j["id"] != running_id]
        assert sorted(j["id"] for j in small) == sorted(expected_ids)
        assert not [j for j in small if j["status"] == "failed"], small

        p50 = statistics.median(status_latencies)
        p99 = statistics.quantiles(status_latencies, n=100)[98]
        print(
            f"\nload: {total} requests from {CLIENTS} clients in {load_seconds:.1f}s "
            f"({total / load_seconds:.0f}/s) while a job ran; status requests "
            f"(n={len(status_latencies)}): p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
            f"max {max(status_latencies) * 1000:.0f} ms"
        )
    finally:
        driver.send_signal(signal.SIGCONT)
        for job in listed(url, prefix):
            if job["status"] in ("queued", "running"):
                httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", timeout=30)
        for job in listed(url, prefix):
            final = wait_status(url, job["id"], {"cancelled", "succeeded", "failed"}, 300)
            assert final["status"] in ("cancelled", "succeeded"), final
