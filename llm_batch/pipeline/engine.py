"""The engine stage: a Ray Data actor that owns one vLLM engine.

Each actor holds one ``AsyncLLM`` and submits every row of a batch as its own
request, so the engine's continuous batching sees all of them at once and one
long generation never holds back the rest; the actor takes several batches at
a time (``max_batches_in_flight``), so the engine is never idle while the next
batch travels. Per-request submission also makes failures per row: a prompt
longer than ``max_model_len`` fails its own request, which becomes an error row.

The stage appends its output columns to the Arrow table it received; the
carryover columns are never converted to Python objects.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa

from llm_batch import columns
from llm_batch.errors import EngineUnavailable
from llm_batch.job.jsonschema import arrow_type_for_schema, coerce
from llm_batch.pipeline.accumulators import AccumulatorSet, BatchView, JobContext
from llm_batch.pipeline.progress import BatchLedger

__all__ = [
    "EngineLoad",
    "EngineStage",
    "build_engine_args",
    "build_sampling_params",
    "engine_failure",
    "output_schema",
    "structured_complete",
]

logger = logging.getLogger(__name__)

_GIB = 1 << 30


def output_schema(
    model_name: str | None, sampling: dict[str, Any]
) -> list[tuple[str, pa.DataType]]:
    """The columns one model appends, in order."""
    types: dict[str, pa.DataType] = {
        columns.GENERATED_TEXT: pa.string(),
        columns.NUM_INPUT_TOKENS: pa.int32(),
        columns.NUM_OUTPUT_TOKENS: pa.int32(),
        columns.FINISH_REASON: pa.string(),
        columns.ERROR: pa.string(),
    }
    structured = sampling.get("structured") or {}
    if structured.get("parse"):
        types[columns.PARSED] = arrow_type_for_schema(structured["json_schema"])
    if sampling.get("logprobs") is not None:
        types[columns.LOGPROBS] = LOGPROBS_TYPE
    return [(columns.model_column(model_name, c), t) for c, t in types.items()]


_TOP = pa.struct([("token", pa.string()), ("logprob", pa.float64())])
# OpenAI's shape: one entry per generated token, with its top alternatives.
LOGPROBS_TYPE = pa.list_(
    pa.struct([("token", pa.string()), ("logprob", pa.float64()), ("top_logprobs", pa.list_(_TOP))])
)


def build_engine_args(model: dict[str, Any], *, on_cpu: bool) -> dict[str, Any]:
    """vLLM ``EngineArgs`` keyword arguments from a job's ``model`` block."""
    engine = model["engine"]
    args: dict[str, Any] = {
        "model": model["path"],
        "dtype": engine["dtype"],
        "enforce_eager": engine["enforce_eager"],
        "tensor_parallel_size": engine["tensor_parallel_size"],
        "pipeline_parallel_size": engine["pipeline_parallel_size"],
        "seed": engine["seed"],
        # No periodic stats lines in the job's log. The stage passes its own stat logger
        # (EngineLoad), which turns the engine's stats collection on regardless.
        "disable_log_stats": True,
    }
    for key in ("max_model_len", "max_num_seqs", "gpu_memory_utilization"):
        if engine.get(key) is not None:
            args[key] = engine[key]
    if on_cpu:
        # On the CPU engine, gpu_memory_utilization is a share of NUMA node 0
        # and vLLM's default (0.92) fails at start on a shared machine; an
        # explicit KV-cache size skips that check (1 GiB is plenty for small models).
        space = engine.get("kv_cache_space_gb") or 1.0
        args.setdefault("kv_cache_memory_bytes", int(space * _GIB))
    args.update(engine.get("extra_args") or {})
    return args


_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")


