"""Re-running only failed rows, end to end on the real CPU engine: a job whose long prompts
fail under a small ``max_model_len`` is run again with ``--retry-errors`` and a larger
one; the output then holds every input row exactly once, the failed rows generated anew
(equal to raw vLLM), the others kept as they were."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.manifest import Manifest
from llm_batch.pipeline.write import owned_parts

pytestmark = pytest.mark.e2e

LONG = {3, 11, 19}  # rows whose prompt is longer than the first run's max_model_len


def job(tmp_path, tiny_model, max_model_len: int) -> dict:
    return {
        "name": "retry",
        "input": {"path": str(tmp_path / "in.parquet")},
        "prompt": {"template": "{{ text }}"},
        "model": {
            "path": str(tiny_model),
            "engine": {"max_model_len": max_model_len, "dtype": "bfloat16", "enforce_eager": True},
            "batch_size": 8,
        },
        "sampling": {"max_tokens": 8},
        "carryover": ["id"],
        "output": {"path": str(tmp_path / "out")},
    }


def read(tmp_path) -> pa.Table:
    return pads.dataset(owned_parts(str(tmp_path / "out")), format="parquet").to_table()


def test_retry_errors_runs_only_the_failed_rows_and_keeps_the_rest(
    tmp_path, tiny_model, ray_local, reference
):
    from llm_batch.pipeline.run import run_job

    texts = [
        " ".join(["a long prompt"] * 60) if i in LONG else f"Tell me about thing {i}:"
        for i in range(24)
    ]
    pq.write_table(pa.table({"id": list(range(24)), "text": texts}), tmp_path / "in.parquet")

    first = run_job(JobSpec.from_dict(job(tmp_path, tiny_model, 96)))
    assert first.progress["rows_failed"] == len(LONG)
    before = {r["id"]: r for r in read(tmp_path).to_pylist()}
    assert {i for i, r in before.items() if r["error"]} == LONG
    first_parts = set(owned_parts(str(tmp_path / "out")))

    retried = run_job(JobSpec.from_dict(job(tmp_path, tiny_model, 512)), retry_errors=True)

    out = read(tmp_path).sort_by("id")
    assert out.column("id").to_pylist() == list(range(24))  # every row exactly once
    assert out.column("error").null_count == 24
    rows = out.to_pylist()
    for r in rows:
        if r["id"] not in LONG:
            assert r == before[r["id"]]  # kept as the first run wrote it
    expected = reference([texts[i] for i in sorted(LONG)], 8)
    assert [rows[i]["generated_text"] for i in sorted(LONG)] == expected
    # Progress and metrics cover the kept rows and the new ones.
    assert retried.progress["rows_done"] == 24
    assert retried.progress["rows_failed"] == 0
    metrics = json.loads((tmp_path / "out" / "_metrics.json").read_text())
    assert metrics["rows_failed"] == 0
    assert metrics["metrics"]["default"]["token_usage"]["rows"] == 24
    # The parts with failed rows were replaced; the folder lists what it holds.
    parts = set(owned_parts(str(tmp_path / "out")))
    assert parts != first_parts
    manifest = Manifest.read(str(tmp_path / "out"))
    assert manifest is not None
    assert sorted(p.rsplit("/", 1)[-1] for p in parts) == [
        f for f in manifest.files if f.startswith("part-")
    ]
    assert not (tmp_path / "out" / "_checkpoint").exists()

    # Nothing left to retry: the command says so and starts nothing.
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job(tmp_path, tiny_model, 512)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_batch.cli",
            "run",
            str(tmp_path / "job.yaml"),
            "--retry-errors",
        ],  # noqa: E501
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"nothing to retry: no row of {tmp_path / 'out'} has an error" in proc.stdout
