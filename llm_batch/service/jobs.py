"""The job service: what both doors (``/v1/jobs`` and the OpenAI Batch API) and the
scheduler do with jobs, in one place.

    submit    admission (``validation.Admission.from_settings``: storage roots, the data
              directory's privacy, allowed accumulators, engine arguments, replicas),
              the job id, the default output folder, idempotency; queues the job and
              wakes the scheduler
    get/page  a key sees its own jobs (an admin all); others' are "not found"
    cancel    a queued job at once; a running one through the scheduler
    retry     an ended job's rows with errors run again (optionally with another model
              or engine block), the other rows kept (``pipeline/retry.py``)
    results   the part files a job has written so far (its manifest says which)

Routes translate HTTP to these calls and back; they hold no rule of their own.
Every refusal is an ``LLMBatchError`` naming the field (``JobSpecError``,
``InputError``, ``JobNotFound``, ``JobConflict``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llm_batch.errors import JobSpecError
from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.errors import FileExpired, JobConflict, OutputFileNotFound
from llm_batch.service.settings import Settings
from llm_batch.service.store import (
    TERMINAL,
    Job,
    JobStatus,
    JobStore,
    initial_progress,
    new_job_id,
    utcnow,
)
from llm_batch.service.validation import Admission, check_webhook, prepare_submission

if TYPE_CHECKING:
    from llm_batch.service.files import FileStorage

__all__ = ["JobService", "OutputFile", "Principal"]


@dataclasses.dataclass(frozen=True)
class OutputFile:
    name: str  # relative to the job's output folder
    bytes: int


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling: ``owner`` is a digest of their API key (never the key itself);
    None when the service runs without keys. ``roots`` are the storage roots granted
    to this key alone (the keys file's ``roots=``)."""

    owner: str | None
    admin: bool
    roots: tuple[str, ...] = ()


