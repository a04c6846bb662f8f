"""What the operator's settings let a submitted job ask for: engine arguments and replicas
(``LLM_BATCH_ALLOWED_ENGINE_ARGS``, ``LLM_BATCH_MAX_REPLICAS``), and paths in the data
directory. The hostile-input table (``tests/service/test_hostile.py``) has one row per
refused case under the defaults; these tests change the settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llm_batch.service.app import create_app
from llm_batch.service.process import free_port
from llm_batch.service.settings import Settings
from llm_batch.service.validation import SAFE_ENGINE_ARGS


def app_client(tmp_path: Path, db_url: str, **settings: Any) -> TestClient:
    return TestClient(
        create_app(
            Settings(
                data_dir=tmp_path / "data",
                db=db_url,
                ray_dashboard_port=free_port(),
                storage_roots=str(tmp_path),
                **settings,
            ),
            run_scheduler=False,
        )
    )


@pytest.fixture
def client(tmp_path: Path, db_url: str) -> Iterator[TestClient]:
    with app_client(tmp_path, db_url, allowed_engine_args="trust_remote_code", max_replicas=4) as c:
        yield c


def with_model(job_body: dict[str, Any], **block: Any) -> dict[str, Any]:
    return {**job_body, "model": {**job_body["model"], **block}}


def extra(job_body: dict[str, Any], **args: Any) -> dict[str, Any]:
    return with_model(job_body, engine={**job_body["model"]["engine"], "extra_args": args})


def test_the_operator_allows_more_engine_args(client, job_body):
    r = client.post("/v1/jobs", json=extra(job_body, trust_remote_code=True, block_size=32))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["model"]["engine"]["extra_args"]["trust_remote_code"] is True
    r = client.post("/v1/jobs", json=extra(job_body, worker_cls="evil.Worker"))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("model.engine.extra_args.worker_cls: ")
    assert "trust_remote_code" in detail.split("(allowed: ")[1]  # the operator's addition


def test_max_replicas_is_the_settings(client, job_body):
    r = client.post("/v1/jobs", json=with_model(job_body, replicas={"min": 1, "max": 5}))
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "model.replicas.max: 5 engine replicas is more than this service allows for one "
        "model (4; the service's operator sets LLM_BATCH_MAX_REPLICAS)"
    )
    r = client.post("/v1/jobs", json=with_model(job_body, replicas=4))
    assert r.status_code == 201, r.text


def test_the_catalogs_models_are_the_operators(tmp_path, db_url, job_body):
    models = tmp_path / "models.yaml"
    models.write_text(
        "big:\n  path: big-hub-id\n  engine: {max_model_len: 256, "
        "extra_args: {trust_remote_code: true}}\n  replicas: 500\n"
    )
    with app_client(tmp_path, db_url, models=models) as client:
        without_model = {k: v for k, v in job_body.items() if k != "model"}
        for job in ({**job_body, "model": "big"}, {**without_model, "models": ["big"]}):
            r = client.post("/v1/jobs", json=job)
            assert r.status_code == 201, r.text
        # The same block written in the job is the submitter's.
        block = {"name": "mine", "path": "big-hub-id", "replicas": 500}
        r = client.post("/v1/jobs", json={**without_model, "models": ["big", block]})
        assert r.status_code == 422
        assert r.json()["detail"].startswith("models[1].replicas: 500 engine replicas")


def test_admin_keys_are_held_to_the_engine_args_too(tmp_path, db_url, job_body):
    with app_client(tmp_path, db_url, admin_api_keys="key-admin") as client:
        r = client.post(
            "/v1/jobs",
            json=extra(job_body, trust_remote_code=True),
            headers={"Authorization": "Bearer key-admin"},
        )
        assert r.status_code == 422
        assert r.json()["detail"].startswith("model.engine.extra_args.trust_remote_code: ")


def test_the_data_directory_is_refused_before_anything_is_read(tmp_path, db_url, job_body):
    """A key learns nothing of what another key's folders hold: not even whether a file
    exists."""
    with app_client(tmp_path, db_url, api_keys="key-bob") as client:
        for name in ("llm_batch.db", "outputs/job_nope/part-0.parquet"):
            path = str(tmp_path / "data" / name)
            r = client.post(
                "/v1/jobs",
                json={**job_body, "input": {"path": path}},
                headers={"Authorization": "Bearer key-bob"},
            )
            assert r.status_code == 422
            assert r.json()["detail"].startswith(
                f"input.path: {path!r} is inside the service's data directory"
            )


def test_allowed_engine_args_extend_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_BATCH_ALLOWED_ENGINE_ARGS", " hf_overrides , compilation_config.level,")
    settings = Settings(data_dir=tmp_path / "data")
    assert settings.allowed_engine_args == "hf_overrides,compilation_config.level"
    assert settings.engine_args() == SAFE_ENGINE_ARGS | {"hf_overrides", "compilation_config.level"}
    assert Settings(data_dir=tmp_path / "data", allowed_engine_args=None).engine_args() == (
        SAFE_ENGINE_ARGS
    )
    for bad in ("trust remote code", "worker_cls()", "a..b", "os.system;x"):
        with pytest.raises(ValueError, match="allowed_engine_args"):
            Settings(data_dir=tmp_path / "data", allowed_engine_args=bad)
    with pytest.raises(ValueError, match="max_replicas"):
        Settings(data_dir=tmp_path / "data", max_replicas=0)


def test_safe_engine_args_are_vllm_engine_args_that_run_no_code():
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    fields = {f.name: f for f in dataclasses.fields(arg_utils.EngineArgs)}
    for name in SAFE_ENGINE_ARGS:
        top, _, key = name.partition(".")
        assert top in fields, f"{top} is not a field of vllm.EngineArgs"
        if key:
            config = fields[top].type
            assert key in {f.name for f in dataclasses.fields(config)}, f"{name}: no such key"
    code_or_paths = {
        "trust_remote_code", "code_revision", "worker_cls", "worker_extension_cls",
        "model_impl", "hf_overrides", "model_class_overrides", "logits_processors",
        "scheduler_cls", "io_processor_plugin", "reasoning_parser_plugin",
        "distributed_executor_backend", "model", "tokenizer", "hf_config_path",
        "download_dir", "load_format", "model_loader_extra_config", "generation_config",
        "speculative_config", "hf_token", "compilation_config", "kv_transfer_config",
        "structured_outputs_config", "structured_outputs_config.reasoning_parser_plugin",
    }  # fmt: skip
    assert not code_or_paths & SAFE_ENGINE_ARGS


def test_a_stages_model_blocks_are_checked_as_the_jobs_own(client, job_body):
    """A staged job's model blocks get the same admission as a one-model job's: its
    engine arguments and replicas, named by their place in the stages."""
    model = job_body["model"]
    stages = [
        {"name": "draft", "prompt": job_body["prompt"], "model": model},
        {
            "name": "judge",
            "prompt": {"template": "Good? {{ draft__generated_text }}"},
            "models": [{"name": "a", **model}, {"name": "b", **model, "replicas": 5}],
            "keep_if": "judge__a__generated_text == 'yes'",
        },
    ]
    body = {k: v for k, v in job_body.items() if k not in ("prompt", "model", "sampling")}
    r = client.post("/v1/jobs", json={**body, "stages": stages})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("stages[1].models[1].replicas: 5 engine replicas")
    del stages[1]["models"][1]["replicas"]
    r = client.post("/v1/jobs", json={**body, "stages": stages})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["stages"][1]["keep_if"] == "judge__a__generated_text == 'yes'"
