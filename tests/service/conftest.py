"""Fixtures of the service tests.

``db_url`` runs a test on SQLite, and again on PostgreSQL when
``LLM_BATCH_TEST_POSTGRES_URL`` names a database (``.ci/run`` starts one); the
PostgreSQL run starts from empty tables.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

POSTGRES_ENV = "LLM_BATCH_TEST_POSTGRES_URL"


_DATABASES = ["sqlite"] + (["postgresql"] if os.environ.get(POSTGRES_ENV) else [])


@pytest.fixture(params=_DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    url = os.environ[POSTGRES_ENV]
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        for table in ("jobs", "batches", "files"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
    yield url


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    """A small Parquet input with columns id and text."""
    path = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["great", "awful", "fine"]}), path)
    return path


@pytest.fixture
def job_body(reviews: Path) -> dict:
    """A valid job as the REST API takes it (the model is a hub id: never loaded here)."""
    return {
        "name": "reviews",
        "input": {"path": str(reviews)},
        "prompt": {"template": "Review: {{ text }}\nSentiment:"},
        "model": {"path": "tiny-hub-id", "engine": {"max_model_len": 256}},
        "sampling": {"max_tokens": 4},
        "carryover": ["id"],
    }


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """ONE real service for the session's end-to-end service tests: ``llm-batch serve`` as a
    subprocess on a free loopback port, its own data folder, its own local Ray head on free
    ports, and the tiny model offered as ``tiny`` (its models file). At the end the service
    and the head are stopped, with every process that worked for the head (workers, vLLM
    engine cores), orphaned or not."""
    import psutil

    from llm_batch.service.process import ServiceProcess

    folder = tmp_path_factory.mktemp("service")
    models = folder / "models.yaml"
    models.write_text(
        f"tiny:\n  path: {tiny_model}\n"
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