def _scoped(key: str, owner: str | None) -> str:
    """An Idempotency-Key as stored: prefixed with the API key's id, so that two keys that
    happen to send the same one make two jobs, and neither sees the other's."""
    if owner is None:
        return key
    scoped = f"{owner[:16]}/{key}"
    return scoped if len(scoped) <= 255 else f"{owner[:16]}/sha256:{_digest(key)}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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
        files: FileStorage | None = None,
    ):
        self.store = store
        self.settings = settings
        self.catalog = catalog
        self.scheduler = scheduler
        self.files = files

    def admission(
        self, principal: Principal, *, base: Path | None = None, own: Sequence[Path] = ()
    ) -> Admission:
        """What this service admits from ``principal``: the one policy of both doors.
        ``own`` are folders the service itself placed this submission's files in (an
        OpenAI batch's converted input and its outputs), allowed though private."""
        home = [self.settings.home(principal.owner)] if principal.owner is not None else []
        return Admission.from_settings(
            self.settings,
            catalog=self.catalog,
            base=base or Path.cwd(),
            admin=principal.admin,
            own=[*own, *home],
            roots=principal.roots,
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
        # Idempotency keys are per API key. A replayed submission gets the first one's job
        # id, hence its placed output folder, so that the two specs compare equal, also when
        # the two requests race (the id is derived from the key).
        key = _scoped(idempotency_key, principal.owner) if idempotency_key else None
        job_id = "job_" + _digest(key)[:24] if key else new_job_id()
        body, retain = self._placed(body, principal, job_id)
        submission = prepare_submission(body, self.admission(principal, base=base, own=own))
        spec = submission.spec
        if spec.notify is not None:
            check_webhook(spec.notify.url, self.settings)
        assert spec.output is not None  # _placed gives every job an output folder
        output = spec.output.path
        job, created = self.store.create(
            job_id=job_id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            output_path=output,
            priority=spec.priority,
            progress=initial_progress(submission.rows_total),
            idempotency_key=key,
            owner=principal.owner,
            retain_seconds=retain,
        )
        if created:
            self._wake()
        return job, created

    def _placed(self, body: Any, principal: Principal, job_id: str) -> tuple[Any, float | None]:
        """The body with what the service fills in: an uploaded dataset's path for
        ``input.file_id``, and for a job without ``output.path`` a folder of the key's own
        (``<home>/outputs/<job id>``); and how long that folder is kept (seconds)."""
        if not isinstance(body, dict):
            return body, None  # check_job refuses it, naming the body
        body = dict(body)
        given = body.get("input")
        if isinstance(given, dict) and "file_id" in given:
            body["input"] = self._dataset(given, principal)
        cache = body.get("cache")
        if isinstance(cache, dict):
            if "path" in cache:
                raise JobSpecError(
                    "cache.path: the service keeps a response cache per API key and places "
                    "it itself; set only cache.mode"
                )
            # One key's cache: no key reads another's (jobs without keys share one).
            body["cache"] = {**cache, "path": str(self.settings.cache_dir(principal.owner))}
        elif cache is None:
            body["cache"] = {"path": str(self.settings.cache_dir(principal.owner))}
        output = body.get("output")
        if output is None:
            output = {}
        if not isinstance(output, dict):
            return body, None  # check_job names output
        if "path" in output:
            if output.get("retain_days") is not None:
                raise JobSpecError(
                    "output.retain_days: applies to an output the service places (leave "
                    "output.path unset); the service never deletes a folder you named"
                )
            return body, None
        body["output"] = {
            **output,
            "path": str(self.settings.outputs_dir(principal.owner) / job_id),
        }
        days = output.get("retain_days", self.settings.retention_days)
        retain = float(days) * 86400 if isinstance(days, int | float) and days > 0 else None
        return body, retain

    def _dataset(self, given: dict[str, Any], principal: Principal) -> dict[str, Any]:
        from llm_batch.service.files import dataset_format

        file_id = given["file_id"]
        if "path" in given:
            raise JobSpecError("input: give either path or file_id, not both")
        if self.files is None:
            raise JobSpecError("input.file_id: this service stores no files")
        row = self.files.get(str(file_id), principal) if isinstance(file_id, str) else None
        if row is None:
            raise JobSpecError(
                f"input.file_id: no uploaded file {file_id!r} (upload a dataset with "
                "POST /v1/files, purpose `dataset`)"
            )
        if row.purpose != "dataset":
            raise JobSpecError(
                f"input.file_id: {file_id!r} was uploaded with purpose {row.purpose!r}; a "
                "job's input is uploaded with purpose `dataset`"
            )
        path = self.files.content(row)
        if path is None:
            raise JobSpecError(f"input.file_id: the content of {file_id!r} is gone")
        fmt = dataset_format(path, row.filename)
        rest = {k: v for k, v in given.items() if k != "file_id"}
        return {**rest, "path": str(path), "format": rest.get("format", fmt)}

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

    def retry(self, job_id: str, changes: Any, principal: Principal) -> Job:
        """Queue an ended job again to run only its rows with errors. ``changes``: None, or
        ``{"model": ...}`` / ``{"models": [...]}`` replacing the job's model block(s) (the
        models' names stay, so that new rows replace old ones); validated as a submission.
        ``JobConflict`` when the job has not ended or has no row with an error."""
        from llm_batch.job.spec import JobSpec
        from llm_batch.pipeline.retry import failed_rows

        job = self._unexpired(job_id, principal)
        if job.status not in TERMINAL:
            raise JobConflict(
                f"job {job_id} is {job.status}: its rows with errors can be retried once it "
                "has ended"
            )
        spec = before = JobSpec.from_dict(job.spec, source=f"job {job_id}")
        if changes:
            allowed = {"model", "models"}
            unknown = sorted(set(changes) - allowed) if isinstance(changes, dict) else ["body"]
            if unknown:
                raise JobSpecError(
                    f"{unknown[0]}: a retry takes only `model` or `models` (the job's model "
                    "block(s), changed)"
                )
            body = {k: v for k, v in job.spec.items() if k not in allowed}
            spec = prepare_submission({**body, **changes}, self.admission(principal)).spec
            if spec.model_names != before.model_names:
                names = ", ".join(str(n) for n in before.model_names)
                raise JobSpecError(
                    f"models: a retry keeps the job's model names ({names}), so that its new "
                    "rows replace the old ones"
                )
        failed = failed_rows(job.output_path, spec.model_names)
        if failed == 0:
            raise JobConflict(f"job {job_id} has no rows with errors: nothing to retry")
        if failed is None and spec.digest() != before.digest():
            raise JobConflict(
                f"job {job_id} stopped before its output was complete: retry it without "
                "changes first (it resumes where it stopped), then with them"
            )
        job = self.store.retry(
            job_id,
            spec=spec.model_dump(mode="json"),
            priority=spec.priority,
            progress=initial_progress((job.progress or {}).get("rows_total")),
        )
        self._wake()
        return job

    def result_files(self, job_id: str, principal: Principal) -> tuple[Job, list[str]]:
        """The job and the part files it has written so far; ``JobConflict`` when none."""
        from llm_batch.service import results

        job = self._unexpired(job_id, principal)
        files = [] if job.status == JobStatus.QUEUED.value else results.part_files(job.output_path)
        if not files:
            raise JobConflict(f"job {job_id} has written no rows yet (status: {job.status})")
        return job, files

    def output_files(self, job_id: str, principal: Principal) -> tuple[Job, list[OutputFile]]:
        """The files of the job's output folder that the job wrote (its manifest's: part
        files, ``_metrics.json``), complete ones only, in name order."""
        from llm_batch.service import results

        job = self._unexpired(job_id, principal)
        if job.status == JobStatus.QUEUED.value:
            return job, []
        return job, [OutputFile(name, size) for name, size in results.owned_files(job.output_path)]

    def output_file(self, job_id: str, name: str, principal: Principal) -> tuple[Job, OutputFile]:
        """One of ``output_files``; ``JobNotFound``-like ``FileNotInOutput`` otherwise."""
        job, files = self.output_files(job_id, principal)
        for f in files:
            if f.name == name:
                return job, f
        raise OutputFileNotFound(job_id, name)

    def usage(self, principal: Principal, *, days: int) -> list[dict[str, Any]]:
        """Jobs, rows and tokens per key, model and UTC day (of the job's creation), over
        the last ``days`` days, from the job store: this key's (an admin's: every key's).
        A job's counts are what its driver last reported (a running job's so far)."""
        import datetime as dt

        since = utcnow() - dt.timedelta(days=days)
        names = {
            str(self.catalog.block(n, field="model").get("path", "")): n for n in self.catalog.names
        }
        totals: dict[tuple[str, str, str | None], dict[str, int]] = {}
        for job in self.store.since(since, owner=principal.owner, admin=principal.admin):
            spec = job.spec or {}
            day = job.created_at.date().isoformat()
            models = (job.progress or {}).get("models") or {}
            for name, counts in models.items():
                if name == "default":
                    path = str((spec.get("model") or {}).get("path", "default"))
                    name = names.get(path, path)
                row = totals.setdefault(
                    (day, str(name), job.owner),
                    {"jobs": 0, "rows": 0, "rows_failed": 0, "input_tokens": 0, "output_tokens": 0},
                )
                row["jobs"] += 1
                row["rows"] += int(counts.get("rows_done", 0))
                row["rows_failed"] += int(counts.get("rows_failed", 0))
                row["input_tokens"] += int(counts.get("input_tokens", 0))
                row["output_tokens"] += int(counts.get("output_tokens", 0))
        return [
            {"day": day, "model": model, "owner": owner, **counts}
            for (day, model, owner), counts in sorted(
                totals.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "")
            )
        ]

    def _unexpired(self, job_id: str, principal: Principal) -> Job:
        job = self.get(job_id, principal)
        if job.expired_at is not None:
            raise FileExpired(f"the output of job {job_id}", job.expired_at)
        return job

    def _wake(self) -> None:
        if self.scheduler is not None:
            self.scheduler.wake()
