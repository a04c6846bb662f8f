"""Generation on one vLLM engine: rows in, one ``RowResult`` per row out.

A ``Generator`` owns an ``AsyncLLM`` and submits every row of a batch as its own
request, so the engine's continuous batching sees all of them at once and one long
generation never holds back the rest. Per-request submission also makes failures
per row: a prompt longer than ``max_model_len`` fails its own request, which becomes
an error row. It serves a job-local engine stage (``engine.py``) and a pool shared by
the jobs of a service (``pool.py``) alike; there, each request carries its job's key
(to abort a job's requests at once) and a priority (vLLM's priority scheduling).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from typing import Any

import pyarrow as pa

from llm_batch import columns
from llm_batch.errors import EngineUnavailable
from llm_batch.pipeline.engine_args import (
    SamplingParamsCache,
    build_engine_args,
    build_pooling_params,
    engine_failure,
    is_classifier,
)
from llm_batch.pipeline.prompts import stopped_rows

__all__ = ["BatchInputs", "EngineLoad", "Generator", "RowResult", "whereabouts"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RowResult:
    """What the engine made of one row (all None but ``error`` when it failed)."""

    text: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[str, Any]] | None = None  # OpenAI's shape, when asked for
    latency: float | None = None  # seconds from submission to the last token
    deduplicated: bool = False  # another row's output: the same prompt and sampling
    cached: bool = False  # from the response cache (cache.py), not generated in this run
    skipped: bool = False  # stopped at an earlier stage of the job: never sent (all None)
    reasoning: str | None = None  # a reasoning model's reasoning, split from ``text``
    # A pooling model's output instead of text (model.task embed, classify, score).
    embedding: Any = None  # numpy float32 vector
    probs: Any = None  # numpy float32, in the order of the model's labels
    label: str | None = None
    score: float | None = None

    @classmethod
    def failed(cls, error: str) -> RowResult:
        return cls(error=error)


@dataclasses.dataclass(frozen=True)
class BatchInputs:
    """The columns of a batch the engine reads, as plain lists (cheap to send to a pool):
    the rendered prompt or chat messages, a render error, the sample index and the row's
    sampling overrides."""

    prompts: list[str | None]
    messages: list[Any]
    render_errors: list[str | None]
    samples: list[int]
    overrides: list[Any]
    pairs: list[str | None] | None = None  # a score job's second texts
    stopped: list[bool] | None = None  # rows stopped at an earlier stage (a staged job's)
    # The job's prompt.chat_template_kwargs: per batch, since a pool serves many jobs.
    chat_template_kwargs: dict[str, Any] | None = None
    # The LoRA adapter the batch's requests carry ({name, path}), when its model has one.
    lora: dict[str, str] | None = None

    @classmethod
    def from_table(
        cls,
        batch: pa.Table,
        *,
        overrides_column: str | None,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora: dict[str, str] | None = None,
    ) -> BatchInputs:
        n = batch.num_rows
        names = batch.column_names

        def column(name: str | None, default: Any) -> list[Any]:
            if name is not None and name in names:
                return batch.column(name).to_pylist()
            return [default] * n

        return cls(
            prompts=column(columns.PROMPT, None),
            messages=column(columns.MESSAGES, None),
            render_errors=column(columns.RENDER_ERROR, None),
            samples=column(columns.SAMPLE_INDEX, 0),
            overrides=column(overrides_column, None),
            pairs=column(columns.PAIR, None) if columns.PAIR in names else None,
            stopped=stopped_rows(batch),
            chat_template_kwargs=chat_template_kwargs,
            lora=lora,
        )

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, at: list[int]) -> BatchInputs:
        """The rows at ``at``, in that order (those a cache did not answer)."""

        def pick(values: list[Any]) -> list[Any]:
            return [values[i] for i in at]

        return BatchInputs(
            prompts=pick(self.prompts),
            messages=pick(self.messages),
            render_errors=pick(self.render_errors),
            samples=pick(self.samples),
            overrides=pick(self.overrides),
            pairs=None if self.pairs is None else pick(self.pairs),
            stopped=None if self.stopped is None else pick(self.stopped),
            chat_template_kwargs=self.chat_template_kwargs,
            lora=self.lora,
        )

    def live(self) -> list[int] | None:
        """The rows to send to the engine, when some stopped at an earlier stage (else None:
        all of them)."""
        if self.stopped is None or not any(self.stopped):
            return None
        return [i for i, stopped in enumerate(self.stopped) if not stopped]


def with_skipped(rows: int, live: list[int], results: list[RowResult]) -> list[RowResult]:
    """A batch's results: ``results`` for the ``live`` rows, skipped ones for the rest."""
    out = [RowResult(skipped=True)] * rows
    for i, result in zip(live, results, strict=True):
        out[i] = result
    return out


