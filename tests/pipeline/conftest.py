"""The pipeline's tests' own fixtures: plain vLLM engines to check results against."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="package")
def reference_engines():  # noqa: ANN201
    """``engine(model_path, **engine_args) -> vllm.LLM``: plain vLLM engines, one per model
    and arguments (``runner="pooling", convert="embed"``, say), made on first use.

    At most two stay up, the least recently asked for shut down first, each with a small
    KV cache, and all end with this package: an engine holds gigabytes, which the service
    tests that run later need (CI saw the node's memory run out with five held)."""
    from collections import OrderedDict

    from vllm import LLM

    keep = 2
    engines: OrderedDict[str, LLM] = OrderedDict()

    def get(path: Path, **args: str) -> LLM:
        key = f"{path} {sorted(args.items())}"
        if key in engines:
            engines.move_to_end(key)
            return engines[key]
        while len(engines) >= keep:
            _, oldest = engines.popitem(last=False)
            oldest.llm_engine.engine_core.shutdown()
        engines[key] = LLM(
            model=str(path),
            max_model_len=512,
            dtype="bfloat16",
            enforce_eager=True,
            kv_cache_memory_bytes=256 << 20,
            seed=0,
            **args,
        )
        return engines[key]

    yield get
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="package")
def reference(tiny_model: Path, reference_engines):  # noqa: ANN201
    """``generate(prompts, max_tokens) -> texts`` with plain ``vllm.LLM.generate``, greedy."""
    from vllm import SamplingParams

    def generate(prompts: list[str], max_tokens: int) -> list[str]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        llm = reference_engines(tiny_model)  # asked each time: it may have been shut down
        return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    return generate
