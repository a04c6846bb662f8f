"""The job service alone, without HTTP: admission, ids, default outputs, idempotency and
cancel, the one policy both doors (``POST /v1/jobs`` and the OpenAI batch runner) use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from llm_batch.errors import JobSpecError
from llm_batch.service.app import create_app
from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.errors import JobConflict, JobNotFound
from llm_batch.service.jobs import JobService, Principal
from llm_batch.service.process import free_port
from llm_batch.service.settings import Settings
from llm_batch.service.store import JobStatus, JobStore

ALICE = Principal(owner="alice", admin=False)
BOB = Principal(owner="bob", admin=False)


class Waker:
    def __init__(self) -> None:
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        db=db_url,
        storage_roots=str(tmp_path / "shared"),
        ray_dashboard_port=free_port(),
    )


@pytest.fixture
def service(settings: Settings) -> Iterator[tuple[JobService, Waker]]:
    store = JobStore(settings.database_url)
    store.create_schema()
    waker = Waker()
    yield JobService(store=store, settings=settings, catalog=ModelCatalog(), scheduler=waker), waker
    store.close()


@pytest.fixture
def body(tmp_path: Path) -> dict[str, Any]:
    shared = tmp_path / "shared"
    shared.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), shared / "in.parquet")
    return {
        "name": "two",
        "input": {"path": str(shared / "in.parquet")},
        "prompt": {"template": "{{ text }}"},
        "model": {"path": "tiny-hub-id"},
        "carryover": ["id"],
    }


def test_submit_queues_a_job_with_its_own_default_output(service, body, settings):
    jobs, waker = service
    job, created = jobs.submit(body, ALICE)
    assert created and waker.woken == 1
    assert job.status == "queued" and job.owner == "alice"
    assert job.output_path == str(settings.outputs_dir("alice") / job.id)  # its own folder
    assert job.progress["rows_total"] == 2
    assert jobs.get(job.id, ALICE).id == job.id
    with pytest.raises(JobNotFound):
        jobs.get(job.id, BOB)  # another key's job is not found, not forbidden


def test_an_idempotency_key_replays_the_same_job(service, body):
    jobs, waker = service
    first, created = jobs.submit(body, ALICE, idempotency_key="k1")
    again, replayed = jobs.submit(body, ALICE, idempotency_key="k1")
    assert created and not replayed and again.id == first.id and waker.woken == 1


def test_a_path_outside_the_storage_roots_is_refused_naming_the_field(service, body, tmp_path):
    jobs, _ = service
    outside = tmp_path / "elsewhere.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), outside)
    with pytest.raises(JobSpecError, match=r"^input\.path: .*outside.*storage roots"):
        jobs.submit({**body, "input": {"path": str(outside)}}, ALICE)


def test_a_key_may_not_name_the_data_directory_unless_the_service_placed_it(
    service, body, settings
):
    jobs, _ = service
    placed = settings.batches_dir() / "batch_x"
    placed.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), placed / "input.parquet")
    inside = {**body, "input": {"path": str(placed / "input.parquet")}}
    with pytest.raises(JobSpecError, match=r"^input\.path: .*data directory"):
        jobs.submit(inside, ALICE)
    job, _ = jobs.submit(inside, ALICE, own=[placed])  # what the batch runner does
    assert job.spec["input"]["path"] == str((placed / "input.parquet").resolve())


def test_cancel_a_queued_job_then_again_is_a_conflict(service, body):
    jobs, _ = service
    job, _ = jobs.submit(body, ALICE)
    with pytest.raises(JobNotFound):
        jobs.cancel(job.id, BOB)
    assert jobs.cancel(job.id, ALICE).status == "cancelled"
    with pytest.raises(JobConflict):
        jobs.result_files(job.id, ALICE)  # nothing written


def test_both_doors_refuse_the_same_path_the_same_way(service, body, settings, tmp_path):
    """``POST /v1/jobs`` answers 422 with exactly the message the job service raises, which
    is what the OpenAI batch runner records for a batch's job."""
    jobs, _ = service
    outside = {**body, "output": {"path": str(tmp_path / "not-a-root" / "out")}}
    with pytest.raises(JobSpecError) as refused:
        jobs.submit(outside, ALICE)
    with TestClient(create_app(settings, run_scheduler=False)) as client:
        r = client.post("/v1/jobs", json=outside)
    assert r.status_code == 422
    assert r.json()["detail"] == str(refused.value)
    assert str(refused.value).startswith("output.path: ")


def _finished_output(path: Path, errors: list[str | None]) -> None:
    """What a finished run of the job leaves: its manifest and one part file."""
    from llm_batch.pipeline.manifest import Manifest, new_run_id, part_name
    from llm_batch.pipeline.write import OWN_FILES

    run = new_run_id()
    path.mkdir(parents=True)
    pq.write_table(
        pa.table({"row_id": list(range(len(errors))), "error": errors}), path / part_name(run, 0)
    )
    manifest = Manifest(job="two")
    manifest.add_run(run, "d", OWN_FILES)
    manifest.write(str(path))


def test_a_retry_queues_an_ended_job_with_errors_again(service, body):
    jobs, waker = service
    job, _ = jobs.submit(body, ALICE)
    with pytest.raises(JobConflict, match="can be retried once it has ended"):
        jobs.retry(job.id, None, ALICE)
    jobs.store.finish(job.id, JobStatus.SUCCEEDED, from_statuses=("queued",))
    _finished_output(Path(job.output_path), [None, "too long"])
    with pytest.raises(JobNotFound):
        jobs.retry(job.id, None, BOB)
    with pytest.raises(JobSpecError, match=r"^sampling: a retry takes only `model` or `models`"):
        jobs.retry(job.id, {"sampling": {}}, ALICE)
    with pytest.raises(JobSpecError, match=r"^models: a retry keeps the job's model names"):
        jobs.retry(job.id, {"models": [{"name": "m", "path": "tiny-hub-id"}]}, ALICE)
    woken = waker.woken
    again = jobs.retry(
        job.id, {"model": {"path": "tiny-hub-id", "engine": {"max_model_len": 512}}}, ALICE
    )
    assert again.status == "queued" and again.retries == 1 and waker.woken == woken + 1
    assert again.spec["model"]["engine"]["max_model_len"] == 512
    assert again.progress["rows_total"] == 2 and again.progress["rows_done"] == 0


def test_a_job_without_errors_has_nothing_to_retry(service, body):
    jobs, _ = service
    job, _ = jobs.submit(body, ALICE)
    jobs.store.finish(job.id, JobStatus.SUCCEEDED, from_statuses=("queued",))
    _finished_output(Path(job.output_path), [None, None])
    with pytest.raises(JobConflict, match="has no rows with errors: nothing to retry"):
        jobs.retry(job.id, None, ALICE)