def _cpu_threads(wanted: int | None) -> None:
    """Narrow the cores the CPU engine computes on to the first ``wanted``.

    vLLM binds the OpenMP threads that run the model itself (``VLLM_CPU_OMP_THREADS_BIND``,
    by default one thread per core but one) and gives them a matching OMP_NUM_THREADS,
    in the engine-core process here (``_engine_config``). The core left over is the
    front end's, Ray's and the job's own tasks'.
    """
    if wanted:
        cores = sorted(os.sched_getaffinity(0))[:wanted]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))


def _engine_config(engine_args: Any, usage_context: Any, *, on_cpu: bool) -> tuple[Any, Any]:
    """The engine's config, and the environment its engine-core process starts in.

    On a GPU, vLLM's own. vLLM's CPU platform runs the model in a worker process of its
    own beside the engine core (``mp``), and the two take turns on every step, each
    spinning on a core while the other works. On a small machine that spin is a whole
    core that the service, Ray and the job's own tasks then fight the engine for. With
    one device (no tensor, pipeline or data split) and no executor asked for, the model
    runs in the engine-core process itself (``uni``): vLLM allows that once
    ``VLLM_ENABLE_V1_MULTIPROCESSING`` is off, which otherwise only matters to ``LLM``
    (``AsyncLLM`` always starts its engine core in a process of its own). The reason
    vLLM gives for refusing it, that OpenMP cannot be set up in a process already
    running, does not hold here: the engine core is a fresh process, and it gets the
    OpenMP threads and binding vLLM's ``mp`` executor gives its worker
    (``OMPProcessManager``: the cores of ``cpu_threads``, or all but one). Measured:
    docs/decisions/0019-cpu-engine-in-one-process.md.
    """
    devices = (
        engine_args.tensor_parallel_size
        * engine_args.pipeline_parallel_size
        * engine_args.data_parallel_size
    )
    if not on_cpu or devices != 1 or engine_args.distributed_executor_backend is not None:
        return engine_args.create_engine_config(usage_context), contextlib.nullcontext()
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    engine_args.distributed_executor_backend = "uni"
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        config = engine_args.create_engine_config(usage_context)
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
    return config, OMPProcessManager(config).configure_omp_envs(rank=0, local_rank=0)


def _exit_with_parent() -> None:
    """Make the processes vLLM spawns from here exit when this actor dies, even by SIGKILL.

    Spawned children start a fresh interpreter, which imports ``sitecustomize``
    from ``PYTHONPATH``: ours starts a thread that watches the parent.
    """
    guard = os.path.join(os.path.dirname(__file__), "_orphan_guard")
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if guard not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([guard, *filter(None, paths)])
    os.environ["LLM_BATCH_EXIT_WITH_PARENT"] = "1"


def _yield_to_engine(niceness: int = 19) -> None:
    """Lower the CPU priority of every thread of this process (the engine's front end).

    Called once the engine's processes are running: they keep the priority they were
    spawned with. A step of a small model lasts a few milliseconds, so each time the
    front end (handing rows over, collecting outputs, Ray's own threads) takes the
    engine's core the whole step waits. At the lowest priority it runs in the gaps the
    engine leaves; its queue of requests is deep enough that the engine does not wait
    for it. Raising a niceness needs no privilege. Measured on 2 cores:
    docs/decisions/0003-engine-front-end-priority.md.
    """
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that has just ended
                if os.getpriority(os.PRIO_PROCESS, int(tid)) < niceness:
                    os.setpriority(os.PRIO_PROCESS, int(tid), niceness)


# Deterministic outputs kept for rows asking the same again (in flight, or this recent).
_SAME_OUTPUTS_KEPT = 50_000
# Prompt tokens of the CPU engine's first step (Generator._warm_up).
WARM_UP_TOKENS = 32

