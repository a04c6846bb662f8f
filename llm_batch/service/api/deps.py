"""What route functions depend on, as ``Annotated`` aliases."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from llm_batch.drivers import JobsAPI
from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.files import FileStorage
from llm_batch.service.jobs import JobService, Principal
from llm_batch.service.metrics import ServiceMetrics
from llm_batch.service.openai.runner import BatchRunner
from llm_batch.service.openai.store import BatchStore
from llm_batch.service.pools import EnginePools
from llm_batch.service.raycluster import RayCluster
from llm_batch.service.scheduler import Scheduler
from llm_batch.service.settings import KeyGrant, Settings
from llm_batch.service.store import JobStore

__all__ = [
    "BatchRunnerDep",
    "BatchStoreDep",
    "CatalogDep",
    "FileStorageDep",
    "OpenAIState",
    "Principal",
    "PoolsDep",
    "PrincipalDep",
    "authenticate",
    "JobServiceDep",
    "JobsAPIDep",
    "MetricsDep",
    "SchedulerDep",
    "ServiceState",
    "SettingsDep",
    "StoreDep",
]


@dataclasses.dataclass
class ServiceState:
    """Everything one running service holds; lives on ``app.state.service``."""

    settings: Settings
    store: JobStore
    catalog: ModelCatalog
    jobs: JobsAPI
    cluster: RayCluster | None
    scheduler: Scheduler
    job_service: JobService
    pools: EnginePools | None = None


def _state(request: Request) -> ServiceState:
    return request.app.state.service  # type: ignore[no-any-return]


def _settings(request: Request) -> Settings:
    return _state(request).settings


def _store(request: Request) -> JobStore:
    return _state(request).store


def _catalog(request: Request) -> ModelCatalog:
    return _state(request).catalog


def _jobs(request: Request) -> JobsAPI:
    return _state(request).jobs


def _scheduler(request: Request) -> Scheduler:
    return _state(request).scheduler


def _job_service(request: Request) -> JobService:
    return _state(request).job_service


def _pools(request: Request) -> EnginePools | None:
    return _state(request).pools


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
CatalogDep = Annotated[ModelCatalog, Depends(_catalog)]
JobsAPIDep = Annotated[JobsAPI, Depends(_jobs)]
SchedulerDep = Annotated[Scheduler, Depends(_scheduler)]
JobServiceDep = Annotated[JobService, Depends(_job_service)]
PoolsDep = Annotated[EnginePools | None, Depends(_pools)]


def _metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]


@dataclasses.dataclass
class OpenAIState:
    """What the OpenAI-compatible routes hold; lives on ``app.state.openai``."""

    batches: BatchStore
    runner: BatchRunner
    files: FileStorage


def _openai(request: Request) -> OpenAIState:
    return request.app.state.openai  # type: ignore[no-any-return]


def _batch_store(request: Request) -> BatchStore:
    return _openai(request).batches


def _batch_runner(request: Request) -> BatchRunner:
    return _openai(request).runner


def _file_storage(request: Request) -> FileStorage:
    return _openai(request).files


BatchStoreDep = Annotated[BatchStore, Depends(_batch_store)]
BatchRunnerDep = Annotated[BatchRunner, Depends(_batch_runner)]
FileStorageDep = Annotated[FileStorage, Depends(_file_storage)]


_OPEN = Principal(owner=None, admin=True)


def key_owner(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def authenticate(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer <key>``; 401 without a valid key.

    With no keys configured the service is open (and bound to loopback only).
    Every configured key is compared, in constant time, so timing tells nothing.
    """
    keys: dict[str, KeyGrant] = getattr(request.app.state, "api_keys", None) or {}
    if not keys:
        return _OPEN
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    found: tuple[str, KeyGrant] | None = None
    if scheme.lower() == "bearer" and given:
        for key, grant in keys.items():
            if hmac.compare_digest(key.encode(), given.strip().encode()):
                found = (key, grant)
    if found is None:
        raise HTTPException(
            status_code=401,
            detail="a valid API key is required: send `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key, grant = found
    return Principal(owner=key_owner(key), admin=grant.admin, roots=grant.roots)


PrincipalDep = Annotated[Principal, Depends(authenticate)]
