"""The FastAPI application: ``create_app(settings)``.

The lifespan starts the scheduler thread (which brings up the local Ray head
when there is no ``RAY_ADDRESS``) and, on a clean shutdown, stops it, and the
local head too when nothing runs on it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from llm_batch.drivers import JobsAPI, RayJobs
from llm_batch.errors import ServiceUnavailable
from llm_batch.job.spec import JobSpec
from llm_batch.service.api.deps import OpenAIState, ServiceState
from llm_batch.service.api.errors import install_error_handlers
from llm_batch.service.api.limits import RequestLimits
from llm_batch.service.api.routes import (
    batches,
    dashboard,
    engines,
    files,
    health,
    jobs,
    usage,
)
from llm_batch.service.api.routes import metrics as metrics_routes
from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.files import FileStorage
from llm_batch.service.jobs import JobService
from llm_batch.service.metrics import RequestTimer, ServiceMetrics
from llm_batch.service.openai.runner import BatchRunner
from llm_batch.service.openai.store import BatchStore
from llm_batch.service.pools import HOST_PREFIX, EnginePools
from llm_batch.service.raycluster import RayCluster
from llm_batch.service.retention import RetentionSweep
from llm_batch.service.scheduler import Scheduler
from llm_batch.service.settings import Settings
from llm_batch.service.store import JobStore
from llm_batch.service.webhooks import WebhookSender

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

# Room for a multipart upload's boundaries, part headers and text fields around the file.
_UPLOAD_FORM_SLACK = 2 * 1024 * 1024


def create_app(
    settings: Settings | None = None,
    *,
    run_scheduler: bool = True,
    jobs_api: JobsAPI | None = None,
) -> FastAPI:
    """The app, its database schema created or migrated. ``run_scheduler=False`` serves the
    API only (jobs stay queued): for tests of the API. Raises ``SettingsError`` for settings
    it cannot run with (in cluster mode, a data directory that is not shared)."""
    settings = _loopback_without_keys(settings or Settings())
    settings.check_cluster_storage()
    settings.check_webhooks()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.database_url)
    store.create_schema()
    catalog = ModelCatalog.from_file(settings.models)
    cluster = RayCluster(settings) if jobs_api is None else None
    jobs_api = jobs_api or RayJobs(cluster.jobs_address)  # type: ignore[union-attr]
    # Shared engine pools need the real Ray (Serve); a test's in-memory Jobs API has none.
    pools = (
        EnginePools(settings=settings, catalog=catalog, jobs=jobs_api)
        if settings.shared_engines and cluster is not None
        else None
    )
    metrics = ServiceMetrics(store, finished_window=settings.metrics_finished_window, pools=pools)
    scheduler = Scheduler(
        store=store,
        settings=settings,
        jobs=jobs_api,
        cluster=cluster,
        on_job_end=metrics.job_ended,
        pools=pools,
    )
    batch_store = BatchStore(store)
    storage = FileStorage(settings=settings, store=batch_store, max_bytes=settings.max_upload_bytes)
    job_service = JobService(
        store=store, settings=settings, catalog=catalog, scheduler=scheduler, files=storage
    )
    state = ServiceState(settings, store, catalog, jobs_api, cluster, scheduler, job_service, pools)
    runner = BatchRunner(jobs=job_service, batches=batch_store, settings=settings, catalog=catalog)
    store.webhook_url = settings.webhook_url
    # Events are queued whenever jobs end; they are sent only with a secret to sign them.
    sender = (
        WebhookSender(store, secret=settings.webhook_secret) if settings.webhook_secret else None
    )
    sweep = RetentionSweep(store, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if run_scheduler:
            scheduler.start()
            runner.start()
            sweep.start()
            if sender is not None:
                sender.start()
        try:
            yield
        finally:
            if run_scheduler:
                if sender is not None:
                    sender.stop()
                sweep.stop()
                runner.stop()
                scheduler.stop()
                _maybe_stop_ray(state)
            store.close()

    app = FastAPI(
        title="llm_batch",
        summary="Offline LLM batch generation: submit prompt datasets, get Parquet back.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = state
    app.state.api_keys = settings.keys()  # read once; compared in api.deps.authenticate
    app.state.openai = OpenAIState(batch_store, runner, storage)
    install_error_handlers(app)
    # Body size and JSON nesting, before any route parses a body (api/limits.py). Uploads
    # stream to their route, which cuts them at max_upload_bytes; this backs it up.
    app.add_middleware(
        RequestLimits,
        max_bytes=settings.max_request_bytes,
        max_depth=settings.max_json_depth,
        upload_limits={"/v1/files": settings.max_upload_bytes + _UPLOAD_FORM_SLACK},
        openai_paths=("/v1/files", "/v1/batches"),
    )
    # Outermost: times every request, refused ones included.
    app.add_middleware(RequestTimer, histogram=metrics.requests)
    app.state.metrics = metrics
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    app.include_router(dashboard.router)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(engines.router)
    app.include_router(usage.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _loopback_without_keys(settings: Settings) -> Settings:
    """Without API keys anyone who can reach the port could run jobs and read results:
    such a service binds the loopback address only, whatever host it was given."""
    if settings.keys():
        return settings
    if settings.host not in _LOOPBACK:
        logger.warning(
            "no API keys configured (LLM_BATCH_API_KEYS): binding 127.0.0.1 instead of %s",
            settings.host,
        )
        settings = settings.model_copy(update={"host": "127.0.0.1"})
    logger.warning(
        "no API keys configured: the service is open to anyone on this machine "
        "(loopback only); set LLM_BATCH_API_KEYS to require keys"
    )
    return settings


def _maybe_stop_ray(state: ServiceState) -> None:
    cluster = state.cluster
    if cluster is None or not cluster.local or not state.settings.stop_ray_on_exit:
        return
    try:
        # The engine host never ends by itself; it goes with the head.
        unfinished = [s for s in state.jobs.unfinished() if not s.startswith(HOST_PREFIX)]
    except ServiceUnavailable:
        unfinished = []
    except Exception:  # noqa: BLE001 - not knowing means keeping the head
        logger.exception("could not list Ray's jobs; leaving the local Ray head running")
        return
    if unfinished:
        logger.info(
            "leaving the local Ray head running: %d job(s) still run on it and will be "
            "followed again when the service restarts",
            len(unfinished),
        )
        return
    cluster.stop()


def _openapi(app: FastAPI) -> dict[str, Any]:
    # The job body is read as raw JSON (see routes/jobs.py); publish its schema so the
    # docs show the job format.
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        job = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(job.pop("$defs", {}))
        components["JobSpec"] = job
        body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
        body["schema"] = {"$ref": "#/components/schemas/JobSpec"}
        app.openapi_schema = schema
    return app.openapi_schema
