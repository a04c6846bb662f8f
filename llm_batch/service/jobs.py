"""The job service: what both doors (``/v1/jobs`` and the OpenAI Batch API) and the
scheduler do with jobs, in one place.

    submit    admission (``validation.Admission.from_settings``: storage roots, the data
              directory's privacy, allowed accumulators, engine arguments, replicas),
              the job id, the default output folder, idempotency; queues the job and
              wakes the scheduler
    get/page  a key sees its own jobs (an admin all); others' are "not found"
    cancel    a queued job at once; a running one through the scheduler
    results   the part files a job has written so far (its manifest says which)

Routes translate HTTP to these calls and back; they hold no rule of their own.
Every refusal is an ``LLMBatchError`` naming the field (``JobSpecError``,
``InputError``, ``JobNotFound``, ``JobConflict``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.errors import JobConflict
from llm_batch.service.settings import Settings
from llm_batch.service.store import Job, JobStatus, JobStore, initial_progress, new_job_id
from llm_batch.service.validation import Admission, prepare_submission

__all__ = ["JobService", "Principal"]


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling: ``owner`` is a digest of their API key (never the key itself);
    None when the service runs without keys."""

    owner: str | None
    admin: bool


class _Waker(Protocol):
    def wake(self) -> None: ...


class JobService:
    def __init__(
        self,
        *,
        store: JobStore,
        settings: Settings,
        catalog: ModelCatalog,
        scheduler: _Waker | None = None,
    ):
        self.store = store
        self.settings = settings
        self.catalog = catalog
        self.scheduler = scheduler

    def admission(
        self, principal: Principal, *, base: Path | None = None, own: Sequence[Path] = ()
    ) -> Admission:
        """What this service admits from ``principal``: the one policy of both doors.
        ``own`` are folders the service itself placed this submission's files in (an
        OpenAI batch's converted input and its outputs), allowed though private."""
        return Admission.from_settings(
            self.settings,
            catalog=self.catalog,
            base=base or Path.cwd(),
            admin=principal.admin,
            own=own,
        )

    def submit(
        self,
        body: Any,
        principal: Principal,
        *,
        idempotency_key: str | None = None,
        base: Path | None = None,
        own: Sequence[Path] = (),
    ) -> tuple[Job, bool]:
        """Validate and queue a job; (the job, whether it is new: False when the
        idempotency key replayed an earlier submission of the same job)."""
        submission = prepare_submission(body, self.admission(principal, base=base, own=own))
        spec = submission.spec
        job_id = new_job_id()
        output = (
            spec.output.path if spec.output is not None else str(self.settings.outputs_dir / job_id)
        )
        job, created = self.store.create(
            job_id=job_id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            output_path=output,
            priority=spec.priority,
            progress=initial_progress(submission.rows_total),
            idempotency_key=idempotency_key,
            owner=principal.owner,
        )
        if created:
            self._wake()
        return job, created

    def get(self, job_id: str, principal: Principal) -> Job:
        return self.store.get(job_id, owner=principal.owner, admin=principal.admin)

    def page(
        self, principal: Principal, *, status: str | None, limit: int, after: str | None
    ) -> tuple[list[Job], bool]:
        return self.store.page(
            status=status, limit=limit, after=after, owner=principal.owner, admin=principal.admin
        )

    def cancel(self, job_id: str, principal: Principal) -> Job:
        """A queued job is cancelled at once; a running one becomes ``cancelling`` until
        Ray has stopped it. Raises ``JobConflict`` for a job that already ended."""
        self.get(job_id, principal)  # not found for others' jobs
        job = self.store.cancel(job_id)
        self._wake()
        return job

    def result_files(self, job_id: str, principal: Principal) -> tuple[Job, list[str]]:
        """The job and the part files it has written so far; ``JobConflict`` when none."""
        from llm_batch.service import results

        job = self.get(job_id, principal)
        files = [] if job.status == JobStatus.QUEUED.value else results.part_files(job.output_path)
        if not files:
            raise JobConflict(f"job {job_id} has written no rows yet (status: {job.status})")
        return job, files

    def _wake(self) -> None:
        if self.scheduler is not None:
            self.scheduler.wake()
