"""Queries of the ``files`` and ``batches`` tables (defined in ``llm_batch.service.store``).

Same rules as the job store: every method opens its own session (thread safe),
and every status change is a conditional ``UPDATE ... WHERE status IN (...)``,
so a cancel from the API and the batch runner's next step never both win.
A caller that is not an admin sees only the rows its key created; anything
else is "not found".
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import delete, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from llm_batch.service.store import Batch, JobStore, StoredFile, new_event, utcnow

__all__ = [
    "ACTIVE_BATCH",
    "BatchStore",
    "TERMINAL_BATCH",
    "new_batch_id",
    "new_file_id",
]

# Statuses the batch runner still has work in; the others are final.
ACTIVE_BATCH = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL_BATCH = ("completed", "failed", "expired", "cancelled")

_Row = TypeVar("_Row", StoredFile, Batch)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


class BatchStore:
    def __init__(self, jobs: JobStore):
        self._sessions = sessionmaker(jobs.engine, expire_on_commit=False)
        self.jobs = jobs

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @staticmethod
    def _visible(row: _Row | None, owner: str | None, admin: bool) -> _Row | None:
        if row is None or (not admin and row.owner != owner):
            return None
        return row

    def _page(
        self,
        model: type[_Row],
        *,
        owner: str | None,
        admin: bool,
        limit: int,
        after: str | None,
        order: Literal["asc", "desc"],
        where: Sequence[Any] = (),
    ) -> tuple[list[_Row], bool] | None:
        """A page in creation order; None when ``after`` names no visible row."""
        query = select(model).where(*where)
        if not admin:
            query = query.where(model.owner == owner)
        with self._session() as s:
            if after is not None:
                cursor = self._visible(s.get(model, after), owner, admin)
                if cursor is None:
                    return None
                if order == "desc":
                    query = query.where(
                        or_(
                            model.created_at < cursor.created_at,
                            (model.created_at == cursor.created_at) & (model.id < cursor.id),
                        )
                    )
                else:
                    query = query.where(
                        or_(
                            model.created_at > cursor.created_at,
                            (model.created_at == cursor.created_at) & (model.id > cursor.id),
                        )
                    )
            if order == "desc":
                query = query.order_by(model.created_at.desc(), model.id.desc())
            else:
                query = query.order_by(model.created_at, model.id)
            rows = list(s.scalars(query.limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    # -- files -------------------------------------------------------------------------

    def add_file(
        self,
        *,
        file_id: str,
        filename: str,
        purpose: str,
        size: int,
        owner: str | None,
        expires_at: dt.datetime | None = None,
    ) -> StoredFile:
        row = StoredFile(
            id=file_id,
            expires_at=expires_at,
            owner=owner,
            filename=filename,
            purpose=purpose,
            bytes=size,
            created_at=utcnow(),
        )
        with self._session() as s:
            s.add(row)
        return row

    def get_file(self, file_id: str, *, owner: str | None, admin: bool) -> StoredFile | None:
        with self._session() as s:
            return self._visible(s.get(StoredFile, file_id), owner, admin)

    def page_files(
        self,
        *,
        owner: str | None,
        admin: bool,
        limit: int,
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
        purpose: str | None = None,
    ) -> tuple[list[StoredFile], bool] | None:
        where = [StoredFile.purpose == purpose] if purpose is not None else []
        return self._page(
            StoredFile, owner=owner, admin=admin, limit=limit, after=after, order=order, where=where
        )

    def delete_file(self, file_id: str) -> bool:
        with self._session() as s:
            result = cast(
                "CursorResult[Any]", s.execute(delete(StoredFile).where(StoredFile.id == file_id))
            )
            return bool(result.rowcount)

    # -- batches -----------------------------------------------------------------------

    def create_batch(
        self,
        *,
        batch_id: str,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        owner: str | None,
        window_seconds: float = 86400.0,
        output_expires_seconds: int | None = None,
    ) -> Batch:
        now = utcnow()
        row = Batch(
            id=batch_id,
            owner=owner,
            status="validating",
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            meta=metadata,
            request_counts={"total": 0, "completed": 0, "failed": 0},
            created_at=now,
            updated_at=now,
            expires_at=now + dt.timedelta(seconds=window_seconds),
            output_expires_seconds=output_expires_seconds,
        )
        with self._session() as s:
            s.add(row)
        return row

    def get_batch(
        self, batch_id: str, *, owner: str | None = None, admin: bool = True
    ) -> Batch | None:
        with self._session() as s:
            return self._visible(s.get(Batch, batch_id), owner, admin)

    def page_batches(
        self, *, owner: str | None, admin: bool, limit: int, after: str | None = None
    ) -> tuple[list[Batch], bool] | None:
        """Newest first, as OpenAI lists them."""
        return self._page(Batch, owner=owner, admin=admin, limit=limit, after=after, order="desc")

    def active_batches(self) -> list[Batch]:
        """Batches the runner still has to move along, oldest first."""
        query = (
            select(Batch).where(Batch.status.in_(ACTIVE_BATCH)).order_by(Batch.created_at, Batch.id)
        )
        with self._session() as s:
            return list(s.scalars(query))

    def update_batch(
        self, batch_id: str, *, from_statuses: Sequence[str] | None = None, **values: Any
    ) -> bool:
        """Set fields (and ``status``) of a batch, only while it is in ``from_statuses``."""
        query = update(Batch).where(Batch.id == batch_id)
        if from_statuses is not None:
            query = query.where(Batch.status.in_(from_statuses))
        with self._session() as s:
            result = cast(
                "CursorResult[Any]", s.execute(query.values(updated_at=utcnow(), **values))
            )
            return bool(result.rowcount)

    def cancel_batch(self, batch_id: str) -> bool:
        """validating / in_progress → cancelling; False when the batch is past that."""
        now = utcnow()
        return self.update_batch(
            batch_id,
            from_statuses=("validating", "in_progress"),
            status="cancelling",
            cancelling_at=now,
        )

    def finish_batch(
        self,
        batch_id: str,
        *,
        from_statuses: Sequence[str],
        status: str,
        files: Sequence[StoredFile] = (),
        at: dt.datetime | None = None,
        **values: Any,
    ) -> bool:
        """The batch's final status and its output/error files' rows, in one transaction:
        either the files are registered and the batch ends, or neither happens."""
        now = at or utcnow()
        stamp = {
            "completed": "completed_at",
            "failed": "failed_at",
            "cancelled": "cancelled_at",
            "expired": "expired_at",
        }[status]
        if stamp is not None:
            values[stamp] = now
        with self._session() as s:
            result = cast(
                "CursorResult[Any]",
                s.execute(
                    update(Batch)
                    .where(Batch.id == batch_id, Batch.status.in_(from_statuses))
                    .values(status=status, updated_at=now, **values)
                ),
            )
            if not result.rowcount:
                return False  # nothing was changed: committing is a no-op
            batch = s.get(Batch, batch_id)
            keep = batch.output_expires_seconds if batch is not None else None
            for row in files:
                if keep:
                    row.expires_at = now + dt.timedelta(seconds=keep)
                s.merge(row)
            if self.jobs.webhook_url:
                new_event(
                    s,
                    kind="batch",
                    obj="batch",
                    row_id=batch_id,
                    status=status,
                    urls=[self.jobs.webhook_url],
                )
        return True
