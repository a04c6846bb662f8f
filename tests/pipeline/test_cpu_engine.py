"""How a CPU engine is laid out, from vLLM's own config for the tiny model (no engine is
started): with one device the model runs in the engine-core process, with the OpenMP
threads vLLM's mp executor would give a worker; an executor the job asks for is kept.
Why and what it changed: docs/decisions/0019-cpu-engine-in-one-process.md."""

from __future__ import annotations

import os

import pytest

from llm_batch.pipeline.generation import _engine_config

# What vLLM binds OpenMP with: GNU's (the libgomp it preloads), Intel's or any other.
BIND_KEYS = ("GOMP_CPU_AFFINITY", "KMP_AFFINITY", "OMP_PLACES")
OMP_KEYS = ("OMP_NUM_THREADS", *BIND_KEYS, "VLLM_ENABLE_V1_MULTIPROCESSING")


@pytest.fixture
def cpu_only(monkeypatch):
    vllm = pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the CPU engine's layout; vLLM runs on a GPU here")
    # The cores the engine computes on, as Generator sets them from model.engine.cpu_threads.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return vllm


def engine_args(model, **kw):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=str(model), dtype="bfloat16", enforce_eager=True, max_model_len=128, **kw
    )


def test_one_device_runs_the_model_in_the_engine_core_with_the_workers_threads(
    cpu_only, tiny_model
):
    from vllm.usage.usage_lib import UsageContext

    before = {k: os.environ.get(k) for k in OMP_KEYS}
    config, core_env = _engine_config(engine_args(tiny_model), UsageContext.LLM_CLASS, on_cpu=True)
    assert config.parallel_config.distributed_executor_backend == "uni"
    # The switch vLLM reads while the config is made is not left on for anything else.
    assert {k: os.environ.get(k) for k in OMP_KEYS} == before
    with core_env:  # what the engine-core process is spawned with
        assert os.environ["OMP_NUM_THREADS"] == "1"
        bound = {k: os.environ[k] for k in BIND_KEYS if k in os.environ}
        assert bound in (
            {"GOMP_CPU_AFFINITY": "0"},
            {"KMP_AFFINITY": "granularity=fine,explicit,proclist=[0]"},
            {"OMP_PLACES": "{0}"},
        ), bound
    assert {k: os.environ.get(k) for k in OMP_KEYS} == before


def test_an_executor_the_job_asks_for_is_kept(cpu_only, tiny_model):
    from vllm.usage.usage_lib import UsageContext

    args = engine_args(tiny_model, distributed_executor_backend="mp")
    config, core_env = _engine_config(args, UsageContext.LLM_CLASS, on_cpu=True)
    assert config.parallel_config.distributed_executor_backend == "mp"
    before = {k: os.environ.get(k) for k in OMP_KEYS}
    with core_env:
        assert {k: os.environ.get(k) for k in OMP_KEYS} == before


def test_a_split_engine_keeps_vllms_executor(cpu_only, tiny_model):
    from vllm.usage.usage_lib import UsageContext

    args = engine_args(tiny_model, pipeline_parallel_size=2)
    config, _ = _engine_config(args, UsageContext.LLM_CLASS, on_cpu=True)
    assert config.parallel_config.distributed_executor_backend == "mp"