def build_sampling_params(sampling: dict[str, Any], *, sample_index: int = 0) -> Any:
    """vLLM ``SamplingParams`` for one request (one sample: ``n`` is expanded into rows).

    With a seed, sample ``k`` of a prompt uses ``seed + k`` so that the samples
    differ yet the job stays reproducible.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    spec = sampling.get("structured")
    if spec:
        structured = StructuredOutputsParams(
            choice=spec.get("choice"),
            regex=spec.get("regex"),
            json=spec.get("json_schema"),
            # JSON without free whitespace unless the job asks for it: a weak model can
            # otherwise spend every token on tabs after its "{".
            disable_any_whitespace=not spec.get("any_whitespace", False),
        )
    seed = sampling.get("seed")
    return SamplingParams(
        n=1,
        max_tokens=sampling["max_tokens"],
        temperature=sampling["temperature"],
        top_p=sampling["top_p"],
        seed=None if seed is None else seed + sample_index,
        stop=sampling.get("stop"),
        ignore_eos=sampling.get("ignore_eos", False),
        logprobs=sampling.get("logprobs"),
        structured_outputs=structured,
        # Only the final output of each request crosses back from the engine.
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def engine_failure(error: BaseException) -> str:
    """vLLM's own reason an engine did not start, in one line.

    vLLM validates its configuration with pydantic, whose message ends with a link, not
    the reason (``For further information visit https://errors.pydantic.dev/...``); the
    reason is each error's own ``msg``. Other errors: the first line that says something.
    """
    errors = getattr(error, "errors", None)
    if callable(errors):
        try:
            found = [str(err.get("msg", "")).removeprefix("Value error, ") for err in errors()]
        except Exception:  # noqa: BLE001 - not pydantic's after all
            found = []
        if any(found):
            return f"{type(error).__name__}: " + "; ".join(m for m in found if m)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def structured_complete(text: str | None, structured: dict[str, Any] | None) -> bool:
    """Whether a structured output's text is whole: one of the choices, a full match of
    the regex, or JSON that parses. A generation cut by ``max_tokens`` usually is not."""
    if text is None or not structured:
        return True
    if structured.get("choice"):
        return text in structured["choice"]
    if structured.get("regex") is not None:
        import re

        return re.fullmatch(structured["regex"], text) is not None
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _overrides(value: Any) -> dict[str, Any]:
    """A row's sampling overrides: a struct (dict) or a JSON object string; nulls ignored."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"expected an object of sampling fields, got {type(value).__name__}")
    return {k: v for k, v in value.items() if v is not None}


def _cpu_threads(wanted: int | None) -> None:
    """Narrow the cores the CPU engine's worker computes on to the first ``wanted``.

    vLLM binds its CPU worker's OpenMP threads itself (``VLLM_CPU_OMP_THREADS_BIND``,
    by default one thread per core but one, which it keeps for its scheduler process)
    and gives the worker a matching OMP_NUM_THREADS. Nothing else is touched: the
    OMP_NUM_THREADS Ray gives this actor (one) is what the engine's scheduler process
    uses for torch, and more threads there would spin after each op and take cycles from
    the worker (vLLM warns of it at start).
    """
    if wanted:
        cores = sorted(os.sched_getaffinity(0))[:wanted]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))


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
    spawned with. The engine core and its worker take turns on every step (one
    schedules while the other spins waiting) and a step of a small model lasts a few
    milliseconds, so each time the front end (handing rows over, collecting outputs,
    Ray's own threads) takes a core from one of them the whole step waits. At the
    lowest priority it runs in the gaps their spinning yields; its queue of requests
    is deep enough that the engine does not wait for it. Raising a niceness needs no
    privilege. Measured on 2 cores: see the README's performance section.
    """
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that has just ended
                if os.getpriority(os.PRIO_PROCESS, int(tid)) < niceness:
                    os.setpriority(os.PRIO_PROCESS, int(tid), niceness)


def _whereabouts() -> dict[str, Any]:
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


class EngineStage:
    """``map_batches`` callable class: one vLLM engine per actor.

    Arguments are plain dicts (the job spec's ``model``, ``sampling`` and
    ``metrics`` blocks), so they pickle cheaply into the actor. In a
    multi-model job each model's stage appends its own prefixed columns; the
    last one drops the internal columns (``drop``) before the rows are written.
    """

    def __init__(
        self,
        model: dict[str, Any],
        sampling: dict[str, Any],
        *,
        model_name: str | None = None,
        progress: Any = None,
        metrics: dict[str, Any] | None = None,
        drop: list[str] | tuple[str, ...] = (),
    ):
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

        self._model_name = model_name
        self._progress = progress
        self._max_retries = int(model["max_batch_retries"])
        replicas = model["replicas"]
        most = replicas["max"] if isinstance(replicas, dict) else replicas
        self._restart_limit = BatchLedger.restart_limit(
            most, self._max_retries, model["max_batches_in_flight"]
        )
        self._gate = _BatchGate()
        self._watchdog: asyncio.Future[None] | None = None
        self._sampling_spec = sampling
        self._sampling = build_sampling_params(sampling)
        self._params_cache: dict[tuple[str, int], Any] = {}
        self._drop = list(drop)
        metrics = metrics or {}
        structured = sampling.get("structured") or {}
        self._label_column = metrics.get("label_column")
        self._accumulators = AccumulatorSet(
            JobContext(
                label_column=self._label_column,
                choices=tuple(structured["choice"]) if structured.get("choice") else None,
            ),
            metrics.get("accumulators") or (),
        )
        self._schema = output_schema(model_name, sampling)
        # The same columns without the model prefix: what accumulators read.
        self._plain_names = [c for c, _ in output_schema(None, sampling)]
        self._parsed_type = (
            arrow_type_for_schema(structured["json_schema"]) if structured.get("parse") else None
        )
        self._want_logprobs = sampling.get("logprobs") is not None
        args = build_engine_args(model, on_cpu=current_platform.is_cpu())
        if current_platform.is_cpu():
            _cpu_threads(model["engine"].get("cpu_threads"))
        _exit_with_parent()
        started = time.monotonic()
        self._load = EngineLoad()
        try:
            self._engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**args),
                stat_loggers=[self._load.stat_logger()],
                # vLLM sizes its batches by who asks: an API server gets small ones
                # for latency (on the CPU engine 128 sequences, 2048 tokens a step),
                # offline `LLM` large ones for throughput (256, 4096). We are offline.
                usage_context=UsageContext.LLM_CLASS,
            )
        except Exception as e:
            # Ray wraps this in an ActorDiedError; run_job digs the message back out.
            raise EngineUnavailable(
                f"the engine for {model['path']!r} failed to start: {engine_failure(e)}"
            ) from e
        self._tokenizer = self._engine.get_tokenizer()
        # The engine's own tokenizing settings (special tokens, the over-long cut-off),
        # applied to a whole batch at once: see _token_ids.
        self._tok_params = self._engine.renderer.default_cmpl_tok_params
        self._parse_prompt = parse_model_prompt
        # vLLM reads its settings from the environment on every request unless told they
        # are final, as its API server and engine core do once they are up.
        import vllm.envs

        vllm.envs.enable_envs_cache()
        self._where = _whereabouts()
        if current_platform.is_cpu():
            _yield_to_engine()
        atexit.register(_closing)  # after vLLM's own exit handlers, so it runs before them
        if self._progress is not None:
            self._progress.engine_started.remote(model_name)
        logger.info("engine for %s ready in %.1fs", model["path"], time.monotonic() - started)

    def __del__(self) -> None:
        # End the engine's core process with the actor instead of orphaning it.
        _closing()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):  # at interpreter exit, modules are gone
                engine.shutdown()

    def _params(self, overrides: Any, sample_index: int) -> Any:
        """Sampling params for a row; raises ValueError naming a bad override."""
        if overrides is None and sample_index == 0:
            return self._sampling
        key = (json.dumps(overrides, sort_keys=True, default=str), sample_index)
        params = self._params_cache.get(key)
        if params is None:
            from llm_batch.job.spec import SamplingSpec

            changes = _overrides(overrides)
            unknown = sorted(set(changes) - set(_SAMPLING_KEYS))
            if unknown:
                raise ValueError(
                    f"unknown sampling override {', '.join(unknown)} "
                    f"(allowed: {', '.join(_SAMPLING_KEYS)})"
                )
            merged = SamplingSpec.model_validate({**self._sampling_spec, **changes}).model_dump()
            params = build_sampling_params(merged, sample_index=sample_index)
            if len(self._params_cache) < 10_000:
                self._params_cache[key] = params
        return params

    async def _generate_one(self, prompt: Any, params: Any) -> tuple[Any, ...]:
        """(text, input tokens, output tokens, finish reason, error, output, latency) of a row."""
        final = None
        started = time.monotonic()
        try:
            async for out in self._engine.generate(prompt, params, uuid.uuid4().hex):
                final = out
        except Exception as e:  # noqa: BLE001 - a row's failure is data, not a crash
            if self._engine.errored:
                _engine_died(e)
            cause = e.__cause__ if e.__cause__ is not None else e
            return None, None, None, None, f"{type(cause).__name__}: {cause}", None, None
        assert final is not None
        completion = final.outputs[0]
        return (
            completion.text,
            len(final.prompt_token_ids or ()),
            len(completion.token_ids),
            completion.finish_reason,
            None,
            completion,
            time.monotonic() - started,
        )

    def _token_ids(self, prompts: list[str | None]) -> list[Any]:
        """Each text prompt's token ids, or the exception that refused it (None: no prompt).

        Tokenized in one call per batch with the settings the engine itself would use,
        so the engine gets ids and skips its own tokenizing, which it does one request
        at a time in the actor's front end: py-spy had that at a third of the front
        end's busy time, taken from the engine on a machine where they share cores.
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
        self, ids: Any, text: str | None, messages: list[dict[str, str]] | None
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
                    messages, tokenize=True, add_generation_prompt=True, return_dict=False
                )
            except Exception as e:
                raise _RowError(f"chat template failed: {type(e).__name__}: {e}") from e
        elif isinstance(ids, Exception):
            raise ids
        # With its text, as vLLM's own rendering of a text prompt keeps it.
        prompt = {"prompt_token_ids": list(ids)} | ({"prompt": text} if text is not None else {})
        parsed = self._parse_prompt(self._engine.model_config, prompt)
        (engine_input,) = self._engine.renderer.render_cmpl([parsed], self._tok_params)
        return engine_input

    def _logprobs(self, completion: Any, k: int) -> list[dict[str, Any]] | None:
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
                    "top_logprobs": [
                        {"token": lp.decoded_token, "logprob": lp.logprob} for lp in top
                    ],
                }
            )
        return steps

    def _parse(self, text: str | None, finish: str | None) -> tuple[Any, str | None]:
        if text is None:
            return None, None
        try:
            return coerce(json.loads(text), self._parsed_type), None
        except (ValueError, TypeError) as e:
            hint = (
                " (the generation was cut at max_tokens; raise sampling.max_tokens)"
                if (finish == "length")
                else ""
            )
            return None, f"output does not parse as the schema: {e}{hint}"

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        started = time.monotonic()
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(_watch_engine(weakref.ref(self)))
        key = self._batch_key(batch)
        decision: dict[str, Any] = {}
        if key is not None:
            decision = await self._progress.begin_batch.remote(
                key,
                model=self._model_name,
                max_retries=self._max_retries,
                restart_limit=self._restart_limit,
            )
        if decision.get("broken"):
            raise EngineUnavailable(f"model {self._model_name or 'default'}: {decision['broken']}")
        if decision.get("give_up"):
            reason = decision["give_up"]
            logger.warning("%s: %d rows", reason, batch.num_rows)
            # Rows that never reached the engine keep their own error.
            errors = batch.column(columns.RENDER_ERROR).to_pylist()
            failed = [(None, None, None, None, e or reason, None, None) for e in errors]
            yield self._finish(batch, failed, started, key, given_up=True)
            return
        # A batch that was in the engine when it died may be what killed it: its retry runs
        # with nothing beside it, so another death is charged to it alone.
        alone = bool(decision.get("alone"))
        async with self._gate.hold(exclusive=alone):
            if key is not None:
                self._progress.enter_batch.remote(key, alone=alone)
            results = await self._generate_batch(batch)
        yield self._finish(batch, results, started, key)

    def _batch_key(self, batch: pa.Table) -> str | None:
        """The batch's key in the tracker's ledger (None without a tracker to count on)."""
        if self._progress is None or columns.ROW_ID not in batch.column_names:
            return None
        # Row ids are stable across retries (and unique but for a prompt's n samples).
        ids = batch.column(columns.ROW_ID).to_numpy()
        digest = hashlib.blake2b(ids.tobytes(), digest_size=12)
        digest.update(str(self._model_name).encode())
        return digest.hexdigest()

    async def _generate_batch(self, batch: pa.Table) -> list[tuple[Any, ...]]:
        n = batch.num_rows
        names = batch.column_names
        render_errors = batch.column(columns.RENDER_ERROR).to_pylist()
        prompts = (
            batch.column(columns.PROMPT).to_pylist() if columns.PROMPT in names else [None] * n
        )
        messages = (
            batch.column(columns.MESSAGES).to_pylist() if columns.MESSAGES in names else [None] * n
        )
        samples = (
            batch.column(columns.SAMPLE_INDEX).to_pylist()
            if columns.SAMPLE_INDEX in names
            else [0] * n
        )
        override_col = self._sampling_spec.get("overrides_column")
        overrides = batch.column(override_col).to_pylist() if override_col else [None] * n
        token_ids = self._token_ids(
            [p if e is None else None for p, e in zip(prompts, render_errors, strict=True)]
        )

        async def row(i: int) -> tuple[Any, ...]:
            if render_errors[i] is not None:
                return None, None, None, None, render_errors[i], None, None
            try:
                params = self._params(overrides[i], samples[i])
            except Exception as e:  # noqa: BLE001
                msg = (
                    str(e).splitlines()[0]
                    if not hasattr(e, "errors")
                    else "; ".join(
                        f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
                    )
                )
                return (
                    None,
                    None,
                    None,
                    None,
                    f"sampling override ({override_col}): {msg}",
                    None,
                    None,
                )
            try:
                prompt = self._engine_prompt(token_ids[i], prompts[i], messages[i])
            except Exception as e:  # noqa: BLE001 - the engine's own words, as from generate
                msg = str(e) if isinstance(e, _RowError) else f"{type(e).__name__}: {e}"
                return None, None, None, None, msg, None, None
            return await self._generate_one(prompt, params)

        return await asyncio.gather(*(row(i) for i in range(n)))

    def _finish(
        self,
        batch: pa.Table,
        results: list[tuple[Any, ...]],
        started: float,
        key: str | None,
        *,
        given_up: bool = False,
    ) -> pa.Table:
        """Append this model's columns to the batch and report it to the tracker."""
        n = batch.num_rows
        names = batch.column_names
        texts = [r[0] for r in results]
        finishes = [r[3] for r in results]
        errors = [r[4] for r in results]
        structured = self._sampling_spec.get("structured")
        if structured:
            for i in range(n):
                if (
                    errors[i] is None
                    and finishes[i] == "length"
                    and not structured_complete(texts[i], structured)
                ):
                    # The cut text stays in generated_text for inspection; the row is an
                    # error row, never a prediction.
                    errors[i] = (
                        f"structured output cut at max_tokens after {results[i][2]} tokens, "
                        "before it was complete; raise sampling.max_tokens"
                    )
        values: list[list[Any]] = [
            texts,
            [r[1] for r in results],
            [r[2] for r in results],
            finishes,
            errors,
        ]
        if self._parsed_type is not None:
            parsed = []
            for i in range(n):
                value, problem = self._parse(texts[i], finishes[i])
                parsed.append(value)
                if problem is not None and errors[i] is None:
                    errors[i] = problem
            values.append(parsed)
        if self._want_logprobs:
            k = self._sampling_spec["logprobs"]
            values.append([self._logprobs(r[5], k) for r in results])

        out = batch.drop_columns([c for c in self._drop if c in names])
        arrays = [pa.array(v, type=t) for (_, t), v in zip(self._schema, values, strict=True)]
        for (name, _), arr in zip(self._schema, arrays, strict=True):
            out = out.append_column(name, arr)

        if self._progress is not None:
            view = pa.Table.from_arrays(arrays, names=self._plain_names)
            if self._label_column is not None:
                view = view.append_column(self._label_column, batch.column(self._label_column))
            partial = self._accumulators.update(
                BatchView(view, pa.array([r[6] for r in results], pa.float64()), self._model_name)
            )
            self._progress.report.remote(
                model=self._model_name,
                engine={**self._where, **self._load.take()},
                rows=n,
                failed=sum(1 for e in errors if e is not None),
                input_tokens=sum(r[1] or 0 for r in results),
                output_tokens=sum(r[2] or 0 for r in results),
                seconds=time.monotonic() - started,
                metrics=partial,
                batch_key=key,
                given_up=given_up,
            )
        return out


