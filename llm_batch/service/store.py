"""The job store: one ``jobs`` table, SQLAlchemy 2.0, SQLite by default or PostgreSQL by URL.

Every state change is a conditional ``UPDATE ... WHERE status IN (...)``, so the
API threads and the scheduler thread never overwrite each other's transitions
(a job cancelled while the scheduler picks it is either cancelled or picked,
never both).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from llm_batch.service.errors import JobConflict, JobNotFound

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "Batch",
    "Job",
    "JobStatus",
    "JobStore",
    "Event",
    "StoredFile",
    "new_event",
    "initial_progress",
    "new_job_id",
    "utcnow",
]

logger = logging.getLogger(__name__)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


ACTIVE = (JobStatus.RUNNING.value, JobStatus.CANCELLING.value)
TERMINAL = (JobStatus.CANCELLED.value, JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)


# The idempotency keys of the jobs an OpenAI batch runs (openai/runner.py).
BATCH_JOB_PREFIX = "openai-batch:"


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def initial_progress(rows_total: int | None) -> dict[str, Any]:
    """A job's progress before its driver has reported anything."""
    return {
        "rows_total": rows_total,
        "rows_done": 0,
        "rows_failed": 0,
        "output_tokens": 0,
        "rows_per_second": 0.0,
    }


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Base(DeclarativeBase):
    pass


class Job(_Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    output_path: Mapped[str] = mapped_column(Text)
    ray_submission_id: Mapped[str | None] = mapped_column(String(64), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, default=None)
    # Who submitted it: a digest of the API key (never the key), None without auth.
    owner: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # How many times its rows with errors were sent to run again (POST /v1/jobs/{id}/retry):
    # above 0, its runs are retries (``llm-batch run --retry-errors``), each a Ray
    # submission of its own (``submission_id``).
    retries: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    # A service-managed output is kept this long after the job ends (None: forever);
    # ``expires_at`` is set when it ends, ``expired_at`` once the sweep deleted it.
    retain_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    expires_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), index=True, default=None
    )
    expired_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes; everything this store writes is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


@event.listens_for(Job, "load")
def _on_load(job: Job, _context: Any) -> None:
    for name in (
        "created_at",
        "started_at",
        "finished_at",
        "updated_at",
        "expires_at",
        "expired_at",
    ):
        setattr(job, name, _aware(getattr(job, name)))


