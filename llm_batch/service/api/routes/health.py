"""``/healthz`` (the process answers) and ``/readyz`` (it can do its work)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from llm_batch.service.api.deps import JobsAPIDep, PrincipalDep, StoreDep
from llm_batch.service.errors import ServiceUnavailable
from llm_batch.service.schemas import Health, Readiness

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: the database and Ray are reachable",
    responses={503: {"model": Readiness, "description": "The database or Ray is not reachable."}},
)
def readyz(store: StoreDep, jobs: JobsAPIDep, _: PrincipalDep) -> Readiness | JSONResponse:
    ready = True
    try:
        store.ping()
        database = "ok"
    except Exception as e:  # noqa: BLE001 - any failure means not ready; say which
        ready, database = False, f"unreachable: {type(e).__name__}: {e}"
    try:
        ray = f"ok (Ray {jobs.version()})"
    except ServiceUnavailable as e:
        ready, ray = False, str(e)
    body = Readiness(status="ready" if ready else "unavailable", database=database, ray=ray)
    if ready:
        return body
    return JSONResponse(body.model_dump(), status_code=503)
