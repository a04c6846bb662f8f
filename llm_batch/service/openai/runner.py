"""The batch runner: moves OpenAI batches through their statuses, beside the scheduler.

One background thread; each pass looks at every batch that is not final:

    validating   convert the input file (``convert.convert_input``); invalid → failed
                 with line-numbered errors; valid → one job per group of requests,
                 submitted through the job service as ``POST /v1/jobs`` submits (the
                 same admission, on behalf of the batch's key) → in_progress
    in_progress  request_counts follow the jobs' progress; when every job has ended →
                 finalizing
    finalizing   write the output and error files (``output.write_results``) → completed,
                 or failed when a job failed
    cancelling   cancel the jobs; when they have ended, write the files of what was
                 done → cancelled
    expiring     past ``expires_at`` (created + completion_window) and not finished:
                 its jobs are cancelled, the lines done are written as for a cancel
                 → expired (OpenAI's behaviour)

Everything it needs is in the database and the data folder, so a restart simply
carries on: validation runs again (its jobs are created under idempotency keys
``openai-batch:<batch>:<group>``, so not twice) and finalizing writes the same
files again (their ids derive from the batch's).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from typing import Any

from llm_batch.errors import LLMBatchError
from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.errors import JobConflict
from llm_batch.service.jobs import JobService, Principal
from llm_batch.service.openai.convert import LineError, convert_input, job_body
from llm_batch.service.openai.output import write_results
from llm_batch.service.openai.store import BatchStore
from llm_batch.service.settings import Settings
from llm_batch.service.store import TERMINAL, Batch, Job, JobStatus, utcnow

__all__ = ["BatchRunner"]

logger = logging.getLogger(__name__)


class BatchRunner:
    def __init__(
        self,
        *,
        jobs: JobService,
        batches: BatchStore,
        settings: Settings,
        catalog: ModelCatalog,
    ):
        self.jobs = jobs
        self.store = jobs.store
        self.batches = batches
        self.settings = settings
        self.catalog = catalog
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-batch-batches", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Run a pass now (a batch was created or cancelled)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception:
                logger.exception("batch runner pass failed; retrying")
                self._stopping.wait(2.0)
            self._wake.wait(self.settings.poll_interval)
            self._wake.clear()

    def _wake_scheduler(self) -> None:
        if self.jobs.scheduler is not None:
            self.jobs.scheduler.wake()

    # -- one pass --------------------------------------------------------------------

    def run_once(self) -> None:
        for batch in self.batches.active_batches():
            try:
                if self._expiring(batch):
                    continue
                if batch.status == "validating":
                    self._validate(batch)
                else:
                    self._follow(batch)
            except Exception:
                # One batch's surprise must not hold back the others.
                logger.exception("batch %s: a step failed; retrying", batch.id)

    def _expiring(self, batch: Batch) -> bool:
        """Past its window: mark it (``expired_at``) and cancel its jobs; True when the
        batch ended here (it never started)."""
        if batch.expires_at is None or batch.expires_at > utcnow():
            return False
        if batch.status == "validating":
            return self.batches.finish_batch(
                batch.id, from_statuses=("validating",), status="expired"
            )
        if batch.status != "in_progress":
            return False
        if batch.expired_at is None:
            logger.info("batch %s: its completion window ended; expiring it", batch.id)
            self.batches.update_batch(batch.id, from_statuses=("in_progress",), expired_at=utcnow())
        for run in batch.jobs or []:
            with contextlib.suppress(JobConflict):
                self.store.cancel(run["job_id"])
        self._wake_scheduler()
        return False

    def _fail(self, batch: Batch, errors: list[LineError]) -> None:
        if self.batches.finish_batch(
            batch.id,
            from_statuses=("validating",),
            status="failed",
            errors=[e.as_dict() for e in errors],
        ):
            logger.info("batch %s failed validation (%d errors)", batch.id, len(errors))

    def _validate(self, batch: Batch) -> None:
        source = self.settings.file_path(batch.owner, batch.input_file_id)
        folder = self.settings.batches_dir(batch.owner) / batch.id
        if not source.is_file():
            message = f"the input file {batch.input_file_id} was deleted before it was read"
            self._fail(batch, [LineError("invalid_file", message, param="input_file_id")])
            return
        conversion = convert_input(
            source,
            endpoint=batch.endpoint,
            catalog=self.catalog,
            folder=folder,
            max_requests=self.settings.max_batch_requests,
        )
        if conversion.errors:
            self._fail(batch, conversion.errors)
            shutil.rmtree(folder, ignore_errors=True)
            return
        # The batch's own key submits its jobs, under the same admission as POST /v1/jobs;
        # the converted input and the outputs are in the batch's folder, which the service
        # placed (allowed though the data directory is private).
        principal = Principal(owner=batch.owner, admin=False)
        runs: list[dict[str, Any]] = []
        try:
            for group in conversion.groups:
                body = job_body(
                    group,
                    batch_id=batch.id,
                    endpoint=batch.endpoint,
                    catalog=self.catalog,
                    groups=len(conversion.groups),
                    output_path=folder / f"output-{group.index}",
                )
                job, _ = self.jobs.submit(
                    body,
                    principal,
                    idempotency_key=f"openai-batch:{batch.id}:{group.index}",
                    base=self.settings.data_dir,
                    own=[folder],
                )
                runs.append(
                    {
                        "job_id": job.id,
                        "model": group.model,
                        "requests": group.requests,
                        "rows": group.rows,
                    }
                )
        except LLMBatchError as e:
            for run in runs:
                with contextlib.suppress(LLMBatchError):
                    self.store.cancel(run["job_id"])
            self._fail(batch, [LineError("invalid_request", str(e))])
            return
        # The jobs are recorded whatever happened meanwhile: a cancel that came during
        # validation finds them and cancels them on the next pass.
        self.batches.update_batch(
            batch.id,
            jobs=runs,
            model=", ".join(conversion.models)[:255],
            request_counts={"total": conversion.total, "completed": 0, "failed": 0},
        )
        if self.batches.update_batch(
            batch.id, from_statuses=("validating",), status="in_progress", in_progress_at=utcnow()
        ):
            logger.info(
                "batch %s in progress: %d requests in job(s) %s",
                batch.id,
                conversion.total,
                ", ".join(r["job_id"] for r in runs),
            )
        self._wake_scheduler()

    def _follow(self, batch: Batch) -> None:
        runs = batch.jobs or []
        jobs = [self.store.get(run["job_id"]) for run in runs]
        if batch.status == "cancelling":
            live = [
                j for j in jobs if j.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
            ]
            for job in live:
                with contextlib.suppress(JobConflict):
                    self.store.cancel(job.id)
            if live:
                self._wake_scheduler()
                jobs = [self.store.get(run["job_id"]) for run in runs]
        if not all(job.status in TERMINAL for job in jobs):
            if batch.status == "in_progress":
                self._count(batch, runs, jobs)
            return
        self._finalize(batch, runs, jobs)

    def _count(self, batch: Batch, runs: list[dict[str, Any]], jobs: list[Job]) -> None:
        """Live request counts from the jobs' progress (exact ones come with the files).
        An embeddings request is as many rows as its inputs: counted in proportion."""
        completed = failed = 0
        for run, job in zip(runs, jobs, strict=True):
            progress = job.progress or {}
            n = int(job.spec.get("sampling", {}).get("n", 1))
            done, bad = progress.get("rows_done") or 0, progress.get("rows_failed") or 0
            requests = run["requests"]
            rows = max(run.get("rows") or requests, 1) * n  # output rows of the whole job
            completed += max(done - bad, 0) * requests // rows
            failed += min(bad * requests // rows, requests)
        counts = dict(batch.request_counts or {})
        if (counts.get("completed"), counts.get("failed")) != (completed, failed):
            counts.update(completed=completed, failed=failed)
            self.batches.update_batch(
                batch.id, from_statuses=("in_progress",), request_counts=counts
            )

    def _finalize(self, batch: Batch, runs: list[dict[str, Any]], jobs: list[Job]) -> None:
        status_now = batch.status
        if status_now == "in_progress":
            if not self.batches.update_batch(
                batch.id,
                from_statuses=("in_progress",),
                status="finalizing",
                finalizing_at=utcnow(),
            ):
                return  # cancelled in between: the next pass finalizes it as cancelled
            status_now = "finalizing"
        expired = self.batches.get_batch(batch.id)
        expiring = expired is not None and expired.expired_at is not None
        results = write_results(
            batch_id=batch.id,
            endpoint=batch.endpoint,
            runs=[(job, run["model"]) for job, run in zip(jobs, runs, strict=True)],
            folder=self.settings.files_dir(batch.owner),
            owner=batch.owner,
            unfinished="batch_expired" if expiring and status_now != "cancelling" else None,
        )
        errors = batch.errors
        if expiring and status_now != "cancelling":
            status = "expired"
        elif status_now == "cancelling" or any(j.status == JobStatus.CANCELLED.value for j in jobs):
            status = "cancelled"
        elif any(j.status == JobStatus.FAILED.value for j in jobs):
            status = "failed"
            errors = [
                LineError("batch_failed", f"job {j.id} failed: {j.error}").as_dict()
                for j in jobs
                if j.status == JobStatus.FAILED.value
            ]
        else:
            status = "completed"
        total = sum(run["requests"] for run in runs)
        if self.batches.finish_batch(
            batch.id,
            from_statuses=(status_now,),
            status=status,
            files=results.files,
            errors=errors,
            output_file_id=results.output_file_id,
            error_file_id=results.error_file_id,
            request_counts={
                "total": total,
                "completed": results.completed,
                "failed": results.failed,
            },
            usage=results.usage,
        ):
            logger.info(
                "batch %s %s: %d completed, %d failed of %d requests",
                batch.id,
                status,
                results.completed,
                results.failed,
                total,
            )
