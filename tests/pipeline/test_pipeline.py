"""The batch engine end to end: the real Ray Data pipeline and the real vLLM CPU engine.

One job of a few hundred rows, run once for the module, carries columns of many
Arrow types, one prompt longer than ``max_model_len`` and one row whose
template cannot render; every assertion below reads that one output.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch import columns
from llm_batch.job.spec import JobSpec

pytestmark = pytest.mark.e2e

N = 300
LONG_ROW = 7  # its text is far longer than max_model_len
BROKEN_ROW = 11  # its `extra` is null, so `extra.note` cannot render
TEMPLATE = "Item {{ id }}: {{ text }}{% if id == 11 %}{{ extra.note }}{% endif %}\nAnswer:"
MAX_TOKENS = 12


def typed_table(n: int = N) -> pa.Table:
    words = ["red", "blue", "quick", "slow", "good", "bad", "tiny", "large"]
    texts = [" ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 6)) for i in range(n)]
    texts[LONG_ROW] = "word " * 3000
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "text": pa.array(texts, pa.string()),
            "extra": pa.array(
                [None if i == BROKEN_ROW else {"note": f"n{i}"} for i in range(n)],
                pa.struct([("note", pa.string())]),
            ),
            "tags": pa.array(
                [[f"t{i}", None] if i % 3 else [] for i in range(n)], pa.list_(pa.string())
            ),
            "nested": pa.array(
                [{"a": i, "b": [[1.5, None], []], "c": {"d": bool(i % 2)}} for i in range(n)],
                pa.struct(
                    [
                        ("a", pa.int32()),
                        ("b", pa.list_(pa.list_(pa.float64()))),
                        ("c", pa.struct([("d", pa.bool_())])),
                    ]
                ),
            ),
            "blob": pa.array([bytes([i % 256]) * (i % 5) for i in range(n)], pa.binary()),
            "ts": pa.array(
                [dt.datetime(2024, 1, 1) + dt.timedelta(seconds=i) for i in range(n)],
                pa.timestamp("us", tz="UTC"),
            ),
            "day": pa.array([dt.date(2024, 1, 1 + i % 28) for i in range(n)], pa.date32()),
            "price": pa.array(
                [decimal.Decimal(f"{i}.{i % 100:02d}") for i in range(n)], pa.decimal128(12, 2)
            ),
            "emb": pa.array(
                [[float(i), -1.0, 0.5, 2.0] for i in range(n)], pa.list_(pa.float32(), 4)
            ),
            "attrs": pa.array([[("k", i)] for i in range(n)], pa.map_(pa.string(), pa.int64())),
            "maybe": pa.array([None if i % 4 == 0 else i * 0.5 for i in range(n)], pa.float64()),
            "cat": pa.array([words[i % 3] for i in range(n)]).dictionary_encode(),
            "big": pa.array(["x" * (i % 50) for i in range(n)], pa.large_string()),
        }
    )


CARRYOVER = [
    "id",
    "tags",
    "nested",
    "blob",
    "ts",
    "day",
    "price",
    "emb",
    "attrs",
    "maybe",
    "cat",
    "big",
]


def render(row: dict) -> str:
    return f"Item {row['id']}: {row['text']}\nAnswer:"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, ray_local: None):
    from llm_batch.pipeline.run import run_job

    root = tmp_path_factory.mktemp("typed")
    table = typed_table()
    pq.write_table(table, root / "in.parquet")
    spec = JobSpec.from_dict(
        {
            "name": "typed",
            "input": {"path": str(root / "in.parquet")},
            "prompt": {"template": TEMPLATE},
            "model": {
                "path": str(tiny_model),
                "engine": {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True},
                # Small batches so the run has many blocks and several output files.
                "batch_size": 64,
            },
            "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0.0},
            "carryover": CARRYOVER,
            "output": {"path": str(root / "out")},
        }
    )
    snapshots: list[dict] = []
    result = run_job(spec, on_progress=snapshots.append, progress_interval=0.2)
    out = pads.dataset(str(root / "out"), format="parquet").to_table().sort_by("id")
    return {"input": table, "output": out, "result": result, "snapshots": snapshots, "root": root}


def test_one_output_row_per_input_row(job):
    assert job["output"].column("id").to_pylist() == list(range(N))


def test_carryover_columns_identical_type_for_type(job):
    out, table = job["output"], job["input"]
    assert out.column_names == ["row_id", *CARRYOVER, *columns.OUTPUT_COLUMNS]
    # One input file: a row's id is its position in the file.
    assert out.column("row_id").to_pylist() == out.column("id").to_pylist()
    for name in CARRYOVER:
        expected = table.column(name)
        got = out.column(name)
        assert got.type == expected.type, name
        assert got.combine_chunks().equals(expected.combine_chunks()), name


def test_generations_equal_llm_generate(job, reference):
    out, table = job["output"], job["input"]
    rows = [r for r in table.to_pylist() if r["id"] not in (LONG_ROW, BROKEN_ROW)]
    expected = reference([render(r) for r in rows], MAX_TOKENS)
    got = {r["id"]: r for r in out.to_pylist()}
    mismatches = [
        r["id"] for r, e in zip(rows, expected, strict=True) if got[r["id"]]["generated_text"] != e
    ]
    assert not mismatches, f"rows whose text differs from LLM.generate: {mismatches[:10]}"
    for r in rows:
        g = got[r["id"]]
        assert g["error"] is None
        assert g["num_output_tokens"] == MAX_TOKENS or g["finish_reason"] == "stop"
        assert g["num_input_tokens"] > 0


def test_prompt_longer_than_max_model_len_is_an_error_row(job):
    row = job["output"].to_pylist()[LONG_ROW]
    assert row["generated_text"] is None
    assert "maximum context length is 512" in row["error"]


def test_template_failure_is_an_error_row(job):
    row = job["output"].to_pylist()[BROKEN_ROW]
    assert row["generated_text"] is None
    assert row["error"].startswith("prompt rendering failed")
    assert "note" in row["error"]


def test_progress_reports_and_counts(job):
    final = job["result"].progress
    assert final["rows_total"] == N
    assert final["rows_done"] == N
    assert final["rows_failed"] == 2
    assert final["output_tokens"] == sum(
        v or 0 for v in job["output"].column("num_output_tokens").to_pylist()
    )
    assert any(s["rows_done"] < N for s in job["snapshots"]) or len(job["snapshots"]) >= 1


def test_output_files_complete_no_leftovers(job):
    files = sorted(p.name for p in (job["root"] / "out").iterdir())
    parts = [f for f in files if f.startswith("part-") and f.endswith(".parquet")]
    assert len(parts) >= 1
    assert sorted(set(files) - set(parts)) == ["_llm_batch.json", "_metrics.json"]
    # The manifest lists what the run wrote, so that a later run touches nothing else.
    manifest = json.loads((job["root"] / "out" / "_llm_batch.json").read_text())
    assert set(parts) <= set(manifest["files"]) and "_metrics.json" in manifest["files"]


def test_cli_run_on_jsonl_with_nested_carryover(tmp_path: Path, tiny_model: Path, reference):
    rows = [
        {"id": f"r{i}", "q": f"what is {i} plus {i}?", "meta": {"tags": ["a", str(i)], "w": i}}
        for i in range(40)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        f"""
name: cli-jsonl
input: {{path: {tmp_path / "in.jsonl"}}}
prompt:
  template: "Question: {{{{ q }}}}\\nAnswer:"
model:
  path: {tiny_model}
  engine: {{max_model_len: 512, dtype: bfloat16, enforce_eager: true}}
sampling: {{max_tokens: 8, temperature: 0.0}}
carryover: [id, meta]
output: {{path: {tmp_path / "out"}}}
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "llm_batch.cli", "run", str(job_file), "--show", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote 40 rows (0 with errors) to {tmp_path / 'out'}" in proc.stdout
    out = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("id")
    by_id = {r["id"]: r for r in out.to_pylist()}
    assert sorted(by_id) == sorted(r["id"] for r in rows)
    expected = reference([f"Question: {r['q']}\nAnswer:" for r in rows], 8)
    for r, e in zip(rows, expected, strict=True):
        assert by_id[r["id"]]["meta"] == r["meta"]
        assert by_id[r["id"]]["generated_text"] == e
