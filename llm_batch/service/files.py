"""The service's stored files (OpenAI's Files API): uploads and batch output files.

One module owns the bytes: an upload is streamed to a hidden file in the key's own
``files/`` folder (``Settings.files_dir(owner)``, ``openai/upload.py``), checked,
given its id and renamed into place, then recorded; a deletion removes the record
and the bytes. A key sees only the files it uploaded (and the output files of its
batches); an admin key sees all; others' files are "not found".

Purposes: ``batch`` (an OpenAI Batch API input, JSONL) and ``dataset`` (a native job's
input: Parquet, JSONL or CSV, named in a job as ``input: {file_id: ...}``). A file may
expire (``expires_after``: seconds after its creation); an expired file answers "not
found, expired" and the retention sweep (``service/retention.py``) removes its bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from llm_batch.job.spec import InputFormat, format_of
from llm_batch.service.errors import FileExpired, FileRefused
from llm_batch.service.jobs import Principal
from llm_batch.service.openai.store import BatchStore, new_file_id
from llm_batch.service.openai.upload import receive_upload
from llm_batch.service.settings import Settings
from llm_batch.service.store import StoredFile, utcnow

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["FileStorage", "PURPOSES", "dataset_format"]

PURPOSES = ("batch", "dataset")


def dataset_format(path: Path, filename: str) -> InputFormat:
    """A dataset upload's format: Parquet by its magic bytes, else the file name's
    extension (JSONL or CSV); checked by reading its head. Raises ``FileRefused``."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"PAR1":
            import pyarrow.parquet as pq

            try:
                pq.read_metadata(path)
            except Exception as e:  # noqa: BLE001 - any reader error is the file's
                raise _bad_dataset(f"it starts as Parquet but cannot be read: {e}") from None
            return "parquet"
        f.seek(0)
        first = f.readline(1 << 20).decode("utf-8", errors="replace").strip()
    fmt = format_of(filename)
    if fmt is None:
        raise _bad_dataset(
            f"cannot tell the format of {filename!r}: a dataset is Parquet, or JSON lines "
            "(.jsonl) or CSV (.csv) named by its extension"
        )
    if fmt == "jsonl":
        try:
            row = json.loads(first)
        except ValueError as e:
            raise _bad_dataset(f"line 1 is not JSON: {e}") from None
        if not isinstance(row, dict):
            raise _bad_dataset("line 1 is not a JSON object of columns")
    elif fmt == "csv" and not first:
        raise _bad_dataset("the CSV file has no header line")
    return fmt


def _bad_dataset(why: str) -> FileRefused:
    return FileRefused(f"file: not a usable dataset: {why}", param="file", code="invalid_file")


class FileStorage:
    def __init__(self, *, settings: Settings, store: BatchStore, max_bytes: int):
        self.settings = settings
        self.store = store
        self.max_bytes = max_bytes

    def path(self, row: StoredFile) -> Path:
        return self.settings.file_path(row.owner, row.id)

    async def receive(self, request: Request, principal: Principal) -> StoredFile:
        """Stream a multipart upload (fields ``file``, ``purpose`` and optionally
        ``expires_after[anchor]``/``expires_after[seconds]``) into the key's storage.
        Raises ``UploadInvalid`` / ``UploadTooLarge`` (``openai/upload.py``) and
        ``FileRefused`` naming the field."""
        from fastapi.concurrency import run_in_threadpool

        folder = self.settings.files_dir(principal.owner)
        upload = await receive_upload(request, folder, max_bytes=self.max_bytes)
        try:
            purpose = upload.fields.get("purpose")
            if upload.path is None:
                raise FileRefused(
                    "send the file as the multipart field `file`",
                    param="file",
                    code="missing_required_parameter",
                )
            if purpose is None:
                raise FileRefused(
                    "purpose is required", param="purpose", code="missing_required_parameter"
                )
            if purpose not in PURPOSES:
                raise FileRefused(
                    f"purpose {purpose!r} is not supported: this service takes batch input "
                    "files (purpose `batch`) and job datasets (purpose `dataset`)",
                    param="purpose",
                    code="invalid_value",
                )
            expires_at = _expiry(upload.fields, self.settings.min_expires_after_seconds)
            filename = upload.filename or "upload"
            if purpose == "dataset":
                await run_in_threadpool(dataset_format, upload.path, filename)
            file_id = new_file_id()
            os.replace(upload.path, folder / file_id)
        except BaseException:
            if upload.path is not None:
                upload.path.unlink(missing_ok=True)
            raise
        return await run_in_threadpool(
            self.store.add_file,
            file_id=file_id,
            filename=filename,
            purpose=purpose,
            size=upload.size,
            owner=principal.owner,
            expires_at=expires_at,
        )

    def get(self, file_id: str, principal: Principal) -> StoredFile | None:
        """The file if this key may see it; ``FileExpired`` once it has expired."""
        row = self.store.get_file(file_id, owner=principal.owner, admin=principal.admin)
        if row is not None and row.expires_at is not None and row.expires_at <= utcnow():
            raise FileExpired(file_id, row.expires_at)
        return row

    def content(self, row: StoredFile) -> Path | None:
        """Where a stored file's bytes are; None when they are gone."""
        path = self.path(row)
        return path if path.is_file() else None

    def delete(self, row: StoredFile) -> bool:
        """The record and the bytes; a batch already validated keeps running (its input was
        converted when it was validated)."""
        deleted = self.store.delete_file(row.id)
        self.path(row).unlink(missing_ok=True)
        return deleted


def _expiry(fields: dict[str, str], low: int) -> dt.datetime | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise FileRefused(
            f"expires_after.anchor: expected `created_at`, got {anchor!r}",
            param="expires_after.anchor",
            code="invalid_value",
        )
    high = 30 * 86400  # OpenAI's bounds: an hour (the operator may lower it) to 30 days
    if seconds is None or not seconds.isdigit() or not low <= int(seconds) <= high:
        raise FileRefused(
            f"expires_after.seconds: expected a whole number of seconds from {low} to "
            f"{high}, got {seconds!r}",
            param="expires_after.seconds",
            code="invalid_value",
        )
    return utcnow() + dt.timedelta(seconds=int(seconds))
