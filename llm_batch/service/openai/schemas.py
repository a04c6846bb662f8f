"""The objects of OpenAI's Files and Batch APIs, as this service returns them.

Field names, types and status values are OpenAI's (the ``openai`` package's
``FileObject`` and ``Batch`` parse them); timestamps are Unix seconds.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from llm_batch.service.store import Batch, StoredFile

__all__ = [
    "BATCH_STATUSES",
    "BatchCreate",
    "BatchError",
    "BatchErrors",
    "BatchList",
    "BatchObject",
    "BatchUsage",
    "FileDeleted",
    "FileList",
    "FileObject",
    "RequestCounts",
    "batch_object",
    "file_object",
    "timestamp",
]

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
BATCH_STATUSES: tuple[str, ...] = BatchStatus.__args__  # type: ignore[attr-defined]


def timestamp(value: dt.datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output", "dataset"]
    status: Literal["processed"] = Field(
        default="processed", description="Deprecated by OpenAI; always `processed` here."
    )
    expires_at: int | None = Field(default=None, description="When it expires (None: never).")
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512


class BatchCreate(BaseModel):
    """The body of ``POST /v1/batches``. A refusal's pydantic error ``type`` is OpenAI's
    error ``code`` (``unsupported_value``, ``invalid_value``)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="A file uploaded with purpose `batch`.")
    endpoint: str = Field(
        description="`/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`."
    )
    completion_window: str = Field(description="`24h` (the only value OpenAI takes).")
    metadata: dict[str, str] | None = Field(
        default=None, description="Up to 16 pairs; keys up to 64, values up to 512 characters."
    )
    output_expires_after: dict[str, Any] | None = Field(
        default=None,
        description="`{anchor: created_at, seconds}`: the output and error files expire "
        "that long after they are written (3600 to 2592000 seconds).",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        from llm_batch.service.openai.convert import ENDPOINTS

        if value not in ENDPOINTS:
            raise PydanticCustomError(
                "unsupported_value",
                "endpoint {endpoint!r} is not supported here; use one of {allowed}",
                {"endpoint": value, "allowed": ", ".join(ENDPOINTS)},
            )
        return value

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if value != "24h":
            raise PydanticCustomError("invalid_value", "completion_window must be 24h")
        return value

    @field_validator("output_expires_after")
    @classmethod
    def _output_expiry(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        seconds = value.get("seconds")
        if (
            value.get("anchor") != "created_at"
            or set(value) - {"anchor", "seconds"}
            or not isinstance(seconds, int)
            or isinstance(seconds, bool)
            or not 3600 <= seconds <= 30 * 86400
        ):
            raise PydanticCustomError(
                "invalid_value",
                "output_expires_after must be {anchor: created_at, seconds: 3600 to 2592000}",
            )
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        pairs = value or {}
        if len(pairs) > METADATA_PAIRS or any(
            len(k) > METADATA_KEY or len(v) > METADATA_VALUE for k, v in pairs.items()
        ):
            raise PydanticCustomError(
                "invalid_value",
                f"metadata holds at most {METADATA_PAIRS} pairs, keys up to {METADATA_KEY} "
                f"and values up to {METADATA_VALUE} characters",
            )
        return value


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class _InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class _OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: _InputTokensDetails = Field(default_factory=_InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: _OutputTokensDetails = Field(default_factory=_OutputTokensDetails)
    total_tokens: int = 0


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = Field(default=None, description="The model (or models) it runs.")
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = Field(
        default=None, description="When the completion window ends: unfinished, it expires."
    )
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    usage: BatchUsage


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


def file_object(row: StoredFile) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=int(row.created_at.timestamp()),
        filename=row.filename,
        purpose=row.purpose,  # type: ignore[arg-type]
        expires_at=timestamp(row.expires_at),
    )


def batch_object(row: Batch) -> BatchObject:
    usage = row.usage or {}
    return BatchObject(
        id=row.id,
        endpoint=row.endpoint,
        model=row.model,
        errors=BatchErrors(data=[BatchError(**e) for e in row.errors]) if row.errors else None,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=row.status,  # type: ignore[arg-type]
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        created_at=int(row.created_at.timestamp()),
        in_progress_at=timestamp(row.in_progress_at),
        finalizing_at=timestamp(row.finalizing_at),
        completed_at=timestamp(row.completed_at),
        failed_at=timestamp(row.failed_at),
        expires_at=timestamp(row.expires_at),
        expired_at=timestamp(row.expired_at),
        cancelling_at=timestamp(row.cancelling_at),
        cancelled_at=timestamp(row.cancelled_at),
        request_counts=RequestCounts(**(row.request_counts or {})),
        metadata=row.meta,
        usage=BatchUsage(
            input_tokens=usage.get("input_tokens", 0),
            output_tokens=usage.get("output_tokens", 0),
            total_tokens=usage.get("total_tokens", 0),
        ),
    )
