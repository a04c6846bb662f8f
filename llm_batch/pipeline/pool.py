"""Engine pools shared by jobs: one Ray Serve application per model, and the engine stage
that sends a job's batches to it.

A pool (``EnginePool``, a Serve deployment) holds one vLLM engine per replica, with
priority scheduling on. Jobs stay Ray Data pipelines with drivers of their own; only
their engine stage changes (``send_to_pool``): it hands each batch to the pool
through a Serve handle instead of starting an engine, so the requests of every job
meet in the same engines, where continuous batching serves them together. Serve
places the replicas (GPUs, placement groups, accelerator types), checks their health,
replaces dead ones and scales them between ``replicas.min`` and ``replicas.max``.

Fair share. Each request carries a vLLM priority (lower runs first):
``-job priority × 2**20 + the output tokens the job has had in this replica / 1024``
(capped). What a job has had counts from when its batch enters the engine: each batch
is charged its rows × ``max_tokens`` on entry, and the charge is replaced by the tokens
it generated once it is answered. A job's share follows its ``priority`` first, then how
little it has had: a small job that just arrived outranks the queued requests of a
long-running one, including the batches a job that just started has queued (charged on
entry, they rank behind it), so its rows enter the engine as soon as running sequences
finish, within a few steps. A job's own batches rank in the order they entered.
vLLM does not preempt running sequences for it (only a KV-cache shortage does),
so the big job loses a few slots for a few steps. In front of the pool, each job
keeps at most ``max_batches_in_flight`` batches in it (its admission limit).

Faults. A replica whose engine died fails its calls with ``PoolReplicaLost`` and
fails Serve's health check, which replaces it; the engine stage retries the batch
under the job's per-batch ledger (``progress.BatchLedger``), as a job-local engine
stage does, so a poison row still ends as an error row. A job whose tracker is gone
(its driver was stopped or killed) or cancelled has its requests aborted in the
engine within a second, while the other jobs go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
from typing import Any

import pyarrow as pa

from llm_batch.errors import EngineUnavailable, LLMBatchError
from llm_batch.pipeline.cache import CacheConfig, ResponseCache
from llm_batch.pipeline.engine import BatchGate, given_up_results, report_batch
from llm_batch.pipeline.engine_args import SamplingParamsCache
from llm_batch.pipeline.generation import (
    BatchInputs,
    Generator,
    RowResult,
    whereabouts,
    with_skipped,
)
from llm_batch.pipeline.progress import BatchLedger
from llm_batch.pipeline.rows import BatchFinisher, batch_key

__all__ = [
    "POOL_PREFIX",
    "EnginePool",
    "JobCancelled",
    "PoolReplicaLost",
    "pool_app",
    "pool_key",
    "pool_name",
    "send_to_pool",
    "wait_for_pool",
]

logger = logging.getLogger(__name__)

POOL_PREFIX = "llm-batch-pool-"
DEPLOYMENT = "EnginePool"
_PRIORITY_SPAN = 1 << 20
_TOKENS_PER_STEP = 1024  # output tokens a job has had per step of its fair-share rank


class JobCancelled(LLMBatchError):
    """The job was cancelled while its batches were in a pool."""


class PoolReplicaLost(Exception):
    """The replica's engine died under the call (Serve replaces the replica). ``replica``:
    which one (its actor id), so that the batches that were in it count one lost engine."""

    def __init__(self, message: str, replica: str | None = None):
        super().__init__(message)
        self.replica = replica

    def __reduce__(self) -> tuple[Any, ...]:  # across Ray, with its replica
        return (type(self), (str(self), self.replica))


def _lost_replica(error: BaseException) -> str | None:
    """The replica a failed pool call lost: the replica's own word, or the dead actor."""
    cause = getattr(error, "cause", None) or error  # Ray wraps the replica's exception
    replica = getattr(cause, "replica", None) or getattr(error, "actor_id", None)
    return str(replica) if replica else None


# What a pool is made of: everything that changes the engine. Not what a job does with it
# (batch size, batches in flight, retries) nor how many replicas serve it.
_ENGINE_FIELDS = ("path", "engine", "device", "accelerator_type", "placement_strategy")


