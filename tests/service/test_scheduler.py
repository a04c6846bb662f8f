"""The scheduler's decisions, pass by pass, on a real database.

Ray's Jobs API is replaced by an in-memory cluster at the scheduler's seam
(``JobsAPI``): what is under test is the scheduler's state machine (queue
order, progress, terminal states, cancel, recovery after a restart), not Ray.
The real service on the real Ray is tested end to end in ``test_service_e2e``.
Status files are written with the job driver's own ``StatusFile``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llm_batch.drivers import submission_metadata
from llm_batch.errors import LLMBatchError
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.driver import StatusFile
from llm_batch.service.errors import ServiceUnavailable
from llm_batch.service.scheduler import Scheduler, status_uri
from llm_batch.service.settings import Settings
from llm_batch.service.store import JobStore, initial_progress, new_job_id


class InMemoryRay:
    """Submissions and their Ray statuses; tests move them along by hand."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.stopped: list[str] = []
        self.reachable = True

    def _check(self) -> None:
        if not self.reachable:
            raise ServiceUnavailable("Ray at http://127.0.0.1:1 is not reachable")

    def submit(self, submission_id, entrypoint, *, runtime_env=None, metadata=None) -> bool:
        self._check()
        if submission_id in self.jobs:
            return False
        self.jobs[submission_id] = {
            "status": "PENDING", "entrypoint": entrypoint, "runtime_env": runtime_env,
            "metadata": dict(metadata or {}), "logs": "",
        }  # fmt: skip
        return True

    def status(self, submission_id):
        self._check()
        job = self.jobs.get(submission_id)
        return None if job is None else job["status"]

    def stop(self, submission_id) -> bool:
        self._check()
        self.stopped.append(submission_id)
        return submission_id in self.jobs

    def failure(self, submission_id, *, lines=20) -> str:
        return self.jobs[submission_id]["logs"]

    def version(self) -> str:
        return "in-memory"

    def unfinished(self) -> list[str]:
        return list(self.unfinished_metadata())

    def unfinished_metadata(self) -> dict[str, dict[str, str]]:
        self._check()
        return {
            k: dict(v.get("metadata") or {})
            for k, v in self.jobs.items()
            if v["status"] in ("PENDING", "RUNNING")
        }

    def set(self, submission_id: str, status: str, logs: str = "") -> None:
        self.jobs[submission_id].update(status=status, logs=logs)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", db=db_url, progress_interval=0, max_running_jobs=1)


@pytest.fixture
def store(settings: Settings):
    s = JobStore(settings.database_url)
    s.create_schema()
    yield s
    s.close()


@pytest.fixture
def ray() -> InMemoryRay:
    return InMemoryRay()


@pytest.fixture
def scheduler(store, settings, ray) -> Scheduler:
    return Scheduler(store=store, settings=settings, jobs=ray)


def queue(
    store: JobStore,
    settings: Settings,
    name: str = "j",
    *,
    priority: int = 0,
    spec: dict | None = None,
    output: str | None = None,
    rows: int = 10,
) -> str:
    job_id = new_job_id()
    store.create(
        job_id=job_id,
        name=name,
        spec=spec
        or {
            "name": name,
            "input": {"path": "/in.parquet"},
            "prompt": {"template": "{{ t }}"},
            "model": {"path": "m"},
            "priority": priority,
        },  # fmt: skip
        output_path=output or str(settings.outputs_dir() / job_id),
        priority=priority,
        progress=initial_progress(rows),
    )
    return job_id


def write_status(
    settings: Settings, job_id: str, state: str, rows_done: int, error: str | None = None
) -> None:
    progress = {
        "rows_total": 10,
        "rows_done": rows_done,
        "rows_failed": 1,
        "output_tokens": 4 * rows_done,
        "rows_per_second": 2.5,
        "eta_seconds": 3.0,
    }
    StatusFile(status_uri(settings, job_id)).write(state, progress, error, force=True)


def test_runs_jobs_by_priority_then_age_up_to_the_limit(scheduler, store, settings, ray):
    low = queue(store, settings, "low")
    high = queue(store, settings, "high", priority=5)
    low2 = queue(store, settings, "low2")
    scheduler.run_once()
    assert list(ray.jobs) == [high]
    assert store.get(high).status == "running" and store.get(high).started_at is not None
    assert store.get(low).status == store.get(low2).status == "queued"
    scheduler.run_once()
    assert list(ray.jobs) == [high]  # max_running_jobs is 1
    ray.set(high, "SUCCEEDED")
    scheduler.run_once()
    assert store.get(high).status == "succeeded"
    assert list(ray.jobs) == [high, low]