# Niceness of a shared pool's engine processes (see _engine_below_control_plane).
SHARED_ENGINE_NICENESS = 5


def _engine_below_control_plane(niceness: int = SHARED_ENGINE_NICENESS) -> None:
    """Lower the CPU priority of this process's engine processes (core and workers).

    A pool's engine serves every job of a service, which keeps a control plane beside it
    (the service, the engine host, Ray's daemons, each job's driver and tasks). Spinning
    at the same priority on a small machine, the engine starves that control plane, and a
    small job waits seconds for each of its few steps. Just below it, the engine takes
    every cycle the control plane does not use, which is most of them."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.nice() < niceness:
                    child.nice(niceness)


def whereabouts() -> dict[str, Any]:
    """Which Ray node and actor this engine runs on (for placement checks and the dashboard)."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id()}
    except Exception:  # noqa: BLE001 - outside Ray (unit tests)
        return {"node_id": None, "actor_id": None}


class EngineLoad:
    """What vLLM's stat loggers tell of the engine: requests running and waiting and KV-cache
    use at its last step, and the time to first token of requests since the last ``take``.

    The engine in an actor serves no metrics endpoint; these ride along with the stage's
    progress reports instead.
    """

    def __init__(self) -> None:
        self.running = self.waiting = 0
        self.kv_cache_usage = 0.0
        self._ttft: list[float] = []

    def stat_logger(self) -> Any:
        """A vLLM stat logger factory that records into this object.

        It stands in for vLLM's Prometheus logger, which vLLM otherwise adds to every
        engine: in an actor nothing serves its registry, and updating it costs the
        frontend several percent of a core on every step.
        """
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        load = self

        class _Recorder(PrometheusStatLogger):
            def __init__(self, vllm_config: Any, engine_indexes: Any = None):
                pass  # none of the Prometheus logger's metrics

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is not None:
                    load.running = scheduler_stats.num_running_reqs
                    load.waiting = scheduler_stats.num_waiting_reqs
                    load.kv_cache_usage = scheduler_stats.kv_cache_usage
                if iteration_stats is not None:
                    load._ttft.extend(iteration_stats.time_to_first_tokens_iter)

            def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
                pass

            def record_admission_rejection(self, reason: str) -> None:
                pass

            def log_engine_initialized(self) -> None:
                pass

            def log(self) -> None:
                pass

        return _Recorder

    def take(self) -> dict[str, Any]:
        ttft, self._ttft = self._ttft, []
        return {
            "running": self.running,
            "waiting": self.waiting,
            "kv_cache_usage": round(self.kv_cache_usage, 4),
            "ttft_sum": round(sum(ttft), 6),
            "ttft_count": len(ttft),
        }


class _RowError(Exception):
    """A row's failure whose message is complete as it is."""


