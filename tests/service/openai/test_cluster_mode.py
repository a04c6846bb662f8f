"""OpenAI batches in cluster mode: their files live in the service's data directory, which
the settings must declare shared (the service does not start otherwise,
``tests/service/test_cluster_storage.py``); then a batch runs as usual."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_batch.service.process import free_port
from llm_batch.service.settings import Settings

from .conftest import batch_jobs, chat_line, submit


@pytest.fixture
def settings(tmp_path: Path, db_url: str, models_file: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "shared" / "data",
        db=db_url,
        models=models_file,
        ray_address=f"http://127.0.0.1:{free_port()}",  # never contacted: the scheduler is off
        shared_roots=str(tmp_path / "shared"),
    )


def test_a_batch_runs_from_the_shared_data_dir(app, client, runner, settings):
    assert settings.cluster_mode
    batch = submit(client, [chat_line("a"), chat_line("b", "How are you?")])
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "in_progress", batch.errors
    (job,) = batch_jobs(app, batch.id)
    for path in (job.spec["input"]["path"], job.output_path):
        assert Path(path).is_relative_to(settings.data_dir)
