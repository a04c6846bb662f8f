"""The service's stored files (OpenAI's Files API): uploads and batch output files.

One module owns the bytes: an upload is streamed to a hidden file in
``<data_dir>/files/`` (``openai/upload.py``), checked, given its id and renamed
into place, then recorded; a deletion removes the record and the bytes. A key
sees only the files it uploaded (and the output files of its batches); an admin
key sees all; others' files are "not found".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from llm_batch.service.errors import FileRefused
from llm_batch.service.jobs import Principal
from llm_batch.service.openai.store import BatchStore, new_file_id
from llm_batch.service.openai.upload import receive_upload
from llm_batch.service.store import StoredFile

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["FileStorage", "PURPOSES"]

PURPOSES = ("batch",)


class FileStorage:
    def __init__(self, *, folder: Path, store: BatchStore, max_bytes: int):
        self.folder = folder
        self.store = store
        self.max_bytes = max_bytes

    def path(self, file_id: str) -> Path:
        return self.folder / file_id

    async def receive(self, request: Request, principal: Principal) -> StoredFile:
        """Stream a multipart upload (fields ``file`` and ``purpose``) into storage.
        Raises ``UploadInvalid`` / ``UploadTooLarge`` (``openai/upload.py``) and
        ``FileRefused`` naming the field."""
        from fastapi.concurrency import run_in_threadpool

        upload = await receive_upload(request, self.folder, max_bytes=self.max_bytes)
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
                    "files (purpose `batch`)",
                    param="purpose",
                    code="invalid_value",
                )
            file_id = new_file_id()
            os.replace(upload.path, self.path(file_id))
        except BaseException:
            if upload.path is not None:
                upload.path.unlink(missing_ok=True)
            raise
        return await run_in_threadpool(
            self.store.add_file,
            file_id=file_id,
            filename=upload.filename or "upload",
            purpose=purpose,
            size=upload.size,
            owner=principal.owner,
        )

    def get(self, file_id: str, principal: Principal) -> StoredFile | None:
        return self.store.get_file(file_id, owner=principal.owner, admin=principal.admin)

    def content(self, row: StoredFile) -> Path | None:
        """Where a stored file's bytes are; None when they are gone."""
        path = self.path(row.id)
        return path if path.is_file() else None

    def delete(self, row: StoredFile) -> bool:
        """The record and the bytes; a batch already validated keeps running (its input was
        converted when it was validated)."""
        deleted = self.store.delete_file(row.id)
        self.path(row.id).unlink(missing_ok=True)
        return deleted