class StoredFile(_Base):
    """A file of the OpenAI Files API; its bytes live at ``<data_dir>/files/<id>``, never here."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    # After this the file answers "expired" and the retention sweep deletes its bytes.
    expires_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), index=True, default=None
    )


class Batch(_Base):
    """A batch of the OpenAI Batch API: one job per group of its requests (``jobs``)."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    status: Mapped[str] = mapped_column(String(16), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    # "metadata" is taken by SQLAlchemy's declarative base; the column keeps the API's name.
    meta: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, default=None)
    model: Mapped[str | None] = mapped_column(String(255), default=None)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    # [{"job_id", "model", "requests"}], one per group of requests that share a job.
    jobs: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    output_file_id: Mapped[str | None] = mapped_column(String(40), default=None)
    error_file_id: Mapped[str | None] = mapped_column(String(40), default=None)
    request_counts: Mapped[dict[str, int] | None] = mapped_column(JSON, default=None)
    usage: Mapped[dict[str, int] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # completion_window's end: a batch not finished by then becomes expired.
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    expired_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # output_expires_after.seconds: how long its output and error files are kept.
    output_expires_seconds: Mapped[int | None] = mapped_column(Integer, default=None)


class Event(_Base):
    """A webhook call to make (an outbox): written in the transaction that ended the job
    or batch, deleted never, marked delivered once the receiver answered 2xx."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # webhook-id
    type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    next_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), index=True, default=None
    )  # None once delivered or given up
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text, default=None)


def new_event(
    session: Session, *, kind: str, obj: str, row_id: str, status: str, urls: Sequence[str]
) -> None:
    """Queue ``<kind>.<status>`` (``job.succeeded``, ``batch.expired``...) for each URL, in
    the caller's transaction: the end and its notice are committed together."""
    now = utcnow()
    for url in dict.fromkeys(urls):
        event_id = "evt_" + secrets.token_hex(12)
        session.add(
            Event(
                id=event_id,
                type=f"{kind}.{status}",
                url=url,
                payload={
                    "id": event_id,
                    "object": "event",
                    "type": f"{kind}.{status}",
                    "created_at": int(now.timestamp()),
                    "data": {"id": row_id, "object": obj, "status": status},
                },
                created_at=now,
                next_at=now,
                attempts=0,
            )
        )


@event.listens_for(Event, "load")
@event.listens_for(StoredFile, "load")
@event.listens_for(Batch, "load")
def _on_load_aware(row: Any, _context: Any) -> None:
    for column in row.__table__.columns:
        if isinstance(column.type, DateTime):
            attr = row.__mapper__.get_property_by_column(column).key
            setattr(row, attr, _aware(getattr(row, attr)))


def _execute(session: Session, statement: Any) -> int:
    """Run an UPDATE; returns how many rows it changed."""
    return cast("CursorResult[Any]", session.execute(statement)).rowcount


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the scheduler writes; the busy timeout makes
    # a writer wait for the other instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class JobStore:
    """Jobs in a database; every method opens and closes its own session (thread safe)."""

    def __init__(self, url: str, *, echo: bool = False):
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        self.url = url
        self.engine: Engine = create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Set by the service: every job's and batch's end is also POSTed here.
        self.webhook_url: str | None = None

    # -- schema --------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the tables, then add the columns a newer version defines (additive only)."""
        _Base.metadata.create_all(self.engine)
        for table in _Base.metadata.sorted_tables:
            existing = {c["name"] for c in inspect(self.engine).get_columns(table.name)}
            missing = [c for c in table.columns if c.name not in existing]
            if not missing:
                continue
            with self.engine.begin() as conn:
                for column in missing:
                    ddl_type = column.type.compile(dialect=self.engine.dialect)
                    logger.info("adding column %s.%s (%s)", table.name, column.name, ddl_type)
                    conn.execute(
                        text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {ddl_type}')
                    )

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    # -- the API's side ----------------------------------------------------------------

    def create(
        self,
        *,
        job_id: str,
        name: str,
        spec: dict[str, Any],
        output_path: str,
        priority: int = 0,
        progress: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        owner: str | None = None,
        retain_seconds: float | None = None,
    ) -> tuple[Job, bool]:
        """Insert a queued job; returns (job, created). With an idempotency key already
        used, returns the job it made (``created`` False), or raises ``JobConflict``
        when that job's spec differs."""
        if idempotency_key is not None:
            existing = self.get_by_idempotency_key(idempotency_key)
            if existing is not None:
                return self._replay(existing, spec), False
        now = utcnow()
        job = Job(
            id=job_id,
            name=name,
            status=JobStatus.QUEUED.value,
            priority=priority,
            spec=spec,
            output_path=output_path,
            idempotency_key=idempotency_key,
            owner=owner,
            progress=progress,
            retain_seconds=retain_seconds,
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        try:
            with self._session() as s:
                s.add(job)
        except IntegrityError:
            # Two requests with one key raced; the other one's insert won.
            if idempotency_key is None:
                raise
            existing = self.get_by_idempotency_key(idempotency_key)
            if existing is None:
                raise
            return self._replay(existing, spec), False
        return job, True

    @staticmethod
    def _replay(existing: Job, spec: dict[str, Any]) -> Job:
        if existing.spec != spec:
            raise JobConflict(
                f"Idempotency-Key {existing.idempotency_key!r} was already used for job "
                f"{existing.id} with a different job spec; use a new key for a new job"
            )
        return existing

    def get(self, job_id: str, *, owner: str | None = None, admin: bool = True) -> Job:
        """The job; a non-admin caller sees only its own (others' are "not found")."""
        with self._session() as s:
            job = s.get(Job, job_id)
        if job is None or (not admin and job.owner != owner):
            raise JobNotFound(job_id)
        return job

    def get_by_idempotency_key(self, key: str) -> Job | None:
        with self._session() as s:
            return s.scalars(select(Job).where(Job.idempotency_key == key)).first()

    def page(
        self,
        *,
        status: str | None = None,
        limit: int = 20,
        after: str | None = None,
        owner: str | None = None,
        admin: bool = True,
    ) -> tuple[list[Job], bool]:
        """Newest first; ``after`` is the id of the last job of the previous page."""
        query = select(Job)
        if not admin:
            query = query.where(Job.owner == owner)
        if status is not None:
            query = query.where(Job.status == status)
        if after is not None:
            cursor = self.get(after)
            query = query.where(
                or_(
                    Job.created_at < cursor.created_at,
                    (Job.created_at == cursor.created_at) & (Job.id < cursor.id),
                )
            )
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        with self._session() as s:
            jobs = list(s.scalars(query))
        return jobs[:limit], len(jobs) > limit

    def since(self, created: dt.datetime, *, owner: str | None, admin: bool) -> list[Job]:
        """Jobs created since ``created`` (a non-admin caller's own), oldest first."""
        query = select(Job).where(Job.created_at >= created)
        if not admin:
            query = query.where(Job.owner == owner)
        with self._session() as s:
            return list(s.scalars(query.order_by(Job.created_at, Job.id)))

    def cancel(self, job_id: str) -> Job:
        """Queued → cancelled at once; running → cancelling (the scheduler stops it)."""
        now = utcnow()
        with self._session() as s:
            queued = _execute(
                s,
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
                .values(status=JobStatus.CANCELLED.value, finished_at=now, updated_at=now),
            )
            if queued:
                self._ended(s, job_id)
            else:
                _execute(
                    s,
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                    .values(status=JobStatus.CANCELLING.value, updated_at=now),
                )
        job = self.get(job_id)
        if job.status in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value):
            raise JobConflict(
                f"job {job_id} already ended ({job.status}); there is nothing to cancel"
            )
        return job

    # -- the metrics' side (read at each scrape) -----------------------------------------

    def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status (a status no job is in is left out)."""
        with self._session() as s:
            rows = s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        return {status: int(n) for status, n in rows}

    def watched(self, *, finished_since: dt.datetime, limit: int) -> list[Job]:
        """Running and cancelling jobs, then at most ``limit`` jobs that ended since
        ``finished_since``, most recent first."""
        ended = (
            select(Job)
            .where(Job.status.in_(TERMINAL), Job.finished_at >= finished_since)
            .order_by(Job.finished_at.desc(), Job.id)
            .limit(limit)
        )
        with self._session() as s:
            return list(s.scalars(select(Job).where(Job.status.in_(ACTIVE)))) + list(
                s.scalars(ended)
            )

    # -- the scheduler's side ----------------------------------------------------------

    def active(self) -> list[Job]:
        with self._session() as s:
            return list(
                s.scalars(select(Job).where(Job.status.in_(ACTIVE)).order_by(Job.started_at))
            )

    def count_active(self) -> int:
        return len(self.active())

    def next_queued(self, limit: int) -> list[Job]:
        """Queued jobs in run order: higher priority first, then oldest first."""
        query = (
            select(Job)
            .where(Job.status == JobStatus.QUEUED.value)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(limit)
        )
        with self._session() as s:
            return list(s.scalars(query))

    def claim(self, job_id: str, *, submission_id: str) -> bool:
        """Queued → running, recording the Ray submission id before it is submitted, so a
        crash between the two is recovered by asking Ray for that id."""
        now = utcnow()
        with self._session() as s:
            claimed = _execute(
                s,
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
                .values(
                    status=JobStatus.RUNNING.value,
                    ray_submission_id=submission_id,
                    started_at=now,
                    updated_at=now,
                    attempts=Job.attempts + 1,
                ),
            )
        return bool(claimed)

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        with self._session() as s:
            _execute(
                s,
                update(Job)
                .where(Job.id == job_id, Job.status.in_(ACTIVE))
                .values(progress=progress, updated_at=utcnow()),
            )

    def retry(
        self, job_id: str, *, spec: dict[str, Any], priority: int, progress: dict[str, Any]
    ) -> Job:
        """Ended → queued again to run its rows with errors (``spec``: the job's, or with the
        model block the retry changed); ``JobConflict`` unless the job has ended."""
        now = utcnow()
        with self._session() as s:
            changed = _execute(
                s,
                update(Job)
                .where(Job.id == job_id, Job.status.in_(TERMINAL), Job.expired_at.is_(None))
                .values(
                    status=JobStatus.QUEUED.value,
                    spec=spec,
                    priority=priority,
                    progress=progress,
                    error=None,
                    started_at=None,
                    finished_at=None,
                    expires_at=None,
                    ray_submission_id=None,
                    retries=Job.retries + 1,
                    updated_at=now,
                ),
            )
        job = self.get(job_id)
        if not changed:
            raise JobConflict(
                f"job {job_id} is {job.status}: a job's rows with errors can be retried once "
                "it has ended"
            )
        return job

    def requeue(self, job_id: str, *, progress: dict[str, Any] | None = None) -> bool:
        """Running → queued (its Ray run is gone); it will run again from the start."""
        with self._session() as s:
            return bool(
                _execute(
                    s,
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                    .values(
                        status=JobStatus.QUEUED.value,
                        started_at=None,
                        ray_submission_id=None,
                        progress=progress,
                        updated_at=utcnow(),
                    ),
                )
            )

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        progress: dict[str, Any] | None = None,
        error: str | None = None,
        from_statuses: Sequence[str] = ACTIVE,
    ) -> bool:
        values: dict[str, Any] = {
            "status": status.value,
            "finished_at": utcnow(),
            "updated_at": utcnow(),
            "error": error,
        }
        if progress is not None:
            values["progress"] = progress
        with self._session() as s:
            ended = _execute(
                s,
                update(Job).where(Job.id == job_id, Job.status.in_(from_statuses)).values(**values),
            )
            if ended:
                self._ended(s, job_id)
            return bool(ended)

    def _ended(self, session: Session, job_id: str) -> None:
        """In the transaction that ended the job: its output's expiry, its webhooks."""
        job = session.get(Job, job_id)
        if job is None:
            return
        finished = _aware(job.finished_at) or utcnow()
        if job.retain_seconds:
            job.expires_at = finished + dt.timedelta(seconds=job.retain_seconds)
        if BATCH_JOB_PREFIX in (job.idempotency_key or ""):  # stored as "<key id>/openai-batch:…"
            return  # a job of an OpenAI batch: the batch's end is the event
        urls = [self.webhook_url] if self.webhook_url else []
        notify = (job.spec or {}).get("notify") or {}
        if notify.get("url"):
            urls.append(notify["url"])
        new_event(session, kind="job", obj="job", row_id=job.id, status=job.status, urls=urls)
