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
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa

from llm_batch import columns
from llm_batch.errors import EngineUnavailable

__all__ = ["EngineStage", "build_engine_args", "build_sampling_params", "output_schema"]

logger = logging.getLogger(__name__)

_GIB = 1 << 30


def output_schema(model_name: str | None) -> list[tuple[str, pa.DataType]]:
    """The columns one model appends, in order."""
    types = {
        columns.GENERATED_TEXT: pa.string(),
        columns.NUM_INPUT_TOKENS: pa.int32(),
        columns.NUM_OUTPUT_TOKENS: pa.int32(),
        columns.FINISH_REASON: pa.string(),
        columns.ERROR: pa.string(),
    }
    return [(columns.model_column(model_name, c), t) for c, t in types.items()]


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
        # Stats cost a little per step and nobody reads vLLM's own logger here.
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


def build_sampling_params(sampling: dict[str, Any]) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=sampling["max_tokens"],
        temperature=sampling["temperature"],
        top_p=sampling["top_p"],
        seed=sampling.get("seed"),
        stop=sampling.get("stop"),
        ignore_eos=sampling.get("ignore_eos", False),
        # Only the final output of each request crosses back from the engine.
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


class EngineStage:
    """``map_batches`` callable class: one vLLM engine per actor.

    Arguments are plain dicts (the job spec's ``model`` and ``sampling``
    blocks), so they pickle cheaply into the actor.
    """

    def __init__(
        self,
        model: dict[str, Any],
        sampling: dict[str, Any],
        *,
        model_name: str | None = None,
        progress: Any = None,
    ):
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:  # pragma: no cover - depends on the install
            raise EngineUnavailable(
                f"vLLM is not installed ({e}); install the engine extra: "
                "pip install 'llm_batch[cpu]' (no GPU) or 'llm_batch[gpu]' (CUDA)"
            ) from e

        self._model_name = model_name
        self._progress = progress
        self._sampling = build_sampling_params(sampling)
        args = build_engine_args(model, on_cpu=current_platform.is_cpu())
        started = time.monotonic()
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self._tokenizer = self._engine.get_tokenizer()
        logger.info("engine for %s ready in %.1fs", model["path"], time.monotonic() - started)
        self._schema = output_schema(model_name)

    def __del__(self) -> None:
        # End the engine's core process with the actor instead of orphaning it.
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()

    async def _generate_one(self, prompt: Any) -> tuple[Any, ...]:
        """(text, input tokens, output tokens, finish reason, error) for one row."""
        final = None
        try:
            async for out in self._engine.generate(prompt, self._sampling, uuid.uuid4().hex):
                final = out
        except Exception as e:  # noqa: BLE001 - a row's failure is data, not a crash
            if self._engine.errored:
                raise  # the engine itself died: let Ray retry the batch elsewhere
            cause = e.__cause__ if e.__cause__ is not None else e
            return None, None, None, None, f"{type(cause).__name__}: {cause}"
        assert final is not None
        completion = final.outputs[0]
        return (
            completion.text,
            len(final.prompt_token_ids or ()),
            len(completion.token_ids),
            completion.finish_reason,
            None,
        )

    def _engine_prompt(self, prompt: str | None, messages: list[dict[str, str]] | None) -> Any:
        if messages is not None:
            # The model's own chat template, tokenized once here; the engine gets ids.
            ids = self._tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=False
            )
            return {"prompt_token_ids": list(ids)}
        return {"prompt": prompt}

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        started = time.monotonic()
        n = batch.num_rows
        render_errors = batch.column(columns.RENDER_ERROR).to_pylist()
        if columns.PROMPT in batch.column_names:
            prompts = batch.column(columns.PROMPT).to_pylist()
            messages: list[Any] = [None] * n
        else:
            prompts = [None] * n
            messages = batch.column(columns.MESSAGES).to_pylist()

        async def row(i: int) -> tuple[Any, ...]:
            if render_errors[i] is not None:
                return None, None, None, None, render_errors[i]
            try:
                prompt = self._engine_prompt(prompts[i], messages[i])
            except Exception as e:  # noqa: BLE001
                return None, None, None, None, f"chat template failed: {type(e).__name__}: {e}"
            return await self._generate_one(prompt)

        results = await asyncio.gather(*(row(i) for i in range(n)))
        fields = list(zip(*results, strict=True)) if results else [()] * len(self._schema)
        internal = [c for c in batch.column_names if c.startswith(columns.INTERNAL_PREFIX)]
        out = batch.drop_columns(
            [c for c in internal if c in (columns.PROMPT, columns.MESSAGES, columns.RENDER_ERROR)]
        )
        for (name, type_), values in zip(self._schema, fields, strict=True):
            out = out.append_column(name, pa.array(values, type=type_))
        if self._progress is not None:
            failed = sum(1 for r in results if r[4] is not None)
            self._progress.report.remote(
                model=self._model_name,
                rows=n,
                failed=failed,
                input_tokens=sum(r[1] or 0 for r in results),
                output_tokens=sum(r[2] or 0 for r in results),
                seconds=time.monotonic() - started,
            )
        yield out
