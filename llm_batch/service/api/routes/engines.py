"""``/v1/engines``: the engine pools the service keeps warm and shares between jobs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from llm_batch.service.api.deps import PoolsDep, PrincipalDep
from llm_batch.service.pools import PoolNotFound
from llm_batch.service.schemas import EngineList, EnginePool, ReleasedPool

__all__ = ["router"]

router = APIRouter(prefix="/v1/engines", tags=["engines"])

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"description": "No engine pool with this id."}}


def _pools(pools: PoolsDep) -> Any:
    if pools is None:
        raise HTTPException(404, detail="this service runs every job on engines of its own")
    return pools


@router.get("", response_model=EngineList, summary="List the engine pools")
def list_engines(pools: PoolsDep, _: PrincipalDep) -> EngineList:
    """Each pool: its model, replicas, state, the jobs attached, the requests in its engines,
    and since when it has been idle (released after `LLM_BATCH_ENGINE_IDLE_SECONDS`)."""
    if pools is None:
        return EngineList(data=[])
    return EngineList(
        data=[EnginePool(**p) for p in pools.list()],
        released=[ReleasedPool(**r) for r in pools.state().get("released") or []],
    )


@router.get("/{pool_id}", response_model=EnginePool, responses=_ERRORS, summary="Get a pool")
def get_engine(pool_id: str, pools: PoolsDep, _: PrincipalDep) -> EnginePool:
    try:
        return EnginePool(**_pools(pools).get(pool_id))
    except PoolNotFound as e:
        raise HTTPException(404, detail=str(e)) from None


@router.delete(
    "/{pool_id}",
    response_model=EnginePool,
    summary="Release a pool",
    responses={
        **_ERRORS,
        403: {"description": "Keys are configured and this one is not an admin key."},
        409: {"description": "Running jobs use the pool."},
    },
)
def release_engine(pool_id: str, pools: PoolsDep, principal: PrincipalDep) -> EnginePool:
    """Stops the pool's replicas and frees what they hold; a job that needs the model again
    starts it again."""
    if not principal.admin:
        raise HTTPException(403, detail="releasing an engine pool needs an admin key")
    try:
        return EnginePool(**_pools(pools).release(pool_id))
    except PoolNotFound as e:
        raise HTTPException(404, detail=str(e)) from None
