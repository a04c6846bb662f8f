"""``llm-batch submit/status/cancel`` against the API served by a real uvicorn on loopback
(the scheduler off, so jobs stay queued and no Ray is needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from llm_batch.cli import main
from llm_batch.service.app import create_app
from llm_batch.service.process import free_port
from llm_batch.service.settings import Settings


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path / "data", ray_dashboard_port=free_port(), storage_roots=str(tmp_path)
    )
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, run_scheduler=False), host="127.0.0.1", port=port, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def job_file(tmp_path: Path, reviews: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "job.yaml"
    path.write_text(
        f"""
name: cli-reviews
input: {{path: {reviews.name}}}   # relative to the current directory
prompt: {{template: "Review: {{{{ text }}}}"}}
model: {{path: tiny-hub-id}}
carryover: [id]
"""
    )
    return path


def test_submit_status_cancel(server, job_file, reviews, capsys):
    assert main(["submit", str(job_file), "--server", server]) == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted job_") and out.rstrip().endswith("(cli-reviews): queued")
    job_id = out.split()[1]

    assert main(["status", job_id, "--server", server]) == 0
    out = capsys.readouterr().out
    assert f"id        {job_id}" in out
    assert "status    queued" in out
    assert "progress  0/3 rows" in out

    assert main(["status", "--server", server]) == 0
    table = capsys.readouterr().out
    assert "STATUS" in table and job_id in table and "cli-reviews" in table

    assert main(["cancel", job_id, "--server", server]) == 0
    assert capsys.readouterr().out.strip() == f"{job_id}: cancelled"
    assert main(["status", "--status", "queued", "--server", server]) == 0
    assert capsys.readouterr().out.strip() == "no jobs"


def test_retry_of_a_job_that_has_not_ended_prints_the_services_message(server, job_file, capsys):
    assert main(["submit", str(job_file), "--server", server]) == 0
    job_id = capsys.readouterr().out.split()[1]
    assert main(["retry", job_id, "--server", server]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"llm-batch: error: job {job_id} is queued: its rows with errors can be retried once "
        "it has ended"
    )


def test_submit_resolves_relative_paths_before_sending(server, job_file, reviews, capsys):
    from llm_batch.service.client import JobsClient

    main(["submit", str(job_file), "--server", server])
    job_id = capsys.readouterr().out.split()[1]
    with JobsClient(server) as client:
        assert client.get(job_id)["spec"]["input"]["path"] == str(reviews)


def test_submit_refused_prints_the_services_message(server, job_file, capsys):
    job_file.write_text(job_file.read_text().replace("{{ text }}", "{{ body }}"))
    assert main(["submit", str(job_file), "--server", server]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-batch: error: prompt.template uses column 'body'")
    assert len(err.strip().splitlines()) == 1


def test_status_of_an_unknown_job(server, capsys):
    assert main(["status", "job_nope", "--server", server]) == 2
    assert capsys.readouterr().err.strip() == "llm-batch: error: no job with id 'job_nope'"


def test_unreachable_server_says_how_to_start_one(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--server", url]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the llm-batch service at {url}" in err
    assert "llm-batch serve" in err


def test_server_defaults_to_the_environment(monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("LLM_BATCH_SERVER", url)
    assert main(["cancel", "job_x"]) == 2
    assert url in capsys.readouterr().err


def test_missing_job_file(capsys, tmp_path):
    assert main(["submit", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_submit_wait_exits_non_zero_when_the_job_does_not_succeed(server, job_file, capsys):
    from llm_batch.service.client import JobsClient

    def cancel_soon() -> None:
        with JobsClient(server) as client:
            for _ in range(100):
                jobs = client.list()["data"]
                if jobs:
                    client.cancel(jobs[0]["id"])
                    return
                time.sleep(0.1)

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    code = main(["submit", str(job_file), "--server", server, "--wait"])
    canceller.join()
    assert code == 1
    out = capsys.readouterr().out
    assert "cancelled: 0 rows (0 with errors)" in out


def test_serve_flags_override_the_environment(monkeypatch, tmp_path):
    import uvicorn

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    monkeypatch.setenv("LLM_BATCH_PORT", "9999")
    monkeypatch.setenv("LLM_BATCH_MAX_RUNNING_JOBS", "3")
    monkeypatch.setenv("LLM_BATCH_DATA_DIR", str(tmp_path / "from-env"))
    assert main(["serve", "--port", "1234", "--data-dir", str(tmp_path / "d")]) == 0
    settings = ran["app"].state.service.settings
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 1234)
    assert settings.max_running_jobs == 3
    assert settings.data_dir == tmp_path / "d"
    assert (tmp_path / "d" / "llm_batch.db").exists()  # the schema is created at start


def test_serve_with_a_bad_models_file_fails_in_one_line(tmp_path, capsys):
    models = tmp_path / "models.yaml"
    models.write_text("a: {path: x, replica: 2}\n")
    code = main(["serve", "--data-dir", str(tmp_path / "d"), "--models", str(models)])
    assert code == 2
    assert "a is invalid: replica: unknown field" in capsys.readouterr().err
