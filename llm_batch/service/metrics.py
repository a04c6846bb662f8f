"""The service's Prometheus metrics, served at ``GET /metrics``.

Most of them are read at scrape time from the job store: the number of jobs in
each status, and each watched job's progress snapshot (what the scheduler copies
from the job driver's status file: counts per model, throughput, the accumulator
results, the engines' load). Two are observed by the service itself: API request
latency (``RequestTimer``, an ASGI middleware labelling by route template, never
by raw URL) and job durations (``ServiceMetrics.job_ended``, called by the
scheduler when it ends a job).

Label cardinality stays bounded: per-job series exist for running and cancelling
jobs and for jobs that ended within ``Settings.metrics_finished_window`` seconds
(at most ``MAX_ENDED_JOBS`` of them). A registry per app, so two apps in one
process (tests) never share a metric.

vLLM's engines run inside Ray actors and serve no metrics endpoint of their own;
what they report to the job's progress tracker is exported instead: requests
running and waiting, KV-cache usage and time to first token (vLLM's scheduler
and iteration stats, as of each engine's last finished batch), and the
per-row generation latency percentiles of the job's accumulators.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_batch.service.store import ACTIVE, Job, JobStatus, JobStore, utcnow

__all__ = ["CONTENT_TYPE", "MAX_ENDED_JOBS", "RequestTimer", "ServiceMetrics"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
MAX_ENDED_JOBS = 100

_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Batch jobs run from seconds (tests) to a day.
_JOB_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
_QUANTILES = (("0.5", "p50_s"), ("0.9", "p90_s"), ("0.99", "p99_s"))


class ServiceMetrics:
    """One service's registry and what feeds it."""

    def __init__(self, store: JobStore, *, finished_window: float, pools: Any = None):
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "llm_batch_http_request_duration_seconds",
            "API request latency by route template (the path as declared, e.g. "
            "/v1/jobs/{job_id}; 'unmatched' when no route matched).",
            ["method", "route", "code"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.job_durations = Histogram(
            "llm_batch_job_duration_seconds",
            "Time from a job's start on Ray to its end, observed when the scheduler ends it.",
            ["status"],
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_JobCollector(store, finished_window=finished_window))
        if pools is not None:
            self.registry.register(_PoolCollector(pools))

    def job_ended(self, job: Job, status: JobStatus) -> None:
        """Observe a job's duration (the scheduler's ``on_job_end``)."""
        if job.started_at is None:
            return
        seconds = (utcnow() - job.started_at).total_seconds()
        self.job_durations.labels(status.value).observe(max(seconds, 0.0))

    def exposition(self) -> bytes:
        """Everything, in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


class RequestTimer:
    """ASGI middleware: each HTTP request's latency into ``histogram``, labelled with the
    matched route's path template so that ids in URLs never become label values."""

    def __init__(self, app: ASGIApp, *, histogram: Histogram):
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500

        async def send_and_note(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router records the route it matched in the scope it was given (ours).
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.histogram.labels(scope["method"], route, str(code)).observe(
                time.perf_counter() - started
            )


def _families() -> dict[str, Any]:
    j, jm = ["job_id"], ["job_id", "model"]
    g, c = GaugeMetricFamily, CounterMetricFamily
    return {
        "info": g(
            "llm_batch_job_info",
            "A watched job: its name and status (value 1).",
            labels=["job_id", "name", "status"],
        ),
        "model_info": g(
            "llm_batch_job_model_info",
            "A watched job's model: its name in the job ('default' for a one-model job) "
            "and its path (value 1).",
            labels=["job_id", "model", "path"],
        ),
        "input_rows": g("llm_batch_job_input_rows", "Input rows of the job, when known.", labels=j),
        "rows_done_job": g(
            "llm_batch_job_rows_done", "Rows every model of the job has answered.", labels=j
        ),
        "progress": g(
            "llm_batch_job_progress_ratio", "rows_done / input rows (0 to 1), when known.", labels=j
        ),
        "rows_rate": g("llm_batch_job_rows_per_second", "Recent throughput of the job.", labels=j),
        "tokens_rate": g(
            "llm_batch_job_output_tokens_per_second", "Recent output tokens per second.", labels=j
        ),
        "eta": g("llm_batch_job_eta_seconds", "Estimated seconds until the job is done.", labels=j),
        "elapsed": g("llm_batch_job_elapsed_seconds", "Seconds the job's run has taken.", labels=j),
        "rows_done": c(
            "llm_batch_rows_done", "Rows a model has answered (error rows too).", labels=jm
        ),
        "rows_failed": c("llm_batch_rows_failed", "Rows with an error, per model.", labels=jm),
        "input_tokens": c("llm_batch_input_tokens", "Prompt tokens, per model.", labels=jm),
        "output_tokens": c("llm_batch_output_tokens", "Generated tokens, per model.", labels=jm),
        "finish": c(
            "llm_batch_finish_reasons",
            "Rows by finish reason (stop, length), per model.",
            labels=["job_id", "model", "reason"],
        ),
        "accuracy": g(
            "llm_batch_label_accuracy",
            "Share of labelled rows whose generation is the label (jobs with a label column).",
            labels=jm,
        ),
        "latency": Metric(
            "llm_batch_generation_latency_seconds",
            "Per-row generation latency, submit to last token (the job's latency "
            "accumulator: quantiles within 1%).",
            "summary",
        ),
        "engines": g("llm_batch_job_engines", "Engine actors that have reported.", labels=jm),
        "running": g(
            "llm_batch_engine_requests_running",
            "Requests in the engine's running batch (vLLM scheduler stats, as of the "
            "engine's last finished batch; running jobs only).",
            labels=["job_id", "model", "actor_id", "node_id"],
        ),
        "waiting": g(
            "llm_batch_engine_requests_waiting",
            "Requests queued in the engine (vLLM scheduler stats, as of the engine's last "
            "finished batch; running jobs only).",
            labels=["job_id", "model", "actor_id", "node_id"],
        ),
        "kv_cache": g(
            "llm_batch_engine_kv_cache_usage_ratio",
            "Share of the engine's KV-cache blocks in use (vLLM scheduler stats, as of the "
            "engine's last finished batch; running jobs only).",
            labels=["job_id", "model", "actor_id", "node_id"],
        ),
        "ttft": Metric(
            "llm_batch_engine_time_to_first_token_seconds",
            "Time to first token of the job's requests, queueing included (vLLM iteration "
            "stats, summed over the job's engines).",
            "summary",
        ),
    }


class _PoolCollector(Collector):
    """The service's engine pools, as the engine host last reported them (``pools.py``)."""

    def __init__(self, pools: Any):
        self._pools = pools

    def collect(self) -> Iterable[Metric]:
        labels = ["pool", "model"]
        state = GaugeMetricFamily(
            "llm_batch_engine_pool_up",
            "1 per engine pool, labelled with its state (starting, running, releasing, ...).",
            labels=[*labels, "state"],
        )
        replicas = GaugeMetricFamily(
            "llm_batch_engine_pool_replicas", "Replicas running.", labels=labels
        )
        jobs = GaugeMetricFamily(
            "llm_batch_engine_pool_jobs", "Running jobs attached to the pool.", labels=labels
        )
        requests = GaugeMetricFamily(
            "llm_batch_engine_pool_requests",
            "Requests in the pool's engine (one replica's view).",
            labels=labels,
        )
        try:
            pools = self._pools.list()
        except Exception:  # noqa: BLE001 - a scrape never fails on the pools
            logger.exception("metrics: the engine pools could not be read")
            pools = []
        for pool in pools:
            key = [pool["id"], str(pool["model"])]
            state.add_metric([*key, pool["state"]], 1)
            replicas.add_metric(key, pool["replicas"] or 0)
            jobs.add_metric(key, len(pool["jobs"]))
            requests.add_metric(key, pool["requests"] or 0)
        yield from (state, replicas, jobs, requests)


class _JobCollector(Collector):
    def __init__(self, store: JobStore, *, finished_window: float):
        self._store = store
        self._window = finished_window

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "llm_batch_database_up", "1 when the job store answered this scrape."
        )
        try:
            counts = self._store.status_counts()
            since = utcnow() - dt.timedelta(seconds=self._window)
            jobs = self._store.watched(finished_since=since, limit=MAX_ENDED_JOBS)
        except Exception:  # noqa: BLE001 - a scrape says the store is down, it does not fail
            logger.exception("metrics: the job store did not answer")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        by_status = GaugeMetricFamily("llm_batch_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status.value, 0))
        yield by_status
        yield GaugeMetricFamily(
            "llm_batch_queue_depth",
            "Jobs queued, waiting for a free slot (max_running_jobs).",
            value=counts.get(JobStatus.QUEUED.value, 0),
        )

        families = _families()
        rows_rate = tokens_rate = 0.0
        for job in jobs:
            progress = job.progress or {}
            if job.status in ACTIVE:
                rows_rate += float(progress.get("rows_per_second") or 0.0)
                tokens_rate += float(progress.get("output_tokens_per_second") or 0.0)
            _add_job(families, job, progress)
        yield GaugeMetricFamily(
            "llm_batch_rows_per_second",
            "Recent throughput, summed over running jobs.",
            value=rows_rate,
        )
        yield GaugeMetricFamily(
            "llm_batch_output_tokens_per_second",
            "Recent output tokens per second, summed over running jobs.",
            value=tokens_rate,
        )
        yield from families.values()


def _model_paths(spec: dict[str, Any]) -> dict[str, str]:
    if spec.get("models"):
        return {m.get("name") or "": str(m.get("path")) for m in spec["models"]}
    return {"default": str((spec.get("model") or {}).get("path"))}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _add_job(f: dict[str, Any], job: Job, progress: dict[str, Any]) -> None:
    jid = job.id
    f["info"].add_metric([jid, job.name, job.status], 1)
    for model, path in _model_paths(job.spec or {}).items():
        f["model_info"].add_metric([jid, model, path], 1)

    total, done = _number(progress.get("rows_total")), _number(progress.get("rows_done"))
    for key, value in (
        ("input_rows", total),
        ("rows_done_job", done),
        ("progress", done / total if total and done is not None else None),
        ("rows_rate", _number(progress.get("rows_per_second"))),
        ("tokens_rate", _number(progress.get("output_tokens_per_second"))),
        ("eta", _number(progress.get("eta_seconds"))),
        ("elapsed", _number(progress.get("elapsed_seconds"))),
    ):
        if value is not None:
            f[key].add_metric([jid], value)

    for model, counts in _mappings(progress.get("models")):
        for key in ("rows_done", "rows_failed", "input_tokens", "output_tokens"):
            value = _number(counts.get(key))
            if value is not None:
                f[key].add_metric([jid, model], value)

    for model, results in _mappings(progress.get("metrics")):
        for reason, n in (results.get("finish_reasons") or {}).items():
            if _number(n) is not None:
                f["finish"].add_metric([jid, model, str(reason)], n)
        accuracy = _number((results.get("labels") or {}).get("accuracy"))
        if accuracy is not None:
            f["accuracy"].add_metric([jid, model], accuracy)
        _add_latency(f["latency"], [jid, model], results.get("latency") or {})

    if job.status in ACTIVE:
        _add_engines(f, jid, progress.get("engines") or [])


def _mappings(value: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """The per-model entries of a snapshot mapping, skipping any of another shape (the
    snapshot is a file another process wrote, possibly another version of it)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict):
                yield str(key), item


def _add_latency(family: Metric, labels: list[str], latency: dict[str, Any]) -> None:
    count, mean = _number(latency.get("count")), _number(latency.get("mean_s"))
    if not count:
        return
    base = {"job_id": labels[0], "model": labels[1]}
    for quantile, key in _QUANTILES:
        value = _number(latency.get(key))
        if value is not None:
            family.add_sample(family.name, {**base, "quantile": quantile}, value)
    family.add_sample(family.name + "_count", base, count)
    family.add_sample(family.name + "_sum", base, count * (mean or 0.0))


def _add_engines(f: dict[str, Any], jid: str, engines: list[Any]) -> None:
    per_model: dict[str, int] = {}
    ttft: dict[str, list[float]] = {}
    for engine in engines:
        if not isinstance(engine, dict):
            continue
        model = str(engine.get("model"))
        per_model[model] = per_model.get(model, 0) + 1
        labels = [jid, model, str(engine.get("actor_id")), str(engine.get("node_id"))]
        for family, key in (
            ("running", "running"),
            ("waiting", "waiting"),
            ("kv_cache", "kv_cache_usage"),
        ):
            value = _number(engine.get(key))
            if value is not None:
                f[family].add_metric(labels, value)
        count, total = _number(engine.get("ttft_count")), _number(engine.get("ttft_sum"))
        if count is not None and total is not None:
            sums = ttft.setdefault(model, [0.0, 0.0])
            sums[0] += count
            sums[1] += total
    for model, n in per_model.items():
        f["engines"].add_metric([jid, model], n)
    for model, (count, total) in ttft.items():
        base = {"job_id": jid, "model": model}
        f["ttft"].add_sample(f["ttft"].name + "_count", base, count)
        f["ttft"].add_sample(f["ttft"].name + "_sum", base, total)