def pool_key(model: dict[str, Any]) -> str:
    """The identity of the engine a model block asks for (equal keys share a pool)."""
    identity = {k: model.get(k) for k in _ENGINE_FIELDS}
    if model.get("reasoning_parser"):  # the engine's structured outputs wait for the answer
        identity["reasoning_parser"] = model["reasoning_parser"]
    if model.get("lora"):  # one engine with LoRA on serves every adapter of its base
        identity["lora"] = True
    if (model.get("task") or "generate") != "generate":
        # A pooling engine is another engine (vLLM's pooling runner, its pooling options).
        identity.update(task=model["task"], pooling=model.get("pooling"))
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pool_name(model: dict[str, Any]) -> str:
    """The Serve application name of a model's pool."""
    return POOL_PREFIX + pool_key(model)


_HINT_CHARS = 2048  # of a batch's first prompt: enough to tell its prefix group


@dataclasses.dataclass(frozen=True)
class PrefixHint:
    """What Serve's prefix-aware router reads of a batch (its ``prompt``): the first row's
    prompt text, or its chat messages' contents. Rows reach the pool grouped by prefix
    (``run.group_by_prefix``), so the first row stands for the batch."""

    prompt: str

    @classmethod
    def of(cls, inputs: BatchInputs) -> PrefixHint:
        for text, messages in zip(inputs.prompts, inputs.messages, strict=True):
            if text is not None:
                return cls(text[:_HINT_CHARS])
            if messages:
                joined = "".join(str(m.get("content") or "") for m in messages)
                return cls(joined[:_HINT_CHARS])
        return cls("")


