"""``/metrics``: the service's Prometheus metrics (see ``llm_batch.service.metrics``)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response

from llm_batch.service.api.deps import MetricsDep, PrincipalDep
from llm_batch.service.metrics import CONTENT_TYPE

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"description": "The Prometheus text format.", "content": {"text/plain": {}}},
        403: {"description": "Keys are configured and this one is not an admin key."},
    },
)
def metrics(metrics: MetricsDep, principal: PrincipalDep) -> Response:
    """Jobs by status, queue depth, per-job and per-model progress, throughput, job
    durations, API latency by route, and the engines' load as their jobs report it."""
    if not principal.admin:
        # The series name every key's jobs; a plain key sees only its own elsewhere.
        raise HTTPException(403, detail="/metrics covers every key's jobs: use an admin key")
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)
