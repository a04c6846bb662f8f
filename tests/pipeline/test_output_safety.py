"""A job never loses a user's data: it touches only what it wrote (its manifest), refuses
output folders that cannot be right, marks structured outputs cut by max_tokens as error
rows, checks model limits before an engine starts, and runs quietly.

The CLI runs as a subprocess (``python -m llm_batch.cli``), the REST door is the real app
(``create_app``) behind FastAPI's test client; the runs that generate use the real Ray and
the real vLLM CPU engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from fastapi.testclient import TestClient

from llm_batch.pipeline.manifest import MANIFEST_NAME

pytestmark = pytest.mark.e2e

SPARK_PART = "part-00001-3f1c9a2e-7d41-4b7e-9f0e-5a1b2c3d4e5f-c000.snappy.parquet"


def cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_batch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(
        pa.table({"id": list(range(12)), "text": [f"review {i}" for i in range(12)]}),
        folder / "reviews.parquet",
    )
    return folder


def job(tmp_path: Path, tiny_model: Path, data: Path, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "safety",
        "input": {"path": str(data), "format": "parquet"},
        "prompt": {"template": "Review: {{ text }}\nSentiment:"},
        "model": {
            "path": str(tiny_model),
            "engine": {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True},
        },
        "sampling": {"max_tokens": 4},
        "carryover": ["id"],
        "output": {"path": str(tmp_path / "out")},
    }
    for key, value in changes.items():
        body[key] = {**body[key], **value} if isinstance(body.get(key), dict) else value
    return body


def write_job(tmp_path: Path, body: dict[str, Any]) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def rest(tmp_path: Path, tiny_model: Path):
    """The real app (admission, storage roots) without a scheduler: nothing runs."""
    from llm_batch.service.app import create_app
    from llm_batch.service.process import free_port
    from llm_batch.service.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "data",
        db=f"sqlite:///{tmp_path / 'jobs.db'}",
        storage_roots=f"{tmp_path},{tiny_model}",
        ray_dashboard_port=free_port(),
    )
    with TestClient(create_app(settings, run_scheduler=False)) as client:
        yield client


def test_a_foreign_part_file_is_refused_by_the_cli_and_rest_and_survives(
    tmp_path, tiny_model, data, rest
):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), out / SPARK_PART)
    (out / "_SUCCESS").write_text("")
    before = snapshot(out)
    body = job(tmp_path, tiny_model, data)

    proc = cli("run", str(write_job(tmp_path, body)))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("llm-batch: error: output.path: ")
    assert "did not write" in lines[0] and SPARK_PART in lines[0]
    assert "output.mode: overwrite" in lines[0]

    r = rest.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("output.path: ") and SPARK_PART in r.json()["detail"]
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "where",
    ["same", "output-inside-input", "input-inside-output"],
)
def test_output_folders_overlapping_the_input_are_refused_and_the_input_is_intact(
    tmp_path, tiny_model, data, rest, where
):
    if where == "same":
        output, input_path = data, data
    elif where == "output-inside-input":
        output, input_path = data / "out", data
    else:
        output, input_path = data.parent, data / "reviews.parquet"
    body = job(tmp_path, tiny_model, data, input={"path": str(input_path), "format": "parquet"})
    body["output"] = {"path": str(output)}
    before = snapshot(data)

    proc = cli("run", str(write_job(tmp_path, body)))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("llm-batch: error: output.path: ")
    assert "input" in proc.stderr.splitlines()[0] and "Traceback" not in proc.stderr
    r = rest.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("output.path: ")
    assert snapshot(data) == before


def test_limits_the_engine_would_refuse_are_refused_at_submission(tmp_path, tiny_model, data, rest):
    too_long = job(
        tmp_path, tiny_model, data, model={"engine": {"max_model_len": 4096, "dtype": "bfloat16"}}
    )
    proc = cli("run", str(write_job(tmp_path, too_long)))
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert message.startswith("llm-batch: error: model.engine.max_model_len: 4096 ")
    assert "2048" in message and "max_position_embeddings" in message
    r = rest.post("/v1/jobs", json=too_long)
    assert r.status_code == 422 and "4096" in r.json()["detail"] and "2048" in r.json()["detail"]

    choices = ["positive", "negative", "neutral"]
    cut = job(
        tmp_path, tiny_model, data, sampling={"max_tokens": 1, "structured": {"choice": choices}}
    )
    r = rest.post("/v1/jobs", json=cut)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("sampling.max_tokens: 1 cannot hold the choice ")
    assert "set max_tokens to at least" in detail


def test_overwrite_replaces_parquet_keeps_other_files_and_the_run_is_quiet(
    tmp_path, tiny_model, data
):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / SPARK_PART)
    (out / "README.txt").write_text("the warehouse's notes")
    body = job(tmp_path, tiny_model, data, output={"mode": "overwrite"})

    proc = cli("run", str(write_job(tmp_path, body)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "Traceback" not in said
    assert not [line for line in said.splitlines() if "WARNING" in line or "(pid=" in line]
    assert proc.stdout.strip().splitlines()[-1].startswith("wrote 12 rows (0 with errors)")

    assert not (out / SPARK_PART).exists()
    assert (out / "README.txt").read_text() == "the warehouse's notes"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts and set(parts) <= set(manifest["files"])
    rows = pads.dataset([str(out / p) for p in parts], format="parquet").to_table()
    assert sorted(rows.column("id").to_pylist()) == list(range(12))

    # Run again: its own earlier files are replaced; README.txt is still not the job's, so
    # only overwrite mode accepts the folder, and keeps the file again.
    again = cli("run", str(write_job(tmp_path, body)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "README.txt").read_text() == "the warehouse's notes"
    assert not set(parts) & {p.name for p in out.glob("part-*.parquet")}  # a new run id
    body["output"] = {"path": str(out)}
    refused = cli("run", str(write_job(tmp_path, body)))
    assert refused.returncode == 2 and "README.txt" in refused.stderr


def test_structured_outputs_cut_by_max_tokens_are_error_rows_not_predictions(
    tmp_path, tiny_model, data, ray_local
):
    from llm_batch.job.spec import JobSpec
    from llm_batch.pipeline.run import run_job

    labels = tmp_path / "labeled.parquet"
    pq.write_table(
        pa.table({"id": list(range(12)), "text": ["x"] * 12, "label": ["abc"] * 12}), labels
    )
    body = job(
        tmp_path,
        tiny_model,
        data,
        input={"path": str(labels)},
        sampling={"max_tokens": 2, "structured": {"regex": "[a-z]{40}"}},
        metrics={"label_column": "label"},
    )
    result = run_job(JobSpec.from_dict(body))
    out = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert out.num_rows == 12
    for row in out.to_pylist():
        assert row["finish_reason"] == "length"
        assert row["error"].startswith("structured output cut at max_tokens")
        assert row["generated_text"]  # the cut text is kept for inspection
    labels_metrics = result.progress["metrics"]["default"]["labels"]
    # No cut text counts as a predicted class: every row is a miss, none a prediction.
    cm = labels_metrics["confusion_matrix"]
    assert set(cm["predicted"]) == {"abc", "(empty or error)"}  # the truth's class, and misses
    counts = dict(zip(cm["predicted"], cm["matrix"][cm["labels"].index("abc")], strict=True))
    assert counts == {"abc": 0, "(empty or error)": 12}
    assert labels_metrics["accuracy"] == 0.0
    assert result.progress["rows_failed"] == 12
