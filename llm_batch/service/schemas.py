"""What the REST API returns: the job resource, a page of jobs, health."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_batch.service.store import Job

__all__ = ["Health", "JobList", "JobOutput", "JobProgress", "JobPublic", "Readiness", "to_public"]

Status = Literal["queued", "running", "cancelling", "cancelled", "succeeded", "failed"]


class JobProgress(BaseModel):
    """Counts of the job's current (or last) run; extra keys are what the driver reports
    (input_tokens, output_tokens_per_second, eta_seconds, elapsed_seconds, per-model counts,
    a throughput series)."""

    model_config = ConfigDict(extra="allow")

    rows_total: int | None = Field(default=None, description="Input rows, when known.")
    rows_done: int = Field(default=0, description="Rows answered so far (error rows included).")
    rows_failed: int = Field(default=0, description="Rows whose `error` column is set.")
    output_tokens: int = Field(default=0, description="Tokens generated so far.")
    rows_per_second: float = Field(default=0.0, description="Recent throughput.")


class JobOutput(BaseModel):
    path: str = Field(description="Folder of the job's Parquet files.")
    results_url: str = Field(description="Where to fetch the rows over HTTP.")


class JobPublic(BaseModel):
    object: Literal["job"] = "job"
    id: str
    name: str
    status: Status
    priority: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    progress: JobProgress
    output: JobOutput
    error: str | None = Field(description="Why a failed job failed, in words a user can act on.")
    spec: dict[str, Any] = Field(description="The job as accepted (validated, paths resolved).")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    next_after: str | None = Field(
        description="Pass as `after` to get the next page; null on the last page."
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    database: str
    ray: str


def to_public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id,
        name=job.name,
        status=job.status,  # type: ignore[arg-type]
        priority=job.priority,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=JobProgress.model_validate(job.progress or {}),
        output=JobOutput(path=job.output_path, results_url=f"/v1/jobs/{job.id}/results"),
        error=job.error,
        spec=job.spec,
    )
