"""Fixtures of the service tests.

``service``: one real service for the session's end-to-end service tests
(``db_url``, ``reviews`` and ``job_body`` are ``tests/conftest.py``'s).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """ONE real service for the session's end-to-end service tests: ``llm-batch serve`` as a
    subprocess on a free loopback port, its own data folder, its own local Ray head on free
    ports, and the tiny model offered as ``tiny`` (its models file), with two LoRA adapters
    ``tiny-fr`` and ``tiny-de``, and as ``tiny-embed`` (task embed); an engine starts only
    for a job that uses it. At the end the service
    and the head are stopped, with every process that worked for the head (workers, vLLM
    engine cores), orphaned or not."""
    import psutil

    from llm_batch.models.tiny import write_tiny_adapter
    from llm_batch.service.process import ServiceProcess

    folder = tmp_path_factory.mktemp("service")
    adapters = {
        name: write_tiny_adapter(tiny_model, folder / "adapters" / name, seed=seed)
        for name, seed in (("fr", 1), ("de", 2))
    }
    models = folder / "models.yaml"
    models.write_text(
        f"tiny:\n  path: {tiny_model}\n"
        f"  adapters: {{tiny-fr: {adapters['fr']}, tiny-de: {adapters['de']}}}\n"
        "  engine: {max_model_len: 2048, enforce_eager: true, dtype: bfloat16}\n"
        f"tiny-embed:\n  path: {tiny_model}\n  task: embed\n"
        "  engine: {max_model_len: 2048, enforce_eager: true, dtype: bfloat16}\n"
    )
    svc = ServiceProcess(
        folder / "data",
        env={
            "VLLM_LOGGING_LEVEL": "WARNING",
            "LLM_BATCH_MODELS": str(models),
            # The tests' inputs, outputs and models live in pytest's temporary folders.
            "LLM_BATCH_STORAGE_ROOTS": str(tmp_path_factory.getbasetemp()),
        },
    )
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()
        leftover = svc.ray_head.processes()
        svc.stop_ray()
        for proc in leftover:  # whatever outlived the head's own shutdown
            with contextlib.suppress(psutil.Error):
                proc.kill()
