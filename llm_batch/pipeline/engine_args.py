"""What vLLM is given: engine arguments from a job's ``model`` block, sampling parameters
per row (with its overrides and sample index), and the one line an engine that did not
start reports."""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "SAMPLING_KEYS",
    "SamplingParamsCache",
    "build_engine_args",
    "build_pooling_params",
    "build_sampling_params",
    "engine_failure",
    "is_classifier",
    "row_overrides",
]

_GIB = 1 << 30

# Sampling fields passed to vLLM as they are, under its own names.
_PASSED = (
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "logit_bias",
    "bad_words",
    "include_stop_str_in_output",
    "skip_special_tokens",
)
# The sampling fields a row may override (``sampling.overrides_column``).
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos", *_PASSED)


def build_engine_args(
    model: dict[str, Any], *, on_cpu: bool, shared: bool = False
) -> dict[str, Any]:
    """vLLM ``EngineArgs`` keyword arguments from a job's ``model`` block. ``shared``: the
    engine serves several jobs (a pool of the service), which vLLM's priority scheduling
    shares (``pool.py``)."""
    engine = model["engine"]
    args: dict[str, Any] = {
        "model": model["path"],
        "dtype": engine["dtype"],
        "enforce_eager": engine["enforce_eager"],
        "tensor_parallel_size": engine["tensor_parallel_size"],
        "pipeline_parallel_size": engine["pipeline_parallel_size"],
        "seed": engine["seed"],
        # No periodic stats lines in the job's log. The engine gets its own stat logger
        # (generation.EngineLoad), which turns the engine's stats collection on regardless.
        "disable_log_stats": True,
    }
    if shared:
        args["scheduling_policy"] = "priority"
    task = model.get("task") or "generate"
    if task == "generate":
        # vLLM's default for generation, said here: rows grouped by prompt prefix
        # (run.group_by_prefix) reach the engine together for its prefix cache to serve.
        args["enable_prefix_caching"] = True
    else:
        # vLLM's pooling runner; a causal LM is converted into an embedder or a classifier
        # (a checkpoint that is one already is taken as it is: convert "auto").
        args["runner"] = "pooling"
        args["convert"] = "classify" if task == "classify" else "embed"
        if task in ("classify", "score") and is_classifier(model["path"]):
            args["convert"] = "auto"
        pooling = model.get("pooling") or {}
        if pooling.get("pooling_type"):
            args["pooler_config"] = {"pooling_type": pooling["pooling_type"]}
    if model.get("lora"):
        # A pool of the service serves whichever adapters of its base its jobs bring: room
        # for several, of up to rank 64 (a job-local engine is sized to its job's adapters,
        # run.lora_limits, through extra_args).
        args.update(enable_lora=True, max_loras=4, max_lora_rank=lora_rank_limit(model["lora"]))
    if model.get("reasoning_parser"):
        # Structured outputs then constrain the answer, after the reasoning ends.
        args["reasoning_parser"] = model["reasoning_parser"]
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


# The ranks vLLM's max_lora_rank takes.
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(path: str) -> int | None:
    """A local LoRA adapter's rank (its adapter_config.json's ``r``), None if unreadable."""
    import os

    try:
        with open(os.path.join(os.path.expanduser(path), "adapter_config.json")) as f:
            return int(json.load(f)["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lora_rank_limit(*paths: str, floor: int = 64) -> int:
    """The ``max_lora_rank`` that holds these adapters: their largest rank (at least
    ``floor``; an adapter whose rank cannot be read counts as ``floor``), rounded up to a
    rank vLLM takes."""
    wanted = max([floor, *(adapter_rank(p) or floor for p in paths)])
    return next((r for r in _LORA_RANKS if r >= wanted), _LORA_RANKS[-1])


def is_classifier(path: str) -> bool:
    """A local checkpoint whose architecture is a sequence classifier already."""
    import os

    try:
        with open(os.path.join(os.path.expanduser(path), "config.json")) as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def build_pooling_params(model: dict[str, Any]) -> Any:
    """vLLM ``PoolingParams`` for a pooling model's requests (``model.pooling``)."""
    from vllm import PoolingParams

    pooling = model.get("pooling") or {}
    if model["task"] == "classify":
        return PoolingParams(task="classify")
    # Embeddings (also both sides of a score's pair): vLLM normalizes them by default.
    return PoolingParams(
        task="embed", dimensions=pooling.get("dimensions"), use_activation=pooling.get("normalize")
    )


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
        # vLLM's own fields, under its own names (a job spec made before them has none).
        **{k: sampling[k] for k in _PASSED if sampling.get(k) is not None},
        # Only the final output of each request crosses back from the engine.
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def row_overrides(value: Any) -> dict[str, Any]:
    """A row's sampling overrides: a struct (dict) or a JSON object string; nulls ignored."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"expected an object of sampling fields, got {type(value).__name__}")
    out = {k: v for k, v in value.items() if v is not None}
    if isinstance(out.get("logit_bias"), list):  # an Arrow map reads as (key, value) pairs
        out["logit_bias"] = dict(out["logit_bias"])
    return out


class SamplingParamsCache:
    """Sampling params per row of one job: the job's own, or its merge with the row's
    overrides and sample index (validated as the job's sampling block is), cached."""

    def __init__(self, sampling: dict[str, Any], *, limit: int = 10_000):
        self.sampling = sampling
        self._default = build_sampling_params(sampling)
        self._cache: dict[tuple[str, int], Any] = {}
        self._limit = limit

    def get(self, overrides: Any, sample_index: int) -> Any:
        """Raises ValueError (or pydantic's ValidationError) naming a bad override."""
        if overrides is None and sample_index == 0:
            return self._default
        key = (json.dumps(overrides, sort_keys=True, default=str), sample_index)
        params = self._cache.get(key)
        if params is None:
            from llm_batch.job.spec import SamplingSpec

            changes = row_overrides(overrides)
            unknown = sorted(set(changes) - set(SAMPLING_KEYS))
            if unknown:
                raise ValueError(
                    f"unknown sampling override {', '.join(unknown)} "
                    f"(allowed: {', '.join(SAMPLING_KEYS)})"
                )
            merged = SamplingSpec.model_validate({**self.sampling, **changes}).model_dump()
            params = build_sampling_params(merged, sample_index=sample_index)
            if len(self._cache) < self._limit:
                self._cache[key] = params
        return params


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
