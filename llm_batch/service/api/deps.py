"""What route functions depend on, as ``Annotated`` aliases."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import Depends, Request

from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.raycluster import RayCluster
from llm_batch.service.rayjobs import JobsAPI
from llm_batch.service.scheduler import Scheduler
from llm_batch.service.settings import Settings
from llm_batch.service.store import JobStore

__all__ = [
    "CatalogDep",
    "JobsAPIDep",
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


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
CatalogDep = Annotated[ModelCatalog, Depends(_catalog)]
JobsAPIDep = Annotated[JobsAPI, Depends(_jobs)]
SchedulerDep = Annotated[Scheduler, Depends(_scheduler)]