_CLOSING = False


def _closing() -> None:
    """The actor is ending on purpose: an engine that stops now is not a death."""
    global _CLOSING
    _CLOSING = True


async def _watch_engine(stage: weakref.ref[EngineStage]) -> None:
    """End the actor once its engine is dead. A request sent to an engine that has just
    died can wait forever instead of failing, so its failure alone cannot be relied on.
    Holds the stage weakly, so that releasing the stage still shuts its engine down."""
    while True:
        await asyncio.sleep(1.0)
        current = stage()
        if current is None or _CLOSING:
            return
        dead = current._engine.errored
        del current
        if dead and not _CLOSING:
            _engine_died(RuntimeError("the engine core process is gone"))


def _engine_died(cause: BaseException) -> None:
    """End this actor when its engine is dead: Ray restarts it with a new engine and retries
    its in-flight batches. Raising instead would fail the batch as an application error,
    which Ray does not retry, and leave an actor with no engine taking more batches."""
    logger.error(
        "the engine died (%s: %s); ending the actor for Ray to restart it",
        type(cause).__name__,
        cause,
    )
    logging.shutdown()
    os._exit(1)


class _RowError(Exception):
    """A row's failure whose message is complete as it is."""


class _BatchGate:
    """Batches share the engine; an exclusive holder (a retried batch) runs alone."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._cond: asyncio.Condition | None = None  # made in the actor's event loop

    @contextlib.asynccontextmanager
    async def hold(self, *, exclusive: bool) -> AsyncIterator[None]:
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        async with cond:
            if exclusive:
                self._waiting_exclusive += 1
                try:
                    await cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                finally:
                    self._waiting_exclusive -= 1
                    cond.notify_all()  # shared waiters may go on if this one was cancelled
                self._exclusive = True
            else:
                await cond.wait_for(lambda: not self._exclusive and self._waiting_exclusive == 0)
                self._shared += 1
        try:
            yield
        finally:
            async with cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                cond.notify_all()
