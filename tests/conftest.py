"""Shared fixtures. Engines are slow to start (tens of seconds), so everything
that needs one shares it per session: one tiny model, one local Ray. The reference vLLM
engines every pipeline result is checked against are tests/pipeline's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Set before Ray starts so engine actors inherit them.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def _own_response_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("response-cache")
    before = os.environ.get("LLM_BATCH_CACHE_DIR")
    os.environ["LLM_BATCH_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("LLM_BATCH_CACHE_DIR", None)
    else:
        os.environ["LLM_BATCH_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def response_cache_of_its_own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test's jobs keep their response cache (on, as for users) in a folder of the
    test's own: a test never takes another test's outputs for its engine's. Read when a job
    starts, in the test's process or in a CLI it runs."""
    yield from _own_response_cache(tmp_path_factory)


@pytest.fixture(autouse=True, scope="module")
def module_response_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The same for a module's shared fixtures (a job run once for its tests), which run
    before any test's own: never the user's cache folder, never another module's."""
    yield from _own_response_cache(tmp_path_factory)


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
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model (another seed): same tokenizer, different weights."""
    from llm_batch.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-seed1", seed=1)


# -- the service's (tests/service, tests/cli) ------------------------------------------

# ``db_url`` runs a test on SQLite, and again on PostgreSQL when
# ``LLM_BATCH_TEST_POSTGRES_URL`` names a database (``.ci/run`` starts one); the
# PostgreSQL run starts from empty tables.
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
