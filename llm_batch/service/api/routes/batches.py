"""``/v1/batches``: OpenAI's Batch API; each batch runs as one job (or a few) underneath.

``POST`` answers at once with a ``validating`` batch; the batch runner
(``service/openai/runner.py``) validates the input file, queues the jobs and
writes the output and error files when they end. A key sees only its own
batches; an admin key sees all.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from pydantic import ValidationError

from llm_batch.service.api.deps import (
    BatchRunnerDep,
    BatchStoreDep,
    PrincipalDep,
    SchedulerDep,
    SettingsDep,
)
from llm_batch.service.api.errors import OpenAIError
from llm_batch.service.openai.schemas import BatchCreate, BatchList, BatchObject, batch_object
from llm_batch.service.openai.store import new_batch_id
from llm_batch.service.store import Batch

__all__ = ["router"]

router = APIRouter(prefix="/v1/batches", tags=["batches"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No batch with this id (for this key)."}
}


def _batch(store: BatchStoreDep, principal: PrincipalDep, batch_id: str) -> Batch:
    row = store.get_batch(batch_id, owner=principal.owner, admin=principal.admin)
    if row is None:
        raise OpenAIError(404, f"No such Batch object: {batch_id}", param="batch_id")
    return row


_CODES = ("unsupported_value", "invalid_value")


def _request(body: Any) -> BatchCreate:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        return BatchCreate.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise OpenAIError(400, f"{param}: unknown parameter", param=param) from None
        if err["type"] in _CODES:  # BatchCreate's own checks: the message is whole
            raise OpenAIError(400, err["msg"], param=param, code=err["type"]) from None
        raise OpenAIError(400, f"{param}: {err['msg']}", param=param) from None


@router.post(
    "",
    response_model=BatchObject,
    summary="Create a batch",
    responses={
        400: {"description": "An unsupported endpoint or window, or a file not for batches."},
        404: {"description": "No input file with this id (for this key)."},
    },
)
def create_batch(
    body: Annotated[Any, Body()],
    store: BatchStoreDep,
    runner: BatchRunnerDep,
    principal: PrincipalDep,
    settings: SettingsDep,
) -> BatchObject:
    """`input_file_id`, `endpoint` (`/v1/chat/completions` or `/v1/completions`),
    `completion_window` (`24h`), optional `metadata`. The batch starts `validating`."""
    request = _request(body)
    source = store.get_file(request.input_file_id, owner=principal.owner, admin=principal.admin)
    if source is None:
        raise OpenAIError(
            404, f"No such File object: {request.input_file_id}", param="input_file_id"
        )
    if source.purpose != "batch":
        raise OpenAIError(
            400,
            f"file {source.id} has purpose {source.purpose!r}; upload the input with purpose "
            "`batch`",
            param="input_file_id",
            code="invalid_value",
        )
    row = store.create_batch(
        batch_id=new_batch_id(),
        endpoint=request.endpoint,
        input_file_id=source.id,
        completion_window=request.completion_window,
        metadata=request.metadata,
        owner=principal.owner,
        window_seconds=settings.completion_window_seconds or 86400.0,
        output_expires_seconds=(request.output_expires_after or {}).get("seconds"),
    )
    runner.wake()
    return batch_object(row)


@router.get("", response_model=BatchList, summary="List batches, newest first")
def list_batches(
    store: BatchStoreDep,
    principal: PrincipalDep,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Batches per page.")] = 20,
) -> BatchList:
    page = store.page_batches(
        owner=principal.owner, admin=principal.admin, limit=limit, after=after
    )
    if page is None:
        raise OpenAIError(400, f"after: no batch with id {after!r}", param="after")
    rows, has_more = page
    return BatchList(
        data=[batch_object(r) for r in rows],
        first_id=rows[0].id if rows else None,
        last_id=rows[-1].id if rows else None,
        has_more=has_more,
    )


@router.get("/{batch_id}", response_model=BatchObject, responses=_NOT_FOUND, summary="Get a batch")
def get_batch(batch_id: str, store: BatchStoreDep, principal: PrincipalDep) -> BatchObject:
    return batch_object(_batch(store, principal, batch_id))


@router.post(
    "/{batch_id}/cancel",
    response_model=BatchObject,
    summary="Cancel a batch",
    responses={**_NOT_FOUND, 409: {"description": "The batch is finalizing or has ended."}},
)
def cancel_batch(
    batch_id: str,
    store: BatchStoreDep,
    runner: BatchRunnerDep,
    scheduler: SchedulerDep,
    principal: PrincipalDep,
) -> BatchObject:
    """The batch becomes `cancelling`, its jobs are stopped, then it is `cancelled` with the
    output and error files of the requests that were done (written) by then."""
    _batch(store, principal, batch_id)
    if store.cancel_batch(batch_id):
        runner.wake()
        scheduler.wake()
    row = _batch(store, principal, batch_id)
    if row.status not in ("cancelling", "cancelled"):
        raise OpenAIError(
            409,
            f"batch {batch_id} is {row.status}; only a validating or in-progress batch can be "
            "cancelled",
            param="batch_id",
            code="invalid_state",
        )
    return batch_object(row)
