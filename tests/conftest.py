"""Shared fixtures. Engines are slow to start (tens of seconds), so everything
that needs one shares it per session: one tiny model, one local Ray, one
reference vLLM engine for the outputs every pipeline result is checked against.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before Ray starts so engine actors inherit them.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llm_batch.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-seed0", seed=0)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    from llm_batch.pipeline.run import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def reference(tiny_model: Path):  # noqa: ANN201
    """``generate(prompts, max_tokens) -> texts`` with plain ``vllm.LLM.generate``, greedy."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(tiny_model),
        max_model_len=512,
        dtype="bfloat16",
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        seed=0,
    )

    def generate(prompts: list[str], max_tokens: int) -> list[str]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    yield generate
    llm.llm_engine.engine_core.shutdown()
