"""The scheduler: runs queued jobs on Ray, follows them, recovers them after a restart.

One background thread with its own database sessions, so API requests never
wait on Ray. Each pass:

1. follows every running or cancelling job: asks Ray for its state and reads
   the driver's status file (``<data_dir>/jobs/<id>/status.json``) for progress, written
   to the database at most every ``progress_interval`` seconds per job;
2. starts queued jobs (priority, then age) while fewer than
   ``max_running_jobs`` run: claims the row, writes the final spec to
   ``<data_dir>/jobs/<id>/spec.json`` and submits the job driver to Ray's Jobs
   API under ``submission_id=<job id>``, unless another Ray job still writes
   the job's output (``llm-batch run --address``, another job of a service):
   then the job fails, saying which.

Recovery needs no special path: after a restart the first pass follows the
jobs the database says are running. Ray still knows a job when only the
service went down (it kept running and is simply followed); a job Ray does not
know any more (the cluster restarted) is queued again, and its new run resumes
from the rows the earlier one committed (``run_job``'s checkpoint) or, with
none, starts over on a cleared output folder: either way each row once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_batch.drivers import (
    SPEC_NAME,
    JobsAPI,
    busy_output,
    driver_error,
    launch_driver,
    output_writers,
    write_spec,
)
from llm_batch.errors import LLMBatchError, ServiceUnavailable
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.driver import remove_status
from llm_batch.service.pools import HOST_PREFIX, EnginePools
from llm_batch.service.raycluster import RayCluster
from llm_batch.service.settings import Settings
from llm_batch.service.store import ACTIVE, Job, JobStatus, JobStore, initial_progress

__all__ = ["Scheduler", "status_uri"]

logger = logging.getLogger(__name__)

_RAY_ACTIVE = ("PENDING", "RUNNING")
HOSTED_POLL = 0.1


def run_id(job: Job) -> str:
    """The Ray submission id of a job's driver: the job's id, and for each retry of its rows
    with errors one of its own (Ray keeps ended submissions under their ids)."""
    return job.id if not job.retries else f"{job.id}-retry-{job.retries}"


def status_uri(settings: Settings, job_id: str) -> str:
    """Where a job's driver keeps its status file: beside its spec in the service's data
    directory (shared with the cluster's nodes in cluster mode), not in the job's output
    folder, which may hold other files."""
    return str(settings.jobs_dir / job_id / "status.json")


def _read_status(uri: str) -> dict[str, Any] | None:
    from llm_batch.pipeline.driver import read_status

    return read_status(uri)


class Scheduler:
    def __init__(
        self,
        *,
        store: JobStore,
        settings: Settings,
        jobs: JobsAPI,
        cluster: RayCluster | None = None,
        on_job_end: Callable[[Job, JobStatus], None] | None = None,
        pools: EnginePools | None = None,
    ):
        """``on_job_end(job, status)`` is called once for each job this scheduler ends (the
        job as it was followed, before it ended): the service's metrics observe durations.
        With ``pools``, jobs run on the service's shared engine pools, small ones in its
        engine host (``pools.py``); without, each job starts engines of its own."""
        self.store = store
        self.pools = pools
        self._specs: dict[str, JobSpec] = {}
        self._on_job_end = on_job_end
        self.settings = settings
        self.jobs = jobs
        self.cluster = cluster
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._follower: threading.Thread | None = None
        self._hosted_started = threading.Event()
        self._submitted = threading.Event()  # a job came: the quick thread starts small ones
        self._starting = threading.Lock()  # one thread starts queued jobs at a time
        self._cluster_ready = cluster is None
        self._last_write: dict[str, float] = {}
        self._stop_sent: set[str] = set()
        self._last_warning = ""
        self._hosted_running = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-batch-scheduler", daemon=True)
        self._thread.start()
        if self.pools is not None:
            self._follower = threading.Thread(
                target=self._follow_hosted_loop, name="llm-batch-hosted", daemon=True
            )
            self._follower.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._hosted_started.set()
        for thread in (self._thread, self._follower):
            if thread is not None:
                thread.join(timeout)

    def wake(self) -> None:
        """Run a pass now (a job was submitted or cancelled)."""
        self._wake.set()
        if self.pools is not None:
            self._submitted.set()
            self._hosted_started.set()

    def _loop(self) -> None:
        last_full = -1e9
        woken = True
        while not self._stopping.is_set():
            try:
                if not self._cluster_ready and self.cluster is not None:
                    self.cluster.ensure()
                    self._cluster_ready = True
                if woken or time.monotonic() - last_full >= self.settings.poll_interval:
                    last_full = time.monotonic()
                    self.run_once()
                self._last_warning = ""
            except ServiceUnavailable as e:
                self._warn_once("scheduler waits for Ray: %s", e)
                self._cluster_ready = self.cluster is None
                self._stopping.wait(2.0)  # let a head that is starting come up
            except Exception:
                logger.exception("scheduler pass failed; retrying")
                self._stopping.wait(2.0)
            woken = self._wake.wait(self.settings.poll_interval)
            self._wake.clear()

    def _follow_hosted_loop(self) -> None:
        """Jobs of the engine host end in a second or two: they are started, and their status
        files (a local read each) looked at every HOSTED_POLL seconds, in a thread of their
        own. A full pass asks Ray's dashboard about every other job, which takes seconds on
        a loaded machine: a small job must not wait for it to start, nor to be seen ended."""
        while not self._stopping.is_set():
            self._hosted_started.wait(HOSTED_POLL if self._hosted_running else 1.0)
            self._hosted_started.clear()
            try:
                if self._submitted.is_set():
                    self._submitted.clear()
                    if not self._start_queued(hosted_only=True):
                        self._submitted.set()  # the full pass is starting jobs: look again
                self.follow_hosted()
            except Exception:  # noqa: BLE001 - the full pass follows them too
                logger.exception("following the engine host's jobs failed; retrying")

    def follow_hosted(self) -> None:
        """A quick pass: the engine host's jobs' status files only (no call to Ray)."""
        hosted = [job for job in self.store.active() if self._hosted(job)]
        self._hosted_running = bool(hosted)
        for job in hosted:
            self._follow_hosted(job, check_host=False)

    def _warn_once(self, fmt: str, *args: Any) -> None:
        message = fmt % args
        if message != self._last_warning:
            logger.warning("%s", message)
            self._last_warning = message

    # -- one pass --------------------------------------------------------------------

    def run_once(self) -> None:
        if self.pools is not None:
            self.pools.ensure_host()
        # Queued jobs first: following the running ones asks Ray's dashboard about each,
        # seconds on a loaded machine, which a small job just submitted would wait for.
        self._start_queued()
        active = self.store.active()
        self._hosted_running = any(self._hosted(job) for job in active)
        for job in active:
            try:
                self._follow(job)
            except ServiceUnavailable:
                raise
            except Exception:
                # One job's surprise must not stop the others from being followed.
                logger.exception("job %s: following it failed; retrying", job.id)
        self._start_queued()
        if self.pools is not None:
            running = self.store.active()
            wanted = []
            for job in running:
                with contextlib.suppress(LLMBatchError):  # failed on its own (_start_queued)
                    wanted.append((job.id, self._spec(job)))
            self.pools.write_desired(wanted)
            for gone in set(self._specs) - {job.id for job in running}:
                self._specs.pop(gone, None)

    def _spec(self, job: Job) -> JobSpec:
        spec = self._specs.get(job.id)
        if spec is None:
            spec = self._specs[job.id] = JobSpec.from_dict(job.spec, source=f"job {job.id}")
        return spec

    def _hosted(self, job: Job) -> bool:
        """Whether a job runs in the service's engine host (not a driver of its own)."""
        return bool(job.ray_submission_id and job.ray_submission_id.startswith(HOST_PREFIX))

    def _follow(self, job: Job) -> None:
        if self._hosted(job):
            self._follow_hosted(job)
            return
        submission = job.ray_submission_id or job.id
        state = self.jobs.status(submission)
        if state is None:
            self._lost(job)
            return
        cancelling = job.status == JobStatus.CANCELLING.value
        if cancelling and state in _RAY_ACTIVE and job.id not in self._stop_sent:
            logger.info("job %s: stopping its Ray run %s", job.id, submission)
            self.jobs.stop(submission)
            self._stop_sent.add(job.id)
        status = _read_status(status_uri(self.settings, job.id)) or {}
        progress = self._merge_progress(job, status.get("progress"))
        if state in _RAY_ACTIVE:
            self._write_progress(job, progress)
        elif state == "SUCCEEDED":
            self._end(job, JobStatus.SUCCEEDED, progress)
        elif state == "STOPPED":
            self._end(job, JobStatus.CANCELLED, progress)
        elif state == "FAILED":
            self._end(
                job, JobStatus.FAILED, progress, error=driver_error(self.jobs, submission, status)
            )
        else:
            logger.warning("job %s: unexpected Ray job status %s", job.id, state)

    def _follow_hosted(self, job: Job, *, check_host: bool = True) -> None:
        """A job of the engine host: its status file says how it goes; Ray says whether the
        host (that ran it) still runs."""
        assert self.pools is not None and job.ray_submission_id is not None
        if job.status == JobStatus.CANCELLING.value and job.id not in self._stop_sent:
            logger.info("job %s: cancelling it in the engine host", job.id)
            self.pools.cancel(job.id)
            self._stop_sent.add(job.id)
        status = _read_status(status_uri(self.settings, job.id)) or {}
        progress = self._merge_progress(job, status.get("progress"))
        state = status.get("state")
        if state == "succeeded":
            self._end(job, JobStatus.SUCCEEDED, progress)
        elif state == "cancelled":
            self._end(job, JobStatus.CANCELLED, progress)
        elif state == "failed":
            self._end(job, JobStatus.FAILED, progress, error=str(status.get("error")))
        elif (
            check_host
            and not self.pools.host_alive()
            and self.jobs.status(job.ray_submission_id) not in _RAY_ACTIVE
        ):
            self._lost(job)
        else:
            self._write_progress(job, progress)

    def _lost(self, job: Job) -> None:
        if job.status == JobStatus.CANCELLING.value:
            self._end(job, JobStatus.CANCELLED, None)
            return
        logger.warning(
            "job %s: Ray does not know its run %s (the cluster was restarted); "
            "queueing it again (the new run keeps the rows already written)",
            job.id,
            job.ray_submission_id,
        )
        rows_total = (job.progress or {}).get("rows_total")
        self.store.requeue(job.id, progress=initial_progress(rows_total))

    def _end(
        self,
        job: Job,
        status: JobStatus,
        progress: dict[str, Any] | None,
        *,
        error: str | None = None,
    ) -> None:
        if self.store.finish(job.id, status, progress=progress, error=error, from_statuses=ACTIVE):
            logger.info("job %s %s", job.id, status.value)
            if self._on_job_end is not None:
                try:
                    self._on_job_end(job, status)
                except Exception:  # noqa: BLE001 - an observer must not stop the scheduler
                    logger.exception("job %s: on_job_end failed", job.id)
        self._last_write.pop(job.id, None)
        self._stop_sent.discard(job.id)

    @staticmethod
    def _merge_progress(job: Job, snapshot: dict[str, Any] | None) -> dict[str, Any]:
        base = initial_progress((job.progress or {}).get("rows_total"))
        if snapshot:
            base.update({k: v for k, v in snapshot.items() if v is not None or k not in base})
        return base

    def _write_progress(self, job: Job, progress: dict[str, Any]) -> None:
        now = time.monotonic()
        if progress == job.progress:
            return
        if now - self._last_write.get(job.id, -1e9) < self.settings.progress_interval:
            return
        self._last_write[job.id] = now
        self.store.set_progress(job.id, progress)

    def _start_queued(self, *, hosted_only: bool = False) -> bool:
        """Start the queued jobs there is room for, in run order. ``hosted_only`` (the quick
        thread): only the small ones among them, which the engine host runs, the others
        left to the full pass; False when the full pass is starting jobs just now."""
        if not self._starting.acquire(blocking=not hosted_only):
            return False
        try:
            self._start_queued_locked(hosted_only=hosted_only)
        finally:
            self._starting.release()
        return True

    def _start_queued_locked(self, *, hosted_only: bool) -> None:
        free = self.settings.max_running_jobs - len(self.store.active())
        if free <= 0:
            return
        for job in self.store.next_queued(free):
            try:
                hosted = self.pools is not None and self._small(job)
            except LLMBatchError as e:
                if hosted_only:
                    continue
                # A stored spec this version refuses fails its job, not the queue behind it.
                logger.error("job %s: its stored spec is refused: %s", job.id, e)
                self.store.finish(job.id, JobStatus.FAILED, error=str(e), from_statuses=("queued",))
                continue
            if hosted_only and not hosted:
                continue
            if hosted:
                # Before the claim: once running, the job's status file is read as this
                # run's (by either thread), and a retried job's says how its last run ended.
                remove_status(status_uri(self.settings, job.id))
            submission = self.pools.host_id if hosted and self.pools is not None else run_id(job)
            if not self.store.claim(job.id, submission_id=submission):
                continue  # cancelled in between
            job.ray_submission_id = submission
            try:
                self._submit(job)
            except ServiceUnavailable:
                self.store.requeue(job.id, progress=job.progress)
                raise
            except LLMBatchError as e:
                self.store.finish(job.id, JobStatus.FAILED, error=str(e))
            except Exception as e:
                logger.exception("job %s: could not be submitted to Ray", job.id)
                self.store.finish(
                    job.id, JobStatus.FAILED, error=f"could not start the job on Ray: {e}"
                )

    def _small(self, job: Job) -> bool:
        """A job small enough for the engine host: at most ``small_job_rows`` rows, or, when
        its rows are unknown before reading (JSONL, CSV), at most ``small_job_bytes``."""
        spec = self._spec(job)
        rows = (job.progress or {}).get("rows_total")
        if rows is not None:
            return int(rows) * spec.samples_per_row <= self.settings.small_job_rows
        path = Path(spec.input.path.removeprefix("file://"))
        if "://" in spec.input.path.removeprefix("file://") or not path.exists():
            return False
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return sum(f.stat().st_size for f in files) <= self.settings.small_job_bytes

    def _submit(self, job: Job) -> None:
        spec = JobSpec.from_dict(job.spec, source=f"job {job.id}").with_output(job.output_path)
        # Two drivers on one output delete each other's uncommitted part files and
        # checkpoint (this job's own Ray run, still going, is followed instead).
        own = job.ray_submission_id or run_id(job)
        other = next((s for s in output_writers(self.jobs, job.output_path) if s != own), None)
        if other is not None:
            raise LLMBatchError(busy_output(job.output_path, other))
        pools = self.pools.pools_for(spec) if self.pools is not None else {}
        folder = self.settings.jobs_dir / job.id
        status = status_uri(self.settings, job.id)
        if self._hosted(job):
            assert self.pools is not None
            write_spec(folder, spec)  # its last status file went before the claim
            self.pools.run(
                job.id,
                spec_path=folder / SPEC_NAME,
                status=status,
                pools=pools,
                retry_errors=bool(job.retries),
            )
            self._hosted_running = True  # the follower looks every HOSTED_POLL now
            self._hosted_started.set()
            logger.info("job %s: running in the engine host", job.id)
            return
        fresh = launch_driver(
            self.jobs,
            spec,
            submission_id=own,
            spec_dir=folder,
            status=status,
            job_id=job.id,
            clear_status=self.jobs.status(own) is None,
            pools=pools,
            retry_errors=bool(job.retries),
        )
        if fresh:
            logger.info("job %s: submitted to Ray", job.id)
        else:
            logger.info("job %s: Ray already runs this submission; following it", job.id)