class EnginePool:
    """The Serve deployment of a pool: one ``Generator`` (vLLM engine) per replica, shared by
    the jobs that call ``generate``."""

    generator_class: type[Generator] = Generator  # replaceable, as EngineStage's

    def __init__(self, model: dict[str, Any]):
        self.model = model
        self.generator = self.generator_class(model, shared=True)
        self.where = whereabouts()
        self.gate = BatchGate()
        self.params: dict[str, SamplingParamsCache] = {}
        # job key -> output tokens it has had here: generated, plus the most its batches
        # in the engine may generate (``_charge``)
        self.served: dict[str, int] = {}
        self.jobs: dict[str, dict[str, Any]] = {}  # job key -> {"name", "tracker", "seen"}
        self.started_at = time.time()
        self.last_request_at = time.time()
        self._dead: BaseException | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine died is replaced."""
        if self.generator.errored or self._dead is not None:
            raise RuntimeError(f"the engine of this replica is dead ({self._dead})")

    def _on_dead(self, cause: BaseException) -> None:
        self._dead = cause

    def _check_alive(self) -> None:
        """``PoolReplicaLost``, naming this replica, once its engine has died."""
        if self._dead is not None or self.generator.errored:
            raise PoolReplicaLost(
                f"the engine of this replica died ({self._dead})", self.where.get("actor_id")
            )

    def _sampling(self, sampling: dict[str, Any]) -> SamplingParamsCache:
        key = json.dumps(sampling, sort_keys=True, default=str)
        cache = self.params.get(key)
        if cache is None:
            if len(self.params) > 256:
                self.params.clear()
            cache = self.params[key] = SamplingParamsCache(sampling)
        return cache

    def priority(self, job: dict[str, Any]) -> int:
        """vLLM's priority for a job's next requests (lower runs first; see the module)."""
        had = min(self.served.get(job["key"], 0) // _TOKENS_PER_STEP, _PRIORITY_SPAN - 1)
        return -int(job.get("priority", 0)) * _PRIORITY_SPAN + had

    async def generate(
        self,
        hint: PrefixHint,
        inputs: BatchInputs,
        sampling: dict[str, Any],
        job: dict[str, Any],
        alone: bool,
    ) -> dict[str, Any]:
        """One batch of one job: ``{"results": [RowResult], "engine": load, "aborted": bool}``.
        ``hint``: for Serve's router only (``PrefixHint``).
        ``job``: ``key`` (unique per run), ``name``, ``priority``, ``tracker`` (its progress
        tracker, whose end or cancel aborts its requests), ``batch`` (the batch's ledger
        key, if the job keeps a ledger). ``alone``: the batch was in an engine that died;
        it runs with nothing beside it."""
        self._check_alive()
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch_jobs())
        key = job["key"]
        self.jobs.setdefault(key, {"name": job.get("name"), "tracker": job.get("tracker")})
        self.jobs[key]["seen"] = time.time()
        self.last_request_at = time.time()
        async with self.gate.hold(exclusive=alone):
            # Entered now, not when sent: a batch still waiting here behind one that runs
            # alone is not charged with the engine death that one may cause, nor let in
            # after it (the one before it leaves the gate once its requests failed).
            self._check_alive()
            if job.get("batch") is not None and job.get("tracker") is not None:
                job["tracker"].enter_batch.remote(job["batch"], alone=alone)
            priority = self.priority(job)
            charged = _charge(inputs, sampling)
            self.served[key] = self.served.get(key, 0) + charged
            generated = 0
            try:
                results = await self.generator.generate(
                    inputs,
                    self._sampling(sampling),
                    job=key,
                    priority=priority,
                    on_dead=self._on_dead,
                )
                generated = sum(r.output_tokens or 0 for r in results)
            finally:
                self.served[key] = max(self.served.get(key, 0) - charged + generated, 0)
        self.last_request_at = time.time()
        self._check_alive()
        aborted = any(r.finish_reason == "abort" for r in results)
        return {
            "results": results,
            "engine": {**self.where, **self.generator.load.take()},
            "aborted": aborted,
            "dim": self.generator.dim,
            "labels": self.generator.labels,
        }

    async def abort(self, job_key: str) -> int:
        return await self.generator.abort(job_key)

    def stats(self) -> dict[str, Any]:
        """What the service shows of this replica (``GET /v1/engines``)."""
        in_engine = self.generator.jobs
        return {
            "jobs": {
                self.jobs.get(key, {}).get("name") or key: count for key, count in in_engine.items()
            },
            "requests": sum(in_engine.values()),
            "running": self.generator.load.running,
            "waiting": self.generator.load.waiting,
            "started_at": self.started_at,
            "last_request_at": self.last_request_at,
            "node_id": self.where.get("node_id"),
        }

    def _forget_jobs(self, after: float = 60.0) -> None:
        """Forget the jobs with nothing in the engine that sent no batch for ``after``
        seconds, and what they had: a replica serves job after job for days."""
        in_engine = self.generator.jobs
        now = time.time()
        for key, job in list(self.jobs.items()):
            if key not in in_engine and now - job.get("seen", now) > after:
                self.jobs.pop(key, None)
                self.served.pop(key, None)

    async def _watch_jobs(self) -> None:
        """Abort the requests of jobs whose tracker ended (the driver was stopped or
        killed) or says the job is cancelled; forget jobs with nothing left here."""
        while True:
            await asyncio.sleep(1.0)
            self._forget_jobs()
            in_engine = self.generator.jobs
            for key in list(self.jobs):
                if key not in in_engine:
                    continue
                if not await self._job_alive(self.jobs[key].get("tracker")):
                    aborted = await self.generator.abort(key)
                    logger.info("job %s ended or was cancelled: aborted %d requests", key, aborted)

    @staticmethod
    async def _job_alive(tracker: Any) -> bool:
        if tracker is None:
            return True
        try:
            return not await asyncio.wait_for(tracker.cancelled.remote(), timeout=10)
        except TimeoutError:
            return True  # a busy tracker is not a dead one
        except Exception:  # noqa: BLE001 - RayActorError: the job's driver is gone
            return False


def _charge(inputs: BatchInputs, sampling: dict[str, Any]) -> int:
    """The most output tokens a batch may generate: what it is charged while in the engine."""
    live = inputs.live()
    rows = len(inputs) if live is None else len(live)
    return rows * int(sampling.get("max_tokens") or 0)


def router_config(model: dict[str, Any]) -> dict[str, Any] | None:
    """Serve's prefix-aware router for a generating pool of several replicas: a batch goes to
    the replica that served its prompt's prefix last (``PrefixHint``), whose prefix cache
    holds it, unless that replica's queue is a few batches longer than another's (then
    Serve's power of two choices, its default). None: Serve's default router."""
    replicas = model["replicas"]
    most = replicas["max"] if isinstance(replicas, dict) else replicas
    if most <= 1 or (model.get("task") or "generate") != "generate":
        return None
    return {
        "request_router_class": "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
        "request_router_kwargs": {
            "imbalanced_threshold": max(int(model["max_batches_in_flight"]), 1),
            "do_eviction": True,  # the prefix tree keeps at most ~400k characters
        },
    }


def pool_app(
    model: dict[str, Any], options: dict[str, Any], *, pool_class: type = EnginePool
) -> Any:
    """The Serve application of a pool: ``options`` from ``placement.pool_options``."""
    from ray import serve

    options = dict(options)
    overrides = options.pop("engine_overrides", {})
    router = router_config(model)
    if router is not None:
        options["request_router_config"] = router
    engine = {**model["engine"], "extra_args": {**overrides, **model["engine"]["extra_args"]}}
    deployment: Any = serve.deployment(
        pool_class,
        name=DEPLOYMENT,
        # Calls are batches of jobs, each job keeping a few in flight.
        max_ongoing_requests=1000,
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5,
        **options,
    )
    return deployment.bind({**model, "engine": engine})


_SEEN_RUNNING: dict[str, float] = {}  # pool -> when this process last saw it running
_TRUST_RUNNING = 10.0


def wait_for_pool(
    name: str, *, timeout: float = 1800.0, appear: float = 300.0, poll: float = 0.5
) -> None:
    """Until the pool's application runs; ``EngineUnavailable`` with Serve's message when
    it failed to deploy (an engine that did not start), or when it does not appear within
    ``appear`` seconds (the service's engine host deploys it when the job starts; gone
    after it appeared, it was released). Seen running lately (by this worker), it is not
    asked again: asking Serve's controller costs a small job's batch more than its
    generation."""
    from ray import serve

    if time.monotonic() - _SEEN_RUNNING.get(name, -1e9) < _TRUST_RUNNING:
        return
    started = time.monotonic()
    seen = False
    while True:
        app = serve.status().applications.get(name)
        waited = time.monotonic() - started
        if app is None:
            if seen or waited > appear:
                raise EngineUnavailable(
                    f"the engine pool {name} "
                    + ("was released" if seen else f"was not started in {appear:.0f}s")
                )
        else:
            seen = True
            status = str(getattr(app.status, "value", app.status))
            if status == "RUNNING":
                _SEEN_RUNNING[name] = time.monotonic()
                return
            if status == "DEPLOY_FAILED":
                reason = failure_reason(app)
                raise EngineUnavailable(f"the engine pool {name} failed to start: {reason}")
        if waited > timeout:
            raise EngineUnavailable(f"the engine pool {name} did not start in {timeout:.0f}s")
        time.sleep(poll)


def failure_reason(app: Any) -> str:
    messages = [str(app.message or "")]
    for deployment in (app.deployments or {}).values():
        messages.append(str(getattr(deployment, "message", "") or ""))
    text = " ".join(m for m in messages if m)
    found = [line for line in text.splitlines() if "EngineUnavailable" in line or "Error" in line]
    return (found[-1] if found else text.strip().splitlines()[-1] if text.strip() else "").strip()


@functools.lru_cache(maxsize=32)
def _handle(name: str) -> Any:
    from ray import serve

    return serve.get_deployment_handle(DEPLOYMENT, app_name=name)


@functools.lru_cache(maxsize=32)
def _finisher(config: str) -> tuple[BatchFinisher, int, int, ResponseCache | None]:
    c = json.loads(config)
    finisher = BatchFinisher(
        c["sampling"],
        model_name=c["model_name"],
        metrics=c["metrics"],
        drop=c["drop"],
        task=c["task"],
        reasoning=bool(c.get("reasoning")),
    )
    cache = c.get("cache")
    response_cache = ResponseCache(CacheConfig(**cache), c["sampling"]) if cache else None
    return finisher, int(c["max_retries"]), int(c["restart_limit"]), response_cache


def pool_stage_config(
    model: dict[str, Any],
    sampling: dict[str, Any],
    *,
    model_name: str | None,
    metrics: dict[str, Any],
    drop: list[str],
    cache: CacheConfig | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """What ``send_to_pool`` needs of the job, as one string (cached per worker)."""
    retries = int(model["max_batch_retries"])
    return json.dumps(
        {
            "cache": dataclasses.asdict(cache) if cache is not None else None,
            "sampling": sampling,
            "model_name": model_name,
            "metrics": metrics,
            "drop": drop,
            "task": model["task"],
            "reasoning": bool(model.get("reasoning_parser")),
            "chat_template_kwargs": chat_template_kwargs,
            # The adapter each request carries: the pool's engine serves all of its base's.
            "lora": {"name": str(model_name), "path": model["lora"]} if model.get("lora") else None,
            "max_retries": retries,
            # A pool restarts one replica at a time: as a job-local pool of one.
            "restart_limit": BatchLedger.restart_limit(1, retries, model["max_batches_in_flight"]),
        },
        sort_keys=True,
    )


_CANCEL_POLL_S = 1.0
_LOST_REPLICA_PAUSE_S = 1.0


def _await_reply(response: Any, progress: Any) -> dict[str, Any]:
    """The pool's reply to one batch. While it is awaited, the job's tracker is asked each
    second whether the job was cancelled: a batch that cannot reach an engine (a replica
    hung or being replaced, requests waiting to be routed) must not hold a cancelled job,
    whose requests the replica cannot abort before it has them."""
    import ray

    while True:
        try:
            return dict(response.result(timeout_s=_CANCEL_POLL_S))
        except TimeoutError:
            if progress is not None and ray.get(progress.cancelled.remote()):
                response.cancel()
                raise JobCancelled(
                    "the job was cancelled while its batch waited for the pool"
                ) from None


def send_to_pool(
    batch: pa.Table, *, pool: str, config: str, job: dict[str, Any], progress: Any
) -> pa.Table:
    """``map_batches`` function: one batch of one job through its model's pool, and the
    model's columns appended (``rows.BatchFinisher``). A plain task, not an actor: nothing
    to start per job, so a small job pays nothing but the call."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    finisher, max_retries, restart_limit, cache = _finisher(config)
    model_name = finisher._model_name
    started = time.monotonic()
    key = batch_key(batch, model_name)
    settings = json.loads(config)
    inputs = BatchInputs.from_table(
        batch,
        overrides_column=settings["sampling"].get("overrides_column"),
        chat_template_kwargs=settings.get("chat_template_kwargs"),
        lora=settings.get("lora"),
    )
    live = inputs.live()  # rows stopped at an earlier stage are not sent
    if live is not None:
        inputs = inputs.take(live)
    sampling = settings["sampling"]
    # The response cache answers what it holds; the pool gets the rest (maybe nothing).
    lookup = cache.lookup(inputs) if cache is not None else None
    if lookup is not None:
        inputs = inputs.take(lookup.misses)
    if len(inputs):
        wait_for_pool(pool)
    shape: dict[str, Any] = {}
    while True:
        decision: dict[str, Any] = {}
        if key is not None and progress is not None:
            decision = ray.get(
                progress.begin_batch.remote(
                    key, model=model_name, max_retries=max_retries, restart_limit=restart_limit
                )
            )
        if decision.get("cancelled"):
            raise JobCancelled("the job was cancelled")
        if decision.get("broken"):
            raise EngineUnavailable(f"model {model_name or 'default'}: {decision['broken']}")
        if decision.get("give_up"):
            logger.warning("%s: %d rows", decision["give_up"], batch.num_rows)
            results: list[RowResult] = given_up_results(batch, decision["give_up"])
            engine: dict[str, Any] = {}
            given_up, shape = True, {}
            break
        alone = bool(decision.get("alone"))
        if not len(inputs):  # the cache answered every row
            results, engine, given_up, shape = [], {}, False, {}
            break
        # The replica tells the ledger when the batch enters its engine (``generate``).
        call = {**job, "batch": key} if key is not None and progress is not None else job
        try:
            reply = _await_reply(
                _handle(pool).generate.remote(PrefixHint.of(inputs), inputs, sampling, call, alone),
                progress,
            )
        except (PoolReplicaLost, ActorDiedError, ActorUnavailableError, RayActorError) as e:
            # The replica (or its engine) died with this batch in it: Serve replaces it,
            # the ledger decides how the batch goes on (alone, or given up).
            logger.warning("engine pool %s lost a replica: %s", pool, type(e).__name__)
            if progress is not None:
                progress.engine_started.remote(model_name, replacing=_lost_replica(e))
            _SEEN_RUNNING.pop(pool, None)
            # Serve's health check notices the dead replica within seconds; until then the
            # pool still looks running and the call would fail again at once.
            time.sleep(_LOST_REPLICA_PAUSE_S)
            with contextlib.suppress(EngineUnavailable):
                wait_for_pool(pool, timeout=30)
            continue
        if reply["aborted"]:
            raise JobCancelled("the job was cancelled: its requests were aborted in the pool")
        results, engine, given_up = reply["results"], reply["engine"], False
        shape = {"dim": reply.get("dim"), "labels": reply.get("labels")}
        break
    if lookup is not None and cache is not None and not given_up:
        results = lookup.merge(results)
        cache.store(lookup, results)
    if live is not None and not given_up:
        results = with_skipped(batch.num_rows, live, results)
    out, report = finisher.finish(batch, results, **shape)
    if progress is not None:
        report_batch(
            progress,
            report,
            model_name=model_name,
            engine=engine,
            seconds=time.monotonic() - started,
            key=key,
            given_up=given_up,
        )
    return out
