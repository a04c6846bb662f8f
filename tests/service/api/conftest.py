"""The API on a real database through FastAPI's TestClient; the scheduler is off (jobs stay
queued), so no Ray is needed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llm_batch.service.app import create_app
from llm_batch.service.process import free_port
from llm_batch.service.settings import Settings


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    # A dashboard port nothing listens on: Ray is "unreachable" for /readyz. The test's
    # folder is a storage root: the inputs the tests write live there.
    return Settings(
        data_dir=tmp_path / "data",
        db=db_url,
        ray_dashboard_port=free_port(),
        storage_roots=str(tmp_path),
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_scheduler=False)) as c:
        yield c
