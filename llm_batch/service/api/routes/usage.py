"""``/v1/usage``: jobs, rows and tokens per key, model and day, from the job store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from llm_batch.service.api.deps import JobServiceDep, PrincipalDep
from llm_batch.service.schemas import Usage, UsageRow

__all__ = ["router"]

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=Usage, summary="Usage per key, model and day")
def usage(
    jobs: JobServiceDep,
    principal: PrincipalDep,
    days: Annotated[int, Query(ge=1, le=366, description="The last this many days.")] = 30,
) -> Usage:
    """This key's jobs (an admin key: every key's), one row per key, model and UTC day of
    submission, OpenAI batches' jobs included. Tokens are counted by the engine."""
    return Usage(data=[UsageRow(**row) for row in jobs.usage(principal, days=days)])
