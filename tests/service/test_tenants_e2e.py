"""Issue-free REST use without server paths, through a real service with API keys, the
real Ray and the real vLLM CPU engine: a dataset uploaded and run with no output path,
its rows and files downloaded; one key kept out of another's; an output swept when it
expires; a batch past its completion window expired with its finished lines kept;
signed webhooks delivered once, also across a restart of the service.

All traffic stays on loopback: the webhook receiver listens on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service.holds import frozen, pool_processes

pytestmark = [pytest.mark.e2e]

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WINDOW = 60  # seconds: every batch's completion window on this service


class Receiver:
    """A webhook receiver on 127.0.0.1: records every call; answers 503 while ``failing``."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.failing = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = 503 if receiver.failing else 200
                receiver.calls.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                        "status": status,
                    }
                )
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self, path: str) -> list[dict[str, Any]]:
        """Events answered 2xx at ``path``, parsed, one per webhook-id."""
        seen: dict[str, dict[str, Any]] = {}
        for call in self.calls:
            if call["path"] == path and call["status"] == 200:
                event = json.loads(call["body"])
                assert call["headers"]["webhook-id"] not in seen, "an event delivered twice"
                seen[call["headers"]["webhook-id"]] = {**event, "_call": call}
        return list(seen.values())

    def wait(self, path: str, about: str, *, timeout: float = 120) -> list[dict[str, Any]]:
        """The events delivered at ``path`` about the job or batch ``about``, once there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [e for e in self.delivered(path) if e["data"]["id"] == about]
            if got:
                return got
            time.sleep(0.2)
        pytest.fail(f"{path}: no event about {about}; calls: {self.calls}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, tiny_model: Path, receiver: Receiver):
    """A service with keys (a, b, admin), webhooks to the receiver, short expiries."""
    import contextlib

    import psutil

    from llm_batch.service.process import ServiceProcess

    folder = tmp_path_factory.mktemp("tenants")
    (folder / "team-a").mkdir()
    (folder / "keys").write_text(f"key-a roots={folder / 'team-a'}\nkey-b\nkey-admin admin\n")
    engine = "{max_model_len: 512, enforce_eager: true, dtype: bfloat16}"
    held = "{max_model_len: 256, enforce_eager: true, dtype: bfloat16}"  # a pool of its own
    (folder / "models.yaml").write_text(
        f"tiny:\n  path: {tiny_model}\n  warm: true\n  engine: {engine}\n"
        f"held:\n  path: {tiny_model}\n  warm: true\n  engine: {held}\n"
    )
    svc = ServiceProcess(
        folder / "data",
        api_key="key-admin",
        env={
            "VLLM_LOGGING_LEVEL": "WARNING",
            "LLM_BATCH_MODELS": str(folder / "models.yaml"),
            "LLM_BATCH_API_KEYS_FILE": str(folder / "keys"),
            "LLM_BATCH_WEBHOOK_URL": f"http://127.0.0.1:{receiver.port}/service",
            "LLM_BATCH_WEBHOOK_SECRET": SECRET,
            "LLM_BATCH_WEBHOOK_HOSTS": f"127.0.0.1:{receiver.port}",
            "LLM_BATCH_COMPLETION_WINDOW_SECONDS": str(WINDOW),
            "LLM_BATCH_RETENTION_SWEEP_SECONDS": "1",
            "LLM_BATCH_MIN_EXPIRES_AFTER_SECONDS": "1",
        },
    )
    try:
        svc.start()
        yield svc, folder
    finally:
        svc.stop()
        leftover = svc.ray_head.processes()
        svc.stop_ray()
        for proc in leftover:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def http(svc, key: str) -> httpx.Client:
    return httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def wait_job(client: httpx.Client, job_id: str, *, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        time.sleep(0.3)
    pytest.fail(f"job {job_id} did not end: {job}")


def upload_dataset(client: httpx.Client, rows: int = 6, prefix: str = "r") -> str:
    data = io.BytesIO()
    pq.write_table(
        pa.table({"id": list(range(rows)), "text": [f"{prefix}{i}" for i in range(rows)]}), data
    )
    r = client.post(
        "/v1/files",
        files={"file": ("reviews.parquet", data.getvalue())},
        data={"purpose": "dataset"},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def job_body(file_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "uploaded",
        "input": {"file_id": file_id},
        "prompt": {"template": "{{ text }}:"},
        "model": "tiny",
        "sampling": {"max_tokens": 4, "ignore_eos": True},
        "carryover": ["id"],
        **extra,
    }


def test_an_uploaded_dataset_runs_and_its_rows_and_files_download(tenants, receiver):
    svc, _ = tenants
    with http(svc, "key-a") as a, http(svc, "key-b") as b:
        file_id = upload_dataset(a)
        hook = f"http://127.0.0.1:{receiver.port}/job"
        # A host the operator did not allow (a loopback address too): refused, naming it.
        refused = f"http://127.0.0.2:{receiver.port}/job"
        r = a.post("/v1/jobs", json=job_body(file_id, notify={"url": refused}))
        assert r.status_code == 422 and r.json()["detail"].startswith("notify.url"), r.text
        r = a.post("/v1/jobs", json=job_body(file_id, notify={"url": hook}))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = wait_job(a, job_id)
        assert job["status"] == "succeeded", job["error"]

        rows = [json.loads(line) for line in a.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
        assert sorted(r["id"] for r in rows) == list(range(6))
        files = a.get(f"/v1/jobs/{job_id}/files").json()["data"]
        names = [f["name"] for f in files]
        assert "_metrics.json" in names and any(n.endswith(".parquet") for n in names)
        metrics = a.get(f"/v1/jobs/{job_id}/files/_metrics.json")
        assert metrics.status_code == 200 and "rows" in json.dumps(metrics.json())
        part = next(n for n in names if n.endswith(".parquet"))
        table = pq.read_table(io.BytesIO(a.get(f"/v1/jobs/{job_id}/files/{part}").content))
        assert table.num_rows > 0 and "generated_text" in table.column_names
        assert a.get(f"/v1/jobs/{job_id}/files/_llm_batch.json").status_code == 404  # not listed

        # Key B: none of it exists.
        for path in ("", "/results", "/files", "/files/_metrics.json"):
            assert b.get(f"/v1/jobs/{job_id}{path}").status_code == 404, path
        assert b.get(f"/v1/files/{file_id}/content").status_code == 404
        assert b.post("/v1/jobs", json=job_body(file_id)).status_code == 422

        # Usage: A's rows and tokens, none for B.
        usage = a.get("/v1/usage").json()["data"]
        assert [(u["model"], u["rows"]) for u in usage] == [("tiny", 6)]
        assert usage[0]["input_tokens"] > 0 and usage[0]["output_tokens"] == 24
        assert b.get("/v1/usage").json()["data"] == []

    # The job's own webhook and the service's, each once, signed.
    from openai import OpenAI

    verifier = OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1").webhooks
    for path in ("/job", "/service"):
        (event,) = receiver.wait(path, job_id)
        assert event["type"] == "job.succeeded"
        call = event["_call"]
        verifier.verify_signature(call["body"], call["headers"], secret=SECRET)


def test_one_keys_response_cache_is_invisible_to_another(tenants):
    svc, folder = tenants
    with http(svc, "key-a") as a, http(svc, "key-b") as b:
        # The service places each key's cache itself.
        r = a.post(
            "/v1/jobs",
            json=job_body(upload_dataset(a, prefix="cached "), cache={"path": str(folder)}),
        )
        assert r.status_code == 422 and r.json()["detail"].startswith("cache.path"), r.text

        def run(client: httpx.Client) -> dict[str, Any]:
            file_id = upload_dataset(client, prefix="cached ")
            r = client.post("/v1/jobs", json=job_body(file_id))
            assert r.status_code == 201, r.text
            job = wait_job(client, r.json()["id"])
            assert job["status"] == "succeeded", job["error"]
            return job

        first = run(a)
        assert first["progress"]["rows_cached"] == 0
        again = run(a)  # A's rows again: from A's cache
        assert again["progress"]["rows_cached"] == 6
        rows = {
            j["id"]: sorted(
                (r["id"], r["generated_text"])
                for r in map(json.loads, a.get(f"/v1/jobs/{j['id']}/results").text.splitlines())
            )
            for j in (first, again)
        }
        assert rows[first["id"]] == rows[again["id"]]
        # The same rows from key B: generated, not read from A's cache; then B's own.
        assert run(b)["progress"]["rows_cached"] == 0
        assert run(b)["progress"]["rows_cached"] == 6
    caches = sorted(p.parent.name for p in (folder / "data" / "keys").glob("*/cache"))
    assert len(caches) == 2, caches


def test_an_output_past_its_retention_is_swept_and_answers_404(tenants):
    svc, _ = tenants
    with http(svc, "key-a") as a:
        file_id = upload_dataset(a, rows=2)
        # A few seconds (1e-4 days is 8.6 s).
        r = a.post("/v1/jobs", json=job_body(file_id, output={"retain_days": 1e-4}))
        job = wait_job(a, r.json()["id"])
        assert job["status"] == "succeeded" and job["output"]["expires_at"] is not None
        out = Path(job["output"]["path"])
        assert a.get(f"/v1/jobs/{job['id']}/results").status_code == 200
        (out / "kept.txt").write_text("not the job's")  # the sweep leaves it
        deadline = time.monotonic() + 120
        while not a.get(f"/v1/jobs/{job['id']}").json()["output"]["expired"]:
            assert time.monotonic() < deadline, "never swept"
            time.sleep(0.5)
        r = a.get(f"/v1/jobs/{job['id']}/results")
        assert r.status_code == 404 and "expired" in r.json()["detail"]
        assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]

        # An upload with expires_after: gone after, saying so.
        r = a.post(
            "/v1/files",
            files={"file": ("x.jsonl", b'{"text": "x"}\n')},
            data={
                "purpose": "dataset",
                "expires_after[anchor]": "created_at",
                "expires_after[seconds]": "2",
            },
        )
        assert r.status_code == 200 and r.json()["expires_at"] is not None
        gone = r.json()["id"]
        deadline = time.monotonic() + 60
        while a.get(f"/v1/files/{gone}").status_code != 404:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert "expired" in a.get(f"/v1/files/{gone}").json()["error"]["message"]


def wait_pool(svc, model: str, *, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    with http(svc, "key-admin") as admin:
        while time.monotonic() < deadline:
            for pool in admin.get("/v1/engines").json()["data"]:
                if pool["model"] == model and pool["state"] == "running":
                    return str(pool["id"])
            time.sleep(0.5)
    pytest.fail(f"no running pool of {model}")


def test_a_batch_past_its_window_expires_keeping_its_finished_lines(tenants, receiver):
    """Two models in one batch: one's engine held (frozen), the other's lines finish; the
    window ends; the held job is cancelled, its requests aborted in the held engine; the
    batch expires with the finished lines in its output file and the others in its error
    file as ``batch_expired``.

    Only the engine processes are frozen, not the replica: Serve would replace a replica
    that stops answering its health checks, and the held job would go on in the new one."""
    from openai import OpenAI

    svc, _ = tenants
    client = OpenAI(api_key="key-a", base_url=f"{svc.url}/v1", max_retries=0)
    lines = [
        {"custom_id": f"{model}-{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": model, "prompt": f"p{i}", "max_tokens": 3}}
        for model in ("tiny", "held") for i in range(3)
    ]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    _, engine = pool_processes(svc, wait_pool(svc, "held"))
    with frozen(engine):
        source = client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = client.batches.create(
            input_file_id=source.id, endpoint="/v1/completions", completion_window="24h"
        )
        assert batch.expires_at is not None
        assert batch.expires_at - batch.created_at == WINDOW
        deadline = time.monotonic() + WINDOW + 240
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, f"batch still {batch.status}"
            time.sleep(1)
            batch = client.batches.retrieve(batch.id)
    assert batch.status == "expired" and batch.expired_at is not None, batch.errors
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 3)
    assert batch.output_file_id is not None and batch.error_file_id is not None
    done = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in done) == ["tiny-0", "tiny-1", "tiny-2"]
    failed = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in failed) == ["held-0", "held-1", "held-2"]
    assert {x["error"]["code"] for x in failed} == {"batch_expired"}
    assert [e["type"] for e in receiver.wait("/service", batch.id)] == ["batch.expired"]


def test_a_webhook_is_delivered_once_across_a_service_restart(tenants, receiver):
    svc, _ = tenants
    hook = f"http://127.0.0.1:{receiver.port}/restart"
    receiver.failing = True
    try:
        with http(svc, "key-a") as a:
            file_id = upload_dataset(a, rows=2)
            r = a.post("/v1/jobs", json=job_body(file_id, notify={"url": hook}))
            assert r.status_code == 201, r.text
            job = wait_job(a, r.json()["id"])
            assert job["status"] == "succeeded", job["error"]
        deadline = time.monotonic() + 60
        while not any(c["path"] == "/restart" for c in receiver.calls):
            assert time.monotonic() < deadline, "no delivery was tried"
            time.sleep(0.2)
        svc.stop()
    finally:
        receiver.failing = False
    svc.start()
    (event,) = receiver.wait("/restart", r.json()["id"])
    assert event["type"] == "job.succeeded"
    tries = [c for c in receiver.calls if c["path"] == "/restart"]
    assert len({c["headers"]["webhook-id"] for c in tries}) == 1  # one event, tried again
    assert [c["status"] for c in tries][-1] == 200 and tries[0]["status"] == 503