def test_submission_runs_the_driver_on_the_final_spec(scheduler, store, settings, ray):
    job_id = queue(store, settings)
    scheduler.run_once()
    spec_path = settings.jobs_dir / job_id / "spec.json"
    spec = json.loads(spec_path.read_text())
    assert spec["output"]["path"] == str(settings.outputs_dir() / job_id)
    entrypoint = ray.jobs[job_id]["entrypoint"]
    status = settings.jobs_dir / job_id / "status.json"
    assert entrypoint.endswith(
        f"-m llm_batch.pipeline.driver {spec_path} --status {status} --job-name {job_id}"
    )
    assert "VLLM_LOGGING_LEVEL" in ray.jobs[job_id]["runtime_env"]["env_vars"]
    assert store.get(job_id).ray_submission_id == job_id
    # What `llm-batch run --address` looks for before it writes an output.
    assert ray.jobs[job_id]["metadata"] == {
        "name": "j",
        "llm_batch_job_id": job_id,
        "llm_batch_output": str(settings.outputs_dir() / job_id),
        "llm_batch_spec": JobSpec.from_dict(spec).digest(),
    }


def cli_run(output: str, name: str = "cli") -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": name,
            "input": {"path": "/in.parquet"},
            "prompt": {"template": "{{ t }}"},
            "model": {"path": "m"},
            "output": {"path": output},
        }
    )


@pytest.mark.parametrize("written_as", ["{out}", "{out}/", "{link}"])
def test_an_output_another_ray_job_still_writes_fails_the_job(
    scheduler, store, settings, ray, tmp_path, written_as
):
    out, link = tmp_path / "shared" / "out", tmp_path / "link"
    out.mkdir(parents=True)
    link.symlink_to(out)
    cli = written_as.format(out=out, link=link)
    ray.submit("llm-batch-cli-1234", "x", metadata=submission_metadata(cli_run(cli)))
    spec = cli_run(str(out), name="service")
    job_id = queue(store, settings, spec=spec.model_dump(mode="json"), output=str(out))
    scheduler.run_once()
    job = store.get(job_id)
    assert job.status == "failed"
    assert job.error == (
        f"output.path: {str(out)!r} is being written by llm-batch-cli-1234, another job "
        "still running on the Ray cluster; wait for it, stop it, or choose another output"
    )
    assert list(ray.jobs) == ["llm-batch-cli-1234"]
    assert not (settings.jobs_dir / job_id).exists()

    # Once that job has ended, the same output is free again.
    ray.set("llm-batch-cli-1234", "SUCCEEDED")
    again = queue(store, settings, spec=spec.model_dump(mode="json"), output=str(out))
    scheduler.run_once()
    assert store.get(again).status == "running" and again in ray.jobs


def test_the_cli_refuses_an_output_a_service_job_still_writes(
    scheduler, store, settings, ray, monkeypatch
):
    from llm_batch.cli.cluster import run_on_cluster

    job_id = queue(store, settings)
    scheduler.run_once()
    output = store.get(job_id).output_path
    monkeypatch.setattr("llm_batch.cli.cluster._quiet_ray_client", lambda: None)
    with pytest.raises(
        LLMBatchError, match=f"^output.path: '{output}' is being written by {job_id}"
    ):
        run_on_cluster(cli_run(output), address="http://10.255.0.1:8265", jobs=ray)
    assert list(ray.jobs) == [job_id]


def test_progress_comes_from_the_status_file(scheduler, store, settings, ray):
    job_id = queue(store, settings)
    scheduler.run_once()
    ray.set(job_id, "RUNNING")
    scheduler.run_once()
    assert store.get(job_id).progress == initial_progress(10)  # nothing reported yet
    write_status(settings, job_id, "running", 4)
    scheduler.run_once()
    progress = store.get(job_id).progress
    assert (progress["rows_done"], progress["rows_failed"], progress["output_tokens"]) == (4, 1, 16)
    assert progress["rows_per_second"] == 2.5 and progress["eta_seconds"] == 3.0


