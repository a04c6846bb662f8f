"""``/v1/files``: OpenAI's Files API, for batch inputs and outputs and job datasets.

The routes translate HTTP to the service's file storage (``service/files.py``) and
back: uploads are streamed to disk as they arrive (never held in memory, never
stored in the database) and cut off with ``413`` once they pass ``max_upload_bytes``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from llm_batch.service.api.deps import BatchStoreDep, FileStorageDep, PrincipalDep
from llm_batch.service.api.errors import OpenAIError
from llm_batch.service.errors import FileExpired, FileRefused
from llm_batch.service.openai.schemas import FileDeleted, FileList, FileObject, file_object
from llm_batch.service.openai.upload import UploadInvalid, UploadTooLarge
from llm_batch.service.store import StoredFile

__all__ = ["router"]

router = APIRouter(prefix="/v1/files", tags=["files"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No file with this id (for this key)."}
}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch", "dataset"]},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer"},
                    },
                }
            }
        },
    }
}


def _file(files: FileStorageDep, principal: PrincipalDep, file_id: str) -> StoredFile:
    try:
        row = files.get(file_id, principal)
    except FileExpired as e:
        raise OpenAIError(404, str(e), param="file_id", code="file_expired") from None
    if row is None:
        raise OpenAIError(404, f"No such File object: {file_id}", param="file_id")
    return row


@router.post(
    "",
    response_model=FileObject,
    summary="Upload a file",
    openapi_extra=_UPLOAD_BODY,
    responses={
        400: {"description": "Not a multipart upload, no `file`, or a purpose other than batch."},
        413: {"description": "The file is larger than `max_upload_bytes`."},
    },
)
async def create_file(
    request: Request, files: FileStorageDep, principal: PrincipalDep
) -> FileObject:
    """Multipart fields `file` and `purpose`: `batch` (a JSONL batch input) or `dataset`
    (a job's input, Parquet, JSONL or CSV, named in a job as `input: {file_id}`); optional
    `expires_after[anchor]=created_at` and `expires_after[seconds]`."""
    try:
        row = await files.receive(request, principal)
    except UploadTooLarge as e:
        raise OpenAIError(413, str(e), param="file", code="file_too_large") from None
    except UploadInvalid as e:
        raise OpenAIError(400, str(e)) from None
    except FileRefused as e:
        raise OpenAIError(400, str(e), param=e.param, code=e.code) from None
    return file_object(row)


@router.get("", response_model=FileList, summary="List files")
def list_files(
    store: BatchStoreDep,
    principal: PrincipalDep,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Files per page.")] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time.")] = "desc",
    purpose: Annotated[str | None, Query(description="Only files with this purpose.")] = None,
) -> FileList:
    page = store.page_files(
        owner=principal.owner,
        admin=principal.admin,
        limit=limit,
        after=after,
        order=order,
        purpose=purpose,
    )
    if page is None:
        raise OpenAIError(400, f"after: no file with id {after!r}", param="after")
    rows, has_more = page
    return FileList(
        data=[file_object(r) for r in rows],
        first_id=rows[0].id if rows else None,
        last_id=rows[-1].id if rows else None,
        has_more=has_more,
    )


@router.get("/{file_id}", response_model=FileObject, responses=_NOT_FOUND, summary="Get a file")
def get_file(file_id: str, files: FileStorageDep, principal: PrincipalDep) -> FileObject:
    return file_object(_file(files, principal, file_id))


@router.get(
    "/{file_id}/content",
    response_class=FileResponse,
    responses=_NOT_FOUND,
    summary="Download a file's content",
)
def file_content(file_id: str, files: FileStorageDep, principal: PrincipalDep) -> FileResponse:
    row = _file(files, principal, file_id)
    path = files.content(row)
    if path is None:
        raise OpenAIError(404, f"the content of {file_id} is gone", param="file_id")
    return FileResponse(path, media_type="application/octet-stream", filename=row.filename)


@router.delete(
    "/{file_id}", response_model=FileDeleted, responses=_NOT_FOUND, summary="Delete a file"
)
def delete_file(file_id: str, files: FileStorageDep, principal: PrincipalDep) -> FileDeleted:
    """The file and its bytes; a batch already validated keeps running (its input was
    converted when it was validated)."""
    row = _file(files, principal, file_id)
    return FileDeleted(id=row.id, deleted=files.delete(row))
