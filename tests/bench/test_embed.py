"""``llm-batch bench --task embed``: its options, our job, the checks on embeddings, the
steady rows/s, and the report rows; every part without an engine."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from llm_batch.bench.cli import add_bench_parser, config_from_args, main, rounds_text
from llm_batch.bench.harness import (
    EMBEDDING_ATOL,
    BenchConfig,
    _check_output,
    _combine,
    _embeddings_differing,
    _measure,
    _report,
    _Run,
    embedding_matrix,
    failures,
    job_dict,
    ratios_of,
)
from llm_batch.bench.report import render_table, write_chart
from llm_batch.bench.systems.llm_batch_job import _read_events, _series_events
from llm_batch.bench.systems.raw_vllm import _embed_columns
from llm_batch.bench.workload import Workload, WorkloadSpec, build_table, write_input
from llm_batch.errors import JobSpecError
from llm_batch.job.spec import JobSpec


def _workload(tmp_path: Path, **spec) -> Workload:
    return Workload(
        spec=WorkloadSpec(**spec),
        input_path=str(tmp_path / "input"),
        files=[],
        input_bytes=0,
        prompt_tokens_mean=64.0,
        prompt_tokens_min=63,
        prompt_tokens_max=65,
    )


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


# --- options ---------------------------------------------------------------------------


def test_task_defaults_to_generate_and_takes_embed(tmp_path):
    assert config_from_args(_args("--out", str(tmp_path))).workload.task == "generate"
    config = config_from_args(_args("--task", "embed", "--rows", "20", "--out", str(tmp_path)))
    assert config.workload.task == "embed" and config.workload.rows == 20


def test_task_options_that_cannot_run_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _args("--task", "classify")
    capsys.readouterr()
    with pytest.raises(JobSpecError, match="--task embed: the service bench"):
        config_from_args(_args("--task", "embed", "--service", "--out", str(tmp_path)))
    with pytest.raises(JobSpecError, match="--task embed: the cache bench"):
        config_from_args(_args("--task", "embed", "--cache", "--out", str(tmp_path)))
    # A carried `embedding` column would collide with the embeddings written.
    assert main(["--task", "embed", "--embedding-dim", "8", "--out", str(tmp_path)]) == 2
    assert "task embed writes its own 'embedding' column" in capsys.readouterr().err


# --- our job -----------------------------------------------------------------------------


def test_our_embed_job_is_a_pooling_model_without_sampling(tmp_path):
    w = _workload(tmp_path, task="embed", rows=10, output_tokens=64, carry_strings=1)
    job = job_dict(BenchConfig(out=str(tmp_path), batch_size=32), w, "/m", str(tmp_path / "o"))
    assert "sampling" not in job  # a job of pooling models alone refuses a sampling block
    spec = JobSpec.model_validate(job)
    assert spec.model is not None and spec.model.task == "embed"
    assert spec.carryover == ["id", "carry_00"]
    # Room for the prompt alone: 65 + 1, rounded up to 16 (output tokens unused).
    assert spec.model.engine.max_model_len == 80


def test_generate_job_is_unchanged_by_the_task_field(tmp_path):
    w = _workload(tmp_path, rows=10, output_tokens=64)
    job = job_dict(BenchConfig(out=str(tmp_path)), w, "/m", str(tmp_path / "o"))
    assert job["sampling"] == {"max_tokens": 64, "temperature": 0.0, "ignore_eos": True}
    assert job["model"]["task"] == "generate"
    assert job["model"]["engine"]["max_model_len"] == 144


# --- reading and comparing embeddings ---------------------------------------------------

_VECTORS = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


@pytest.mark.parametrize(
    "array",
    [
        pa.array(_VECTORS, pa.list_(pa.float32(), 3)),  # llm-batch, raw vLLM
        pa.array(_VECTORS, pa.list_(pa.float64())),  # ray.data.llm, as it writes them
        pa.array(_VECTORS, pa.large_list(pa.float32())),
        pa.chunked_array([pa.array(_VECTORS[:1], pa.list_(pa.float64()))] * 2),
    ],
    ids=["fixed-size", "list-of-double", "large-list", "chunked"],
)
def test_embedding_matrix_reads_any_list_column(array):
    m = embedding_matrix(array)
    assert m.dtype == np.float32 and m.shape == (2, 3)
    expected = _VECTORS if not isinstance(array, pa.ChunkedArray) else [_VECTORS[0]] * 2
    np.testing.assert_array_equal(m, np.array(expected, np.float32))


def test_embedding_matrix_reads_an_extension_types_storage():
    class Tensor(pa.ExtensionType):
        def __init__(self) -> None:
            super().__init__(pa.list_(pa.float32()), "bench.test.tensor")

        def __arrow_ext_serialize__(self) -> bytes:
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            return cls()

    array = pa.ExtensionArray.from_storage(Tensor(), pa.array(_VECTORS, pa.list_(pa.float32())))
    assert embedding_matrix(array).shape == (2, 3)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (pa.array([[1.0, 2.0], None], pa.list_(pa.float32())), "1 rows have no embedding"),
        (pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32())), "embeddings of 2 sizes"),
        (pa.array([[], []], pa.list_(pa.float32())), "embeddings of 1 sizes"),
        (pa.array(["a", "b"]), "embeddings are string"),
    ],
    ids=["a-null", "two-sizes", "empty", "not-a-list"],
)
def test_embedding_matrix_refuses_what_is_not_one_vector_a_row(array, message):
    with pytest.raises(ValueError, match=message):
        embedding_matrix(array)


def test_embeddings_are_compared_row_by_row_within_the_tolerance():
    want = np.array([[0.1, -0.2, 0.3], [0.5, 0.5, 0.5]], np.float32)
    assert _embeddings_differing(want.copy(), want) == {"rows": 0, "max_abs_diff": 0.0}
    near = want + np.float32(EMBEDDING_ATOL / 2)
    assert _embeddings_differing(near, want)["rows"] == 0
    far = want.copy()
    far[1, 2] = -0.5
    differing = _embeddings_differing(far, want)
    assert differing["rows"] == 1 and differing["max_abs_diff"] == pytest.approx(1.0)
    assert _embeddings_differing(want[:, :2], want)["rows"] == 2  # another size: every row


def _embed_output(folder: Path, ids: list[int], vectors: list, **extra) -> str:
    folder.mkdir(parents=True)
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "embedding": pa.array(vectors, pa.list_(pa.float32())),
            "num_input_tokens": pa.array([64] * len(ids), pa.int32()),
            **extra,
        }
    )
    pq.write_table(table, folder / "part-0.parquet")
    return str(folder)


def test_embed_output_checks_want_one_vector_for_every_row(tmp_path):
    w = _workload(tmp_path, task="embed", rows=3)
    ids = pa.array(range(3), pa.int64())
    good = _embed_output(tmp_path / "good", [2, 0, 1], [[2.0], [0.0], [1.0]])
    table, problems = _check_output("x", good, w, ids)
    assert problems == [] and table is not None
    assert embedding_matrix(table.column("embedding")).ravel().tolist() == [0.0, 1.0, 2.0]

    missing = _embed_output(tmp_path / "missing", [0, 1, 2], [[0.0], None, [1.0]])
    assert _check_output("x", missing, w, ids)[1] == ["x: 1 rows have no embedding"]
    short = _embed_output(tmp_path / "short", [0, 1], [[0.0], [1.0]])
    assert _check_output("x", short, w, ids)[1] == ["x: 2 output rows for 3 input rows"]
    # llm-batch writes a row's failure in `error` (and no vector).
    failed = _embed_output(
        tmp_path / "failed", [0, 1, 2], [[0.0], None, [1.0]], error=[None, "too long", None]
    )
    assert _check_output("x", failed, w, ids)[1] == [
        "x: 1 rows failed, the first: too long",
        "x: 1 rows have no embedding",
    ]


# --- the runners' pure parts -------------------------------------------------------------


def test_raw_embeddings_become_a_fixed_size_list_beside_the_carried_columns():
    outputs = [
        SimpleNamespace(outputs=SimpleNamespace(embedding=[0.5, 1.5]), prompt_token_ids=[1, 2, 3]),
        SimpleNamespace(outputs=SimpleNamespace(embedding=[2.5, 3.5]), prompt_token_ids=[4]),
    ]
    out = _embed_columns(pa.table({"id": [7, 8]}), outputs)
    assert out.column_names == ["id", "embedding", "num_input_tokens"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 2)
    assert out.column("embedding").to_pylist() == [[0.5, 1.5], [2.5, 3.5]]
    assert out.column("num_input_tokens").to_pylist() == [3, 1]


def test_our_timeline_counts_rows_when_embedding(tmp_path):
    events = tmp_path / "events.txt"
    events.write_text("10.5 0 256\n11.0 0 256\n11.25 0 88\n", encoding="utf-8")
    assert _read_events(events, rows=True) == [(10.5, 256), (11.0, 256), (11.25, 88)]
    events.write_text("10.5 2048 32\n", encoding="utf-8")
    assert _read_events(events) == [(10.5, 2048)]  # generation: output tokens
    series = [
        {"t": 1.0, "rows_done": 0, "output_tokens": 0},
        {"t": 2.0, "rows_done": 256, "output_tokens": 0},
        {"t": 3.0, "rows_done": 600, "output_tokens": 0},
    ]
    assert _series_events(series, [(105.0, 4.0)], rows=True) == [(103.0, 256), (104.0, 344)]


# --- steady rows/s -------------------------------------------------------------------------


def test_steady_rows_per_second_is_the_token_rule_over_rows(tmp_path):
    # Launched at 100; engine ready at 120; then 1,000 rows done one a millisecond from 130.
    w = _workload(tmp_path, task="embed", rows=1000)
    events = [(130.0 + i * 0.001, 1) for i in range(1, 1001)]
    run = _Run("raw", tmp_path, launched_at=100.0)
    run.result = {
        "started_at": 100.5,
        "engine_started_at": 105.0,
        "engine_ready_at": 120.0,
        "first_output_at": 131.0,
        "output_written_at": 131.5,
        "events": events,
    }
    m = _measure(run, w)
    # The window runs from the 100th row (10%) to the 900th (90%): 800 rows in 0.8 s.
    assert m["steady_rows_per_s"] == pytest.approx(1000.0)
    assert m["steady_window_rows"] == 800
    assert m["steady_window_s"] == pytest.approx([30.1, 30.9])
    assert (m["wall_s"], m["first_row_s"], m["engine_start_s"]) == (31.5, 31.0, 15.0)
    assert m["steady_cpu_s_per_1k_rows"] is None  # no sampler
    assert "steady_tokens_per_s" not in m


def test_ratios_for_embed_are_of_rows_per_second():
    systems = {
        "raw": {"steady_rows_per_s": 2000.0, "wall_s": 20.0, "steady_cpu_s_per_1k_rows": 1.0},
        "ray-data-llm": {"steady_rows_per_s": 1000.0, "wall_s": 50.0},
        "llm-batch": {"steady_rows_per_s": 1500.0, "wall_s": 30.0, "steady_cpu_s_per_1k_rows": 2},
    }
    assert ratios_of(systems, "rows") == {
        "llm-batch/raw": {
            "steady_rows_per_s": 0.75,
            "wall_s": 1.5,
            "steady_cpu_s_per_1k_rows": 2.0,
        },
        "llm-batch/ray-data-llm": {
            "steady_rows_per_s": 1.5,
            "wall_s": 0.6,
            "steady_cpu_s_per_1k_rows": None,
        },
    }


# --- the report ----------------------------------------------------------------------------


def _embed_report() -> dict:
    def system(wall, rps, first, differ=0, **more):
        return {
            "status": "ok",
            "error": None,
            "wall_s": wall,
            "engine_start_s": 15.0,
            "engine_ready_s": 16.0,
            "first_row_s": first,
            "steady_rows_per_s": rps,
            "steady_window_s": [first, wall - 1],
            "steady_cpu_s_per_1k_rows": 0.75,
            "timeline": [(first + i, 100) for i in range(10)],
            "memory": {"peak_bytes": 2 << 30, "metric": "pss", "series": [(0, 0), (1, 1 << 30)]},
            "rows_out": 1000,
            "input_tokens": 64000,
            "embedding_size": 128,
            "rows_differing": {"from": "raw", "rows": differ, "max_abs_diff": 0.0},
            "left_behind": [],
            **more,
        }

    systems = {
        "raw": system(22.0, 1390.2, 21.8),
        "ray-data-llm": system(49.6, 1069.9, 49.3),
        "llm-batch": system(39.0, 1591.0, 38.6),
    }
    return {
        "task": "embed",
        "unit": "rows",
        "workload": {
            "task": "embed",
            "rows": 1000,
            "prompt_tokens": 64,
            "output_tokens": 64,
            "prompt_tokens_measured": {"mean": 64.0},
            "format": "parquet",
            "carry_strings": 0,
            "carry_string_bytes": 1024,
            "embedding_dim": 0,
        },
        "config": {"batch_size": 256, "replicas": 1},
        "systems": systems,
        "ratios": ratios_of(systems, "rows"),
        "checks": {"problems": [], "embeddings_compared_with": "raw"},
    }


def test_embed_table_shows_rows_per_second_and_the_embedding_checks(tmp_path):
    console = Console(width=160, record=True)
    console.print(render_table(_embed_report()))
    text = console.export_text()
    assert "1000 rows × ~64 prompt tokens, embedded, parquet" in text
    assert "output tokens" not in text  # neither in the title nor as a row
    for expected in (
        "steady rows/s",
        "1,390.2",
        "1.14×",  # 1591 / 1390.2
        "1.49×",  # 1591 / 1069.9
        "CPU s per 1k steady rows",
        "embedding size",
        "64,000",
        "rows whose embedding ≉ raw vLLM",
        "largest difference",
    ):
        assert expected in text, expected
    assert write_chart(_embed_report(), tmp_path / "r.png").stat().st_size > 10_000


def test_embed_rounds_combine_on_rows_per_second():
    def round_of(raw: float, ours: float) -> dict:
        report = _embed_report()
        report["systems"]["raw"]["steady_rows_per_s"] = raw
        report["systems"]["llm-batch"]["steady_rows_per_s"] = ours
        report["ratios"] = ratios_of(report["systems"], "rows")
        return report

    combined = _combine([round_of(2000.0, 1800.0), round_of(1000.0, 900.0), round_of(1900, 950)])
    assert combined["systems"]["raw"]["steady_rows_per_s"] == 1900.0
    assert combined["systems"]["llm-batch"]["steady_rows_per_s"] == 950.0
    assert combined["ratios"]["llm-batch/raw"]["steady_rows_per_s"] == pytest.approx(0.9)
    assert set(combined["rounds"][0]["systems"]["raw"]) >= {"steady_rows_per_s", "wall_s"}
    assert "steady_tokens_per_s" not in combined["rounds"][0]["systems"]["raw"]
    assert failures(combined) == []
    text = rounds_text(combined)
    assert text.splitlines()[0] == (
        "  round 1: steady rows/s raw 2,000.0, ray-data-llm 1,069.9, llm-batch 1,800.0; "
        "llm-batch/raw 0.90×, llm-batch/ray-data-llm 1.68×"
    )
    console = Console(width=160, record=True)
    console.print(render_table(combined))
    assert "median of 3 rounds" in " ".join(console.export_text().split())  # a wrapped title


def test_report_fails_embeddings_unlike_the_references_and_counts_them(tmp_path):
    w = _workload(tmp_path, task="embed", rows=4, carry_strings=1, carry_string_bytes=3)
    inputs = build_table(w.spec, [f"p{i}" for i in range(4)])
    files = write_input(inputs, tmp_path / "input", "parquet", rows_per_file=4)
    w = dataclasses.replace(w, files=files)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4, 8)).astype(np.float32)
    runs = {}
    for name, shift in (("raw", 0.0), ("ray-data-llm", 1e-5), ("llm-batch", 0.5)):
        got = vectors.copy()
        got[1] += shift  # one row, off by this much in every value
        _embed_output(
            tmp_path / name / "output",
            [3, 2, 1, 0],
            got[::-1].tolist(),
            carry_00=inputs.column("carry_00").to_pylist()[::-1],
        )
        run = _Run(name, tmp_path / name, launched_at=0.0)
        run.result = {
            "started_at": 0.1,
            "output_written_at": 5.0,
            "first_output_at": 4.0,
            "events": [(1.0 + i, 1) for i in range(4)],
        }
        runs[name] = run
    config = BenchConfig(out=str(tmp_path), batch_size=2)
    report = _report(config, w, "/m", {}, runs, on_cpu=True)
    assert (report["task"], report["unit"], report["sampling"]) == ("embed", "rows", None)
    assert report["checks"]["embeddings_compared_with"] == "raw"
    systems = report["systems"]
    assert systems["ray-data-llm"]["rows_differing"]["rows"] == 0  # within the tolerance
    assert systems["llm-batch"]["rows_differing"]["rows"] == 1
    assert systems["llm-batch"]["rows_differing"]["max_abs_diff"] == pytest.approx(0.5)
    assert systems["llm-batch"]["carryover_mismatched_rows"] == {}
    assert (systems["raw"]["embedding_size"], systems["raw"]["input_tokens"]) == (8, 256)
    assert failures(report) == [
        "llm-batch: 1 rows' embeddings differ from raw's (rtol 0.01, atol 0.001)"
    ]
    assert set(report["ratios"]["llm-batch/raw"]) == {
        "steady_rows_per_s",
        "wall_s",
        "steady_cpu_s_per_1k_rows",
    }