def test_progress_writes_are_rate_limited(store, settings, ray):
    slow = Scheduler(
        store=store, settings=settings.model_copy(update={"progress_interval": 3600}), jobs=ray
    )
    job_id = queue(store, settings)
    slow.run_once()
    ray.set(job_id, "RUNNING")
    write_status(settings, job_id, "running", 2)
    slow.run_once()
    assert store.get(job_id).progress["rows_done"] == 2
    write_status(settings, job_id, "running", 5)
    slow.run_once()
    assert store.get(job_id).progress["rows_done"] == 2  # within the interval
    ray.set(job_id, "SUCCEEDED")
    write_status(settings, job_id, "succeeded", 10)
    slow.run_once()
    assert store.get(job_id).progress["rows_done"] == 10  # the final one always lands


def test_failure_reports_the_drivers_message(scheduler, store, settings, ray):
    job_id = queue(store, settings)
    scheduler.run_once()
    write_status(settings, job_id, "failed", 3, "input.path: '/in.parquet' does not exist")
    ray.set(job_id, "FAILED", logs="Traceback ...\nInputError: ...")
    scheduler.run_once()
    job = store.get(job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error == "input.path: '/in.parquet' does not exist"
    assert job.progress["rows_done"] == 3


def test_failure_without_a_status_file_reports_the_log_tail(scheduler, store, settings, ray):
    job_id = queue(store, settings)
    scheduler.run_once()
    ray.set(job_id, "FAILED", logs="line 1\nKilled: out of memory")
    scheduler.run_once()
    job = store.get(job_id)
    assert job.status == "failed"
    assert job.error.startswith("the job driver ended with an error")
    assert job.error.endswith("Killed: out of memory")


def test_cancel_stops_the_ray_run_once_then_ends_cancelled(scheduler, store, settings, ray):
    job_id = queue(store, settings)
    scheduler.run_once()
    ray.set(job_id, "RUNNING")
    write_status(settings, job_id, "running", 6)
    assert store.cancel(job_id).status == "cancelling"
    scheduler.run_once()
    scheduler.run_once()
    assert ray.stopped == [job_id]
    assert store.get(job_id).status == "cancelling"
    ray.set(job_id, "STOPPED")
    scheduler.run_once()
    job = store.get(job_id)
    assert job.status == "cancelled" and job.finished_at is not None
    assert job.progress["rows_done"] == 6  # what the run had done is kept


def test_restart_follows_a_job_ray_still_runs(store, settings, ray):
    job_id = queue(store, settings)
    Scheduler(store=store, settings=settings, jobs=ray).run_once()
    ray.set(job_id, "RUNNING")
    # The service is killed; a new one starts on the same database.
    again = Scheduler(store=store, settings=settings, jobs=ray)
    again.run_once()
    assert store.get(job_id).status == "running"
    assert list(ray.jobs) == [job_id]  # not submitted twice
    ray.set(job_id, "SUCCEEDED")
    again.run_once()
    assert store.get(job_id).status == "succeeded"


def test_restart_requeues_a_job_ray_forgot(store, settings, ray):
    job_id = queue(store, settings)
    Scheduler(store=store, settings=settings, jobs=ray).run_once()
    write_status(settings, job_id, "running", 7)
    # The cluster restarted: it knows no job any more.
    fresh = InMemoryRay()
    Scheduler(store=store, settings=settings, jobs=fresh).run_once()
    job = store.get(job_id)
    assert job.status == "running" and job.attempts == 2
    assert list(fresh.jobs) == [job_id]  # queued again and resubmitted
    assert job.progress == initial_progress(10)
    # The old run's status file would have shown its progress as the new run's.
    assert not Path(status_uri(settings, job.id)).exists()


def test_a_cancelling_job_ray_forgot_is_cancelled(store, settings, ray):
    job_id = queue(store, settings)
    Scheduler(store=store, settings=settings, jobs=ray).run_once()
    store.cancel(job_id)
    Scheduler(store=store, settings=settings, jobs=InMemoryRay()).run_once()
    assert store.get(job_id).status == "cancelled"


def test_ray_already_running_the_submission_is_followed(scheduler, store, settings, ray):
    job_id = queue(store, settings)
    ray.jobs[job_id] = {"status": "RUNNING", "entrypoint": "x", "runtime_env": None, "logs": ""}
    write_status(settings, job_id, "running", 5)
    scheduler.run_once()
    assert store.get(job_id).status == "running"
    assert ray.jobs[job_id]["entrypoint"] == "x"
    assert Path(status_uri(settings, job_id)).exists()  # its progress is kept


def test_unreachable_ray_leaves_the_job_queued(scheduler, store, settings, ray):
    job_id = queue(store, settings)
    ray.reachable = False
    with pytest.raises(ServiceUnavailable):
        scheduler.run_once()
    job = store.get(job_id)
    assert job.status == "queued" and job.started_at is None
    ray.reachable = True
    scheduler.run_once()
    assert store.get(job_id).status == "running"


def test_a_stored_spec_that_no_longer_validates_fails_the_job(scheduler, store, settings, ray):
    job_id = queue(store, settings, spec={"name": "old", "prompt": {"template": "x"}})
    scheduler.run_once()
    job = store.get(job_id)
    assert job.status == "failed"
    assert job.error.startswith(f"job {job_id} is invalid: input: required field is missing")
    assert ray.jobs == {}


# -- small jobs, started by the quick thread -------------------------------------------


@pytest.fixture
def pooled(store, settings, ray) -> Scheduler:
    """A scheduler with engine pools: small jobs (10 rows here) run in the engine host."""
    from llm_batch.service.catalog import ModelCatalog
    from llm_batch.service.pools import EnginePools

    settings = settings.model_copy(update={"max_running_jobs": 2})
    pools = EnginePools(settings=settings, catalog=ModelCatalog(), jobs=ray)
    return Scheduler(store=store, settings=settings, jobs=ray, pools=pools)


def queue_big(store: JobStore, settings: Settings, name: str, priority: int = 0) -> str:
    return queue(store, settings, name, priority=priority, rows=100_000)


def host_messages(scheduler: Scheduler) -> list[str]:
    assert scheduler.pools is not None
    return [m["job_id"] for _, m in scheduler.pools.mailbox.receive() if m["kind"] == "run"]


def test_the_quick_thread_starts_the_small_jobs_a_pass_would_and_leaves_the_rest(
    pooled, store, settings, ray
):
    big = queue_big(store, settings, "big")
    small = queue(store, settings, "small")
    later = queue(store, settings, "later")  # beyond max_running_jobs (2)
    assert pooled._start_queued(hosted_only=True)
    assert store.get(small).status == "running" and host_messages(pooled) == [small]
    assert store.get(big).status == "queued" and ray.jobs == {}  # a driver: the full pass's
    assert store.get(later).status == "queued"
    pooled.run_once()
    assert store.get(big).status == "running" and big in ray.jobs  # beside the host
    assert store.get(later).status == "queued"


def test_the_quick_thread_does_not_take_the_room_of_a_job_ahead_of_it(pooled, store, settings, ray):
    first = queue_big(store, settings, "first", priority=5)
    second = queue_big(store, settings, "second", priority=5)
    small = queue(store, settings, "small")  # third in run order; room for two
    pooled._start_queued(hosted_only=True)
    assert store.get(small).status == "queued" and host_messages(pooled) == []
    pooled.run_once()
    assert {store.get(first).status, store.get(second).status} == {"running"}
    assert store.get(small).status == "queued"


def test_the_quick_thread_gives_way_while_a_pass_starts_jobs(pooled, store, settings):
    small = queue(store, settings, "small")
    with pooled._starting:  # a full pass submitting a driver
        assert not pooled._start_queued(hosted_only=True)
    assert store.get(small).status == "queued"


def test_a_submitted_small_job_starts_without_a_full_pass(pooled, store, settings, ray):
    import threading
    import time

    small = queue(store, settings, "small")
    follower = threading.Thread(target=pooled._follow_hosted_loop, daemon=True)
    follower.start()
    try:
        pooled.wake()  # as POST /v1/jobs does; no run_once
        deadline = time.monotonic() + 30
        while store.get(small).status == "queued" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.get(small).status == "running"
        assert host_messages(pooled) == [small] and ray.jobs == {}
    finally:
        pooled._stopping.set()
        pooled._hosted_started.set()
        follower.join(10)


def test_a_retried_small_job_is_not_ended_by_its_last_runs_status(pooled, store, settings, ray):
    """The quick thread follows the host's jobs while the other starts one (here: during
    the start's call to Ray): the last run's status file must be gone by then."""
    small = queue(store, settings, "small")
    write_status(settings, small, "succeeded", 10)  # what the run before the retry wrote
    asked = ray.unfinished_metadata

    def follow_meanwhile() -> dict:
        pooled.follow_hosted()
        return asked()

    ray.unfinished_metadata = follow_meanwhile  # type: ignore[method-assign]
    pooled._start_queued(hosted_only=True)
    assert store.get(small).status == "running"
    pooled.follow_hosted()
    assert store.get(small).status == "running"
