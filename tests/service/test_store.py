"""The job store on a real database: SQLite always, PostgreSQL when one is configured."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, inspect, text

from llm_batch.service.errors import JobConflict, JobNotFound
from llm_batch.service.store import JobStatus, JobStore, new_job_id
from tests.conftest import POSTGRES_ENV


def test_postgresql_is_configured():
    """One visible skip when the PostgreSQL variants of these tests do not run."""
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"{POSTGRES_ENV} is not set: store and API tests ran on SQLite only")


@pytest.fixture
def store(db_url: str):
    s = JobStore(db_url)
    s.create_schema()
    yield s
    s.close()


def add(
    store: JobStore,
    name: str = "j",
    *,
    priority: int = 0,
    key: str | None = None,
    spec: dict | None = None,
):
    job, created = store.create(
        job_id=new_job_id(),
        name=name,
        spec=spec or {"name": name},
        output_path=f"/out/{name}",
        priority=priority,
        progress={"rows_total": 3, "rows_done": 0},
        idempotency_key=key,
    )
    return job, created


def test_job_ids_are_prefixed_and_random():
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("job_") and len(i) == 28 for i in ids)


def test_create_then_get_round_trips(store):
    job, created = add(store, "a", priority=3)
    assert created
    got = store.get(job.id)
    assert (got.name, got.status, got.priority) == ("a", "queued", 3)
    assert got.spec == {"name": "a"}
    assert got.progress == {"rows_total": 3, "rows_done": 0}
    assert got.created_at.tzinfo is not None
    assert got.started_at is None and got.finished_at is None


def test_unknown_id_raises_not_found(store):
    with pytest.raises(JobNotFound, match="no job with id 'job_nope'"):
        store.get("job_nope")


def test_idempotency_key_returns_the_first_job(store):
    first, created = add(store, "a", key="k1")
    again, created_again = add(store, "a", key="k1")
    assert created and not created_again
    assert again.id == first.id
    assert len(store.page()[0]) == 1


def test_idempotency_key_with_another_spec_is_a_conflict(store):
    add(store, "a", key="k1")
    with pytest.raises(JobConflict, match="Idempotency-Key 'k1' was already used"):
        add(store, "b", key="k1", spec={"name": "different"})


def test_page_is_newest_first_with_a_cursor(store):
    ids = [add(store, f"j{i}")[0].id for i in range(5)]
    first, more = store.page(limit=2)
    assert [j.id for j in first] == ids[::-1][:2] and more
    second, more = store.page(limit=2, after=first[-1].id)
    assert [j.id for j in second] == ids[::-1][2:4] and more
    third, more = store.page(limit=2, after=second[-1].id)
    assert [j.id for j in third] == ids[:1] and not more


def test_page_filters_by_status(store):
    a, _ = add(store, "a")
    b, _ = add(store, "b")
    store.cancel(a.id)
    assert [j.id for j in store.page(status="cancelled")[0]] == [a.id]
    assert [j.id for j in store.page(status="queued")[0]] == [b.id]


def test_cancel_queued_is_immediate(store):
    job, _ = add(store)
    cancelled = store.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert cancelled.finished_at is not None
    assert not store.claim(job.id, submission_id=job.id)  # the scheduler cannot pick it


def test_cancel_running_asks_the_scheduler(store):
    job, _ = add(store)
    assert store.claim(job.id, submission_id=job.id)
    assert store.cancel(job.id).status == "cancelling"
    assert store.cancel(job.id).status == "cancelling"  # idempotent


def test_cancel_finished_job_is_a_conflict(store):
    job, _ = add(store)
    store.claim(job.id, submission_id=job.id)
    store.finish(job.id, JobStatus.SUCCEEDED)
    with pytest.raises(JobConflict, match="already ended \\(succeeded\\)"):
        store.cancel(job.id)


def test_queue_order_is_priority_then_age(store):
    low, _ = add(store, "low")
    high, _ = add(store, "high", priority=5)
    low2, _ = add(store, "low2")
    assert [j.name for j in store.next_queued(10)] == ["high", "low", "low2"]
    assert [j.name for j in store.next_queued(1)] == ["high"]


def test_claim_happens_once(store):
    job, _ = add(store)
    assert store.claim(job.id, submission_id="sub-1")
    assert not store.claim(job.id, submission_id="sub-2")
    got = store.get(job.id)
    assert got.status == "running" and got.ray_submission_id == "sub-1"
    assert got.started_at is not None and got.attempts == 1
    assert [j.id for j in store.active()] == [job.id]


def test_requeue_clears_the_run(store):
    job, _ = add(store)
    store.claim(job.id, submission_id=job.id)
    store.set_progress(job.id, {"rows_done": 2})
    assert store.requeue(job.id, progress={"rows_done": 0})
    got = store.get(job.id)
    assert (got.status, got.started_at, got.ray_submission_id) == ("queued", None, None)
    assert got.progress == {"rows_done": 0}
    store.claim(job.id, submission_id=job.id)
    assert store.get(job.id).attempts == 2


def test_finish_only_from_an_active_status(store):
    job, _ = add(store)
    assert not store.finish(job.id, JobStatus.SUCCEEDED)  # still queued
    store.claim(job.id, submission_id=job.id)
    assert store.finish(job.id, JobStatus.FAILED, error="boom", progress={"rows_done": 1})
    got = store.get(job.id)
    assert (got.status, got.error, got.progress) == ("failed", "boom", {"rows_done": 1})
    assert got.finished_at is not None
    assert not store.finish(job.id, JobStatus.SUCCEEDED)  # a final status stays


def test_progress_is_only_written_while_active(store):
    job, _ = add(store)
    store.set_progress(job.id, {"rows_done": 9})
    assert store.get(job.id).progress == {"rows_total": 3, "rows_done": 0}


def test_schema_migration_adds_new_columns(db_url):
    # A jobs table from an older version, without some of today's columns.
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS jobs"))
        conn.execute(
            text(
                "CREATE TABLE jobs (id VARCHAR(40) PRIMARY KEY, name VARCHAR(200), "
                "status VARCHAR(16), priority INTEGER, spec JSON, output_path TEXT, "
                "created_at TIMESTAMP WITH TIME ZONE, updated_at TIMESTAMP WITH TIME ZONE)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, name, status, priority, spec, output_path, created_at, "
                "updated_at) VALUES ('job_old', 'old', 'succeeded', 0, '{}', '/o', "
                "'2024-01-01 00:00:00+00:00', '2024-01-01 00:00:00+00:00')"
            )
        )
    engine.dispose()
    store = JobStore(db_url)
    store.create_schema()
    columns = {c["name"] for c in inspect(store.engine).get_columns("jobs")}
    assert {"progress", "error", "idempotency_key", "attempts", "finished_at"} <= columns
    old = store.get("job_old")
    assert old.status == "succeeded" and old.progress is None
    add(store, "new")  # and the table takes today's rows
    store.close()
