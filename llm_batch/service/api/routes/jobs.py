"""``/v1/jobs``: submit, read, list, cancel jobs, and stream their results."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from llm_batch.service import results
from llm_batch.service.api.deps import JobServiceDep, PrincipalDep, SettingsDep
from llm_batch.service.errors import JobNotFound
from llm_batch.service.schemas import JobFile, JobFiles, JobList, JobPublic, to_public
from llm_batch.service.validation import parse_job_text

__all__ = ["router"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No job with this id."},
}
_JSONL_MEDIA_TYPE = "application/x-ndjson"


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    summary="Submit a job",
    responses={
        422: {"description": "The job is invalid; `detail` names the field."},
        409: {"description": "The Idempotency-Key was used for a different job."},
        413: {"description": "The body is larger than the service's `max_request_bytes`."},
    },
)
def create_job(
    # Read as plain JSON so that every refusal, from an unknown field to a template
    # column the input lacks, is one message naming the field; the OpenAPI schema
    # still shows the job format (app._openapi).
    body: Annotated[Any, Body()],
    response: Response,
    jobs: JobServiceDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=255,
            description="A retried request with the same key returns the same job.",
        ),
    ] = None,
) -> JobPublic:
    """Validate the job (fields, input, template columns, sampling) and queue it.

    The body is the job as JSON, or a YAML job file with any other Content-Type
    (`application/yaml`); relative paths are resolved on the service."""
    if isinstance(body, bytes):  # not JSON: FastAPI leaves the bytes as they came
        body = parse_job_text(body, max_depth=settings.max_json_depth)
    job, created = jobs.submit(body, principal, idempotency_key=idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return to_public(job)


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    jobs: JobServiceDep,
    principal: PrincipalDep,
    status: Annotated[
        Literal["queued", "running", "cancelling", "cancelled", "succeeded", "failed"] | None,
        Query(description="Only jobs in this status."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page.")] = 20,
    after: Annotated[
        str | None, Query(description="The `next_after` of the previous page.")
    ] = None,
) -> JobList:
    try:
        page, has_more = jobs.page(principal, status=status, limit=limit, after=after)
    except JobNotFound:
        raise HTTPException(422, detail=f"after: no job with id {after!r}") from None
    return JobList(
        data=[to_public(j) for j in page],
        has_more=has_more,
        next_after=page[-1].id if has_more and page else None,
    )


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS, summary="Get a job")
def get_job(job_id: str, jobs: JobServiceDep, principal: PrincipalDep) -> JobPublic:
    return to_public(jobs.get(job_id, principal))


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job",
    responses={**_ERRORS, 409: {"description": "The job already succeeded or failed."}},
)
def cancel_job(job_id: str, jobs: JobServiceDep, principal: PrincipalDep) -> JobPublic:
    """A queued job is cancelled at once; a running one becomes `cancelling` until Ray has
    stopped it (its engines released), then `cancelled`. Rows already written stay readable."""
    return to_public(jobs.cancel(job_id, principal))


@router.post(
    "/{job_id}/retry",
    response_model=JobPublic,
    summary="Run a job's rows with errors again",
    responses={
        **_ERRORS,
        409: {"description": "The job has not ended, or has no row with an error."},
        422: {"description": "The changed model block is invalid; `detail` names the field."},
    },
)
def retry_job(
    job_id: str,
    jobs: JobServiceDep,
    principal: PrincipalDep,
    body: Annotated[
        dict[str, Any] | None,
        Body(
            description="Optional: `model` or `models` replacing the job's model block(s), "
            "e.g. a larger `engine.max_model_len` (the models' names stay)."
        ),
    ] = None,
) -> JobPublic:
    """The job is queued again; its run takes the rows of its output whose `error` is set
    and runs them again, keeping every other row, so that the output ends with every input
    row exactly once. Progress and metrics cover the whole output."""
    return to_public(jobs.retry(job_id, body, principal))


@router.get(
    "/{job_id}/results",
    summary="Stream a job's output rows",
    responses={
        **_ERRORS,
        409: {"description": "The job has written no rows yet."},
        200: {
            "description": "JSON lines by default; one Parquet file with "
            "`Accept: application/vnd.apache.parquet`.",
            "content": {_JSONL_MEDIA_TYPE: {}, results.PARQUET_MEDIA_TYPE: {}},
        },
    },
)
def job_results(
    job_id: str,
    request: Request,
    jobs: JobServiceDep,
    principal: PrincipalDep,
    limit: Annotated[
        int | None, Query(ge=1, description="At most this many rows (the first ones written).")
    ] = None,
) -> StreamingResponse:
    """The rows written so far (all of them once the job has succeeded)."""
    job, files = jobs.result_files(job_id, principal)
    headers = {"X-Job-Status": job.status}
    if results.PARQUET_MEDIA_TYPE in request.headers.get("accept", ""):
        headers["Content-Disposition"] = f'attachment; filename="{job_id}.parquet"'
        return StreamingResponse(
            results.iter_parquet(job.output_path, files, limit=limit),
            media_type=results.PARQUET_MEDIA_TYPE,
            headers=headers,
        )
    return StreamingResponse(
        results.iter_jsonl(job.output_path, files, limit=limit),
        media_type=_JSONL_MEDIA_TYPE,
        headers=headers,
    )


@router.get(
    "/{job_id}/files",
    response_model=JobFiles,
    responses=_ERRORS,
    summary="List the files a job wrote",
)
def job_files(job_id: str, jobs: JobServiceDep, principal: PrincipalDep) -> JobFiles:
    """The part files and `_metrics.json` in the job's output folder (complete ones: a
    running job's list grows). Another tool's files in a folder you named are not listed."""
    _, files = jobs.output_files(job_id, principal)
    return JobFiles(data=[JobFile(name=f.name, bytes=f.bytes) for f in files])


@router.get(
    "/{job_id}/files/{name}",
    summary="Download one file a job wrote",
    responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
)
def job_file(job_id: str, name: str, jobs: JobServiceDep, principal: PrincipalDep) -> Response:
    job, f = jobs.output_file(job_id, name, principal)
    media = "application/json" if name.endswith(".json") else results.PARQUET_MEDIA_TYPE
    return StreamingResponse(
        results.iter_file(job.output_path, f.name),
        media_type=media,
        headers={
            "Content-Disposition": f'attachment; filename="{f.name}"',
            "Content-Length": str(f.bytes),
        },
    )