class Generator:
    """One vLLM engine (``AsyncLLM``) and what it takes to feed it rows.

    ``model`` is the job spec's plain ``model`` block. ``shared``: the engine serves the
    jobs of a service's pool, whose requests vLLM schedules by priority. Raises
    ``EngineUnavailable`` with vLLM's own reason when the engine does not start.
    """

    def __init__(self, model: dict[str, Any], *, shared: bool = False):
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.renderers.inputs.preprocess import parse_model_prompt
            from vllm.usage.usage_lib import UsageContext
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:  # pragma: no cover - depends on the install
            raise EngineUnavailable(
                f"vLLM is not installed ({e}); install the engine extra: "
                "pip install 'llm_batch[cpu]' (no GPU) or 'llm_batch[gpu]' (CUDA)"
            ) from e

        on_cpu = current_platform.is_cpu()
        args = build_engine_args(model, on_cpu=on_cpu, shared=shared)
        if on_cpu:
            _cpu_threads(model["engine"].get("cpu_threads"))
        _exit_with_parent()
        started = time.monotonic()
        self.load = EngineLoad()
        # vLLM sizes its batches by who asks: an API server gets small ones for latency
        # (on the CPU engine 128 sequences, 2048 tokens a step), offline `LLM` large ones
        # for throughput (256, 4096). We are offline.
        usage = UsageContext.LLM_CLASS
        try:
            engine_args = AsyncEngineArgs(**args)
            config, core_env = _engine_config(engine_args, usage, on_cpu=on_cpu)
            with core_env:  # the engine-core process is spawned in here
                self.engine = AsyncLLM.from_vllm_config(
                    config,
                    usage_context=usage,
                    stat_loggers=[self.load.stat_logger()],
                    disable_log_stats=engine_args.disable_log_stats,
                    enable_log_requests=engine_args.enable_log_requests,
                )
        except Exception as e:
            raise EngineUnavailable(
                f"the engine for {model['path']!r} failed to start: {engine_failure(e)}"
            ) from e
        self._tokenizer = self.engine.get_tokenizer()
        # The engine's own tokenizing settings (special tokens, the over-long cut-off),
        # applied to a whole batch at once: see _token_ids.
        self._tok_params = self.engine.renderer.default_cmpl_tok_params
        self._parse_prompt = parse_model_prompt
        # vLLM reads its settings from the environment on every request unless told they
        # are final, as its API server and engine core do once they are up.
        import vllm.envs

        vllm.envs.enable_envs_cache()
        if on_cpu:
            _yield_to_engine()
            if shared:
                _engine_below_control_plane()
        self._requests: dict[str, set[str]] = {}  # job key -> its requests in the engine
        # Outputs of deterministic requests, in flight or recent: a row asking the same again
        # takes it (Generator._same_output_key), the engine generating it once.
        self._outputs: collections.OrderedDict[tuple[Any, ...], asyncio.Future[RowResult]] = (
            collections.OrderedDict()
        )
        self.task: str = model.get("task") or "generate"
        self.labels: list[str] = []  # a classifier's, in the order of its probabilities
        self.dim: int | None = None  # an embedder's vector size
        self.cross_encoder = False
        self._pooling = self._pooling_setup(model) if self.task != "generate" else None
        self._reasoning = self._reasoning_parser(model.get("reasoning_parser"))
        self._loras: dict[str, Any] = {}  # adapter path -> its LoRARequest
        # On the CPU engine, one step before the first rows (see _warm_up).
        self._warm = not on_cpu
        self._warming: asyncio.Future[None] | None = None
        logger.info("engine for %s ready in %.1fs", model["path"], time.monotonic() - started)

    def _reasoning_parser(self, name: str | None) -> Any:
        """vLLM's reasoning parser of that name over the engine's tokenizer (None: none)."""
        if not name:
            return None
        from vllm.reasoning import ReasoningParserManager

        try:
            return ReasoningParserManager.get_reasoning_parser(name)(self._tokenizer)
        except Exception as e:
            self.shutdown()
            raise EngineUnavailable(
                f"model.reasoning_parser: {name!r} cannot parse this model's output "
                f"({type(e).__name__}: {e})"
            ) from e

    def _pooling_setup(self, model: dict[str, Any]) -> Any:
        """A pooling model's request params, labels and embedding size. A score over a
        cross-encoder (a classifier of one label) runs each pair as one classify request;
        over an embedder, the cosine of the two texts' embeddings, as vLLM's LLM.score."""
        config = self.engine.model_config
        id2label = getattr(config.hf_config, "id2label", None) or {}
        self.labels = [str(id2label[i]) for i in sorted(id2label)]
        self.cross_encoder = self.task == "score" and is_classifier(model["path"])
        dimensions = (model.get("pooling") or {}).get("dimensions")
        self.dim = None if self.task == "classify" else (dimensions or int(config.embedding_size))
        task = "classify" if self.task == "classify" or self.cross_encoder else "embed"
        return build_pooling_params({**model, "task": task})

    @property
    def errored(self) -> bool:
        return bool(self.engine.errored)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit, modules are gone
            self.engine.shutdown()

    @property
    def jobs(self) -> dict[str, int]:
        """Requests in the engine per job key."""
        return {job: len(ids) for job, ids in self._requests.items() if ids}

    async def abort(self, job: str) -> int:
        """Abort every request of ``job`` in the engine at once (they finish as ``abort``)."""
        ids = list(self._requests.get(job, ()))
        if ids:
            await self.engine.abort(ids)
        return len(ids)

    async def generate(
        self,
        inputs: BatchInputs,
        params: SamplingParamsCache,
        *,
        job: str = "job",
        priority: int = 0,
        on_dead: Any = None,
    ) -> list[RowResult]:
        """One request per row, all at once; a row's failure is its ``error``.
        ``on_dead(exception)`` is called when the engine itself died under a request.
        A pooling model's rows are pooled instead (``params`` unused)."""
        await self._ready()
        if self._pooling is not None:
            return await self._pool(inputs, job=job, priority=priority, on_dead=on_dead)
        token_ids = self._token_ids(
            [
                p if e is None else None
                for p, e in zip(inputs.prompts, inputs.render_errors, strict=True)
            ]
        )
        k = params.sampling.get("logprobs")
        ids = self._requests.setdefault(job, set())
        adapter = self._lora_request(inputs.lora)

        async def row(i: int) -> RowResult:
            render_error = inputs.render_errors[i]
            if render_error is not None:
                return RowResult.failed(render_error)
            try:
                sampling = params.get(inputs.overrides[i], inputs.samples[i])
            except Exception as e:  # noqa: BLE001
                errors = getattr(e, "errors", None)
                msg = (
                    "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in errors())
                    if callable(errors)
                    else str(e).splitlines()[0]
                )
                column = params.sampling.get("overrides_column")
                return RowResult.failed(f"sampling override ({column}): {msg}")
            try:
                prompt = self._engine_prompt(
                    token_ids[i],
                    inputs.prompts[i],
                    inputs.messages[i],
                    chat_template_kwargs=inputs.chat_template_kwargs,
                )
            except Exception as e:  # noqa: BLE001 - the engine's own words, as from generate
                return RowResult.failed(
                    str(e) if isinstance(e, _RowError) else f"{type(e).__name__}: {e}"
                )
            key = self._same_output_key(job, prompt, sampling, inputs, i, deterministic)
            if key is not None and adapter is not None:  # each adapter its own outputs
                key = (*key, adapter.lora_path)
            earlier = self._outputs.get(key) if key is not None else None
            if key is not None and earlier is not None:  # the same output, generated once
                self._outputs.move_to_end(key)
                return dataclasses.replace(await asyncio.shield(earlier), deduplicated=True)
            done: asyncio.Future[RowResult] | None = None
            if key is not None:
                done = self._outputs[key] = asyncio.get_running_loop().create_future()
                while len(self._outputs) > _SAME_OUTPUTS_KEPT:
                    self._outputs.popitem(last=False)
            request_id = f"{job}-{uuid.uuid4().hex}"
            ids.add(request_id)
            result = RowResult.failed("the request was cancelled")
            try:
                result = await self._generate_one(
                    prompt, sampling, request_id, priority, k, on_dead, lora=adapter
                )
                return result
            finally:
                ids.discard(request_id)
                if key is not None and done is not None:
                    done.set_result(result)
                    if result.error is not None or result.finish_reason == "abort":
                        # Not kept: a copy asks the engine again.
                        self._outputs.pop(key, None)

        # Deterministic sampling only (greedy, or seeded), and one sample per prompt: n
        # samples of a prompt are meant to differ.
        deterministic = params.sampling.get("n", 1) == 1
        try:
            return await asyncio.gather(*(row(i) for i in range(len(inputs))))
        finally:
            if not ids:
                self._requests.pop(job, None)

    @staticmethod
    def _same_output_key(
        job: str, prompt: Any, sampling: Any, inputs: BatchInputs, i: int, deterministic: bool
    ) -> tuple[Any, ...] | None:
        """What makes two rows' outputs the same: the job (its sampling), the prompt's
        tokens and the row's overrides; None when sampling is random (unseeded)."""
        if not deterministic or (sampling.temperature > 0 and sampling.seed is None):
            return None
        tokens = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if tokens is None:
            return None
        overrides = inputs.overrides[i]
        return (
            job,
            tuple(tokens),
            None if overrides is None else json.dumps(overrides, sort_keys=True, default=str),
            inputs.samples[i],
        )

    async def _ready(self) -> None:
        """Once per engine, on its event loop, before any row: the CPU engine's warm-up
        step. Concurrent first callers wait for the one step; a caller cancelled while
        it runs leaves it running for the others."""
        if self._warm:
            return
        if self._warming is None or self._warming.cancelled():
            self._warming = asyncio.ensure_future(self._warm_up())
        await asyncio.shield(self._warming)
        self._warm = True

    async def _warm_up(self) -> None:
        """One step of ``WARM_UP_TOKENS`` prompt tokens before the engine's first rows.

        vLLM's CPU attention kernel for AMX processors (bf16) kills the engine's worker
        with SIGILL when the first step after start is a prefill of a few tokens (a
        prompt of 1-4 tokens of the project's tiny model); once a longer prefill has run,
        every step after it, short ones included, runs fine (decision 0018). A failure of
        the step is only logged: an engine that dies here fails the rows' requests as it
        would have anyway, and a step that cannot be made must not stop the rows."""
        started = time.monotonic()
        try:
            from vllm import SamplingParams

            limit = int(getattr(self.engine.model_config, "max_model_len", 0) or 0)
            length = max(1, min(WARM_UP_TOKENS, limit - 1)) if limit else WARM_UP_TOKENS
            text = "The engine takes one step before its first rows. " * 8
            ids = self._tokenizer.encode(text, add_special_tokens=False) or [0]
            prompt = self._engine_prompt((ids * length)[:length], None, None)
            request_id = f"llm-batch-warm-up-{uuid.uuid4().hex}"
            stream: Any
            if self._pooling is None:
                stream = self.engine.generate(prompt, SamplingParams(max_tokens=1), request_id)
            else:
                stream = self.engine.encode(prompt, self._pooling, request_id)
            async for _ in stream:
                pass
        except Exception:  # noqa: BLE001 - see above
            logger.warning("the engine's warm-up step failed", exc_info=True)
        else:
            logger.info("engine warm-up step in %.2fs", time.monotonic() - started)
        # Its time to first token is no job's. For a lone request vLLM records the step's
        # stats before the request's waiter resumes, and no row's request is in yet.
        self.load.take()

    def _lora_request(self, lora: dict[str, str] | None) -> Any:
        """vLLM's LoRARequest for an adapter, one id per adapter path for the engine's life."""
        if lora is None:
            return None
        if lora["path"] not in self._loras:
            from vllm.lora.request import LoRARequest

            n = len(self._loras) + 1  # (names may repeat across a pool's jobs: ids not)
            self._loras[lora["path"]] = LoRARequest(f"{lora['name']}-{n}", n, lora["path"])
        return self._loras[lora["path"]]

    async def _generate_one(
        self,
        prompt: Any,
        params: Any,
        request_id: str,
        priority: int,
        k: int | None,
        on_dead: Any,
        *,
        lora: Any = None,
    ) -> RowResult:
        final = None
        started = time.monotonic()
        extra: dict[str, Any] = {} if lora is None else {"lora_request": lora}
        ended = False
        if self._reasoning is not None:
            # A prompt that closed the think block itself (a chat template told
            # enable_thinking: false) is answered at once: structured outputs constrain
            # from the first token and the whole output is the answer, as vLLM's server does.
            ended = bool(self._reasoning.is_reasoning_end(_prompt_token_ids(prompt)))
            extra["reasoning_ended"] = ended
        try:
            async for out in self.engine.generate(
                prompt, params, request_id, priority=priority, **extra
            ):
                final = out
        except Exception as e:  # noqa: BLE001 - a row's failure is data, not a crash
            if self.engine.errored and on_dead is not None:
                on_dead(e)
            cause = e.__cause__ if e.__cause__ is not None else e
            return RowResult.failed(f"{type(cause).__name__}: {cause}")
        assert final is not None
        completion = final.outputs[0]
        text, reasoning = completion.text, None
        if self._reasoning is not None and not ended:  # as vLLM's server splits it
            reasoning, text = self._reasoning.extract_reasoning(text, None)
        return RowResult(
            text=text,
            reasoning=reasoning,
            input_tokens=len(final.prompt_token_ids or ()),
            output_tokens=len(completion.token_ids),
            finish_reason=completion.finish_reason,
            logprobs=_logprobs(completion, k) if k is not None else None,
            latency=time.monotonic() - started,
        )

    async def _pool(
        self, inputs: BatchInputs, *, job: str, priority: int, on_dead: Any
    ) -> list[RowResult]:
        """One pooling request per row (two for a score over an embedder), all at once."""
        import numpy as np

        texts = [
            p if e is None else None
            for p, e in zip(inputs.prompts, inputs.render_errors, strict=True)
        ]
        pairs = inputs.pairs if self.task == "score" else None
        if self.task == "score" and pairs is None:
            pairs = [None] * len(texts)
        if self.cross_encoder:
            assert pairs is not None
            token_ids, pair_ids = self._pair_token_ids(texts, pairs), None
        else:
            token_ids = self._token_ids(texts)
            pair_ids = self._token_ids(pairs) if pairs is not None else None
        ids = self._requests.setdefault(job, set())
        prompts = self._engine_prompts(token_ids, None if self.cross_encoder else texts)
        pair_prompts = self._engine_prompts(pair_ids, pairs) if pair_ids is not None else None

        params = self._pooling
        assert params is not None

        async def encode(prompt: Any) -> Any:
            if isinstance(prompt, Exception):
                raise prompt
            request_id = f"{job}-{uuid.uuid4().hex}"
            ids.add(request_id)
            final = None
            try:
                async for out in self.engine.encode(prompt, params, request_id, priority=priority):
                    final = out
            finally:
                ids.discard(request_id)
            assert final is not None
            return final

        def vector(out: Any) -> Any:
            return out.outputs.data.float().numpy().astype(np.float32, copy=False)

        async def row(i: int) -> RowResult:
            if inputs.render_errors[i] is not None:
                return RowResult.failed(inputs.render_errors[i] or "")
            if pairs is not None and pairs[i] is None:
                return RowResult.failed("the pair's second text is null")
            started = time.monotonic()
            try:
                if pairs is not None and not self.cross_encoder:
                    assert pair_prompts is not None
                    a, b = await asyncio.gather(encode(prompts[i]), encode(pair_prompts[i]))
                    va, vb = vector(a), vector(b)
                    norms = float(np.linalg.norm(va) * np.linalg.norm(vb))
                    return RowResult(
                        score=float(np.dot(va, vb) / norms) if norms else 0.0,
                        input_tokens=len(a.prompt_token_ids) + len(b.prompt_token_ids),
                        latency=time.monotonic() - started,
                    )
                out = await encode(prompts[i])
            except _RowError as e:
                return RowResult.failed(str(e))
            except Exception as e:  # noqa: BLE001 - a row's failure is data, not a crash
                if self.engine.errored and on_dead is not None:
                    on_dead(e)
                cause = e.__cause__ if e.__cause__ is not None else e
                return RowResult.failed(f"{type(cause).__name__}: {cause}")
            values = vector(out)
            tokens, latency = len(out.prompt_token_ids or ()), time.monotonic() - started
            if self.task == "embed":
                return RowResult(embedding=values, input_tokens=tokens, latency=latency)
            if self.task == "score":
                return RowResult(score=float(values[0]), input_tokens=tokens, latency=latency)
            top = int(np.argmax(values))
            label = self.labels[top] if top < len(self.labels) else str(top)
            return RowResult(probs=values, label=label, input_tokens=tokens, latency=latency)

        try:
            return await asyncio.gather(*(row(i) for i in range(len(inputs))))
        finally:
            if not ids:
                self._requests.pop(job, None)

    def _engine_prompts(self, token_ids: list[Any], texts: list[str | None] | None) -> list[Any]:
        """Each row's engine input, or the exception that refused it (None: no prompt): in
        one call of the engine's renderer, or row by row when it refuses one of them (a
        prompt over max_model_len), so that the refusal is that row's alone. Row by row,
        rendering took about a sixth of an embedding front end's samples (py-spy), time it
        takes from the engine on a machine where they share cores."""
        out: list[Any] = [ids if isinstance(ids, Exception) else None for ids in token_ids]
        at = [i for i, ids in enumerate(token_ids) if ids is not None and out[i] is None]
        text = texts or [None] * len(token_ids)
        try:
            parsed = [
                self._parse_prompt(
                    self.engine.model_config,
                    {"prompt_token_ids": list(token_ids[i])}
                    | ({"prompt": text[i]} if text[i] is not None else {}),
                )
                for i in at
            ]
            for i, prompt in zip(
                at, self.engine.renderer.render_cmpl(parsed, self._tok_params), strict=True
            ):
                out[i] = prompt
        except Exception:  # noqa: BLE001 - one refused: find which, row by row
            for i in at:
                try:
                    out[i] = self._engine_prompt(token_ids[i], text[i], None)
                except Exception as e:  # noqa: BLE001 - this row's refusal
                    out[i] = e
        return out

    def _pair_token_ids(self, texts: list[str | None], pairs: list[str | None]) -> list[Any]:
        """A cross-encoder's input: each pair tokenized together, as the tokenizer joins a
        text and its pair (its separator tokens), one call per batch."""
        at = [
            i
            for i, (t, p) in enumerate(zip(texts, pairs, strict=True))
            if t is not None and p is not None
        ]
        out: list[Any] = [None] * len(texts)
        if at:
            tokenizer: Any = self._tokenizer
            encoded = tokenizer(
                [texts[i] for i in at],
                [pairs[i] for i in at],
                **self._tok_params.get_encode_kwargs(),
            )
            for i, ids in zip(at, encoded["input_ids"], strict=True):
                out[i] = ids
        return out

    def _token_ids(self, prompts: list[str | None]) -> list[Any]:
        """Each text prompt's token ids, or the exception that refused it (None: no prompt).

        Tokenized in one call per batch with the settings the engine itself would use,
        so the engine gets ids and skips its own tokenizing, which it does one request
        at a time in the front end: py-spy had that at a third of the front end's busy
        time, taken from the engine on a machine where they share cores.
        """
        texts: list[str] = []
        at: list[int] = []
        out: list[Any] = [None] * len(prompts)
        for i, prompt in enumerate(prompts):
            if prompt is None:
                continue
            try:  # the engine's checks before tokenizing (e.g. a text far too long)
                texts.append(
                    self._tok_params.apply_pre_tokenization(self._tokenizer, {"prompt": prompt})[
                        "prompt"
                    ]
                )
                at.append(i)
            except Exception as e:  # noqa: BLE001 - a row's failure is data
                out[i] = e
        if texts:
            encoded = self._tokenizer(texts, **self._tok_params.get_encode_kwargs())
            for i, ids in zip(at, encoded["input_ids"], strict=True):
                out[i] = ids
        return out

    def _engine_prompt(
        self,
        ids: Any,
        text: str | None,
        messages: list[dict[str, str]] | None,
        *,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """The engine's input for a row's token ids (or chat messages), checked as the engine
        checks it (a prompt longer than max_model_len raises here, for this row alone).

        Handing the engine a rendered input, as vLLM's own docs show for power users,
        also spares the front end a thread hop per request (vLLM runs raw prompts
        through a thread pool so as not to block its event loop)."""
        if messages is not None:
            # The model's own chat template, tokenized once here; the engine gets ids.
            try:
                ids = self._tokenizer.apply_chat_template(
                    list[Any](messages),
                    tokenize=True,
                    add_generation_prompt=True,
                    return_dict=False,
                    **(chat_template_kwargs or {}),
                )
            except Exception as e:
                raise _RowError(f"chat template failed: {type(e).__name__}: {e}") from e
        elif isinstance(ids, Exception):
            raise ids
        # With its text, as vLLM's own rendering of a text prompt keeps it.
        prompt = {"prompt_token_ids": list(ids)} | ({"prompt": text} if text is not None else {})
        parsed = self._parse_prompt(self.engine.model_config, prompt)
        (engine_input,) = self.engine.renderer.render_cmpl([parsed], self._tok_params)
        return engine_input


def _prompt_token_ids(prompt: Any) -> list[int]:
    """An engine input's prompt token ids."""
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    return list(ids or getattr(prompt, "prompt_token_ids", None) or [])


def _logprobs(completion: Any, k: int) -> list[dict[str, Any]] | None:
    """OpenAI-shaped logprobs: each generated token and the top ``k`` at its step.

    vLLM adds the sampled token to a step's dict when it is outside the top k;
    it is reported as the step's token but not listed among the top k.
    """
    if completion is None or completion.logprobs is None:
        return None
    steps = []
    for token_id, step in zip(completion.token_ids, completion.logprobs, strict=False):
        chosen = step.get(token_id)
        top = sorted(
            (lp for lp in step.values() if lp.rank is not None and 1 <= lp.rank <= k),
            key=lambda lp: lp.rank,
        )
        steps.append(
            {
                "token": chosen.decoded_token if chosen else None,
                "logprob": chosen.logprob if chosen else None,
                "top_logprobs": [{"token": lp.decoded_token, "logprob": lp.logprob} for lp in top],
            }
        )
    return steps
