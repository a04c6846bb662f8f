"""The harness's pure parts: our job for a workload, the output checks, the table and chart."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from llm_batch.bench.cli import config_from_args, main, rounds_text
from llm_batch.bench.harness import (
    BenchConfig,
    _carryover_mismatches,
    _check_output,
    _combine,
    _cpu_per_1k,
    failures,
    job_dict,
)
from llm_batch.bench.processes import MemorySampler
from llm_batch.bench.report import render_table, write_chart
from llm_batch.bench.timeline import SteadyState
from llm_batch.bench.workload import Workload, WorkloadSpec
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


def test_our_job_carries_the_workload_and_shares_engine_settings(tmp_path):
    w = _workload(tmp_path, rows=10, output_tokens=64, carry_strings=2, embedding_dim=4)
    config = BenchConfig(out=str(tmp_path), batch_size=32, max_num_seqs=16)
    spec = JobSpec.model_validate(job_dict(config, w, "/m", str(tmp_path / "o")))
    assert spec.carryover == ["id", "carry_00", "carry_01", "embedding"]
    assert spec.prompt.template == "{{ prompt }}"
    assert spec.sampling.ignore_eos and spec.sampling.temperature == 0
    assert spec.sampling.max_tokens == 64
    assert spec.model is not None
    engine = spec.model.engine
    assert (engine.dtype, engine.enforce_eager, engine.max_num_seqs) == ("bfloat16", True, 16)
    assert engine.max_model_len == 144  # 65 + 64 + 1, rounded up to 16
    assert spec.model.batch_size == 32


def _sampled(cpu_seconds_at, *, t0: float, every: float, until: float) -> MemorySampler:
    """A sampler (never started) whose series samples ``cpu_seconds_at(t)`` every ``every``
    seconds from ``t0`` (the run's launch) to ``t0 + until``."""
    sampler = MemorySampler(root_pid=1, marker="never-matched")
    times = [i * every for i in range(int(until / every) + 1)]
    sampler.series = [(t0 + t, 1 << 30, 3, cpu_seconds_at(t)) for t in times]
    return sampler


def _window(start: float, end: float, tokens: int) -> SteadyState:
    return SteadyState(tokens / (end - start), start, end, tokens, tokens, 100)


def test_cpu_per_1k_tokens_covers_the_same_window_as_the_tokens():
    # 1.5 CPU s per second, samples every second; the window's ends fall between samples.
    # The samples inside it (2 s..8 s) span 6 s of the window's 7: reading them reads low.
    sampler = _sampled(lambda t: 1.5 * t, t0=1000.0, every=1.0, until=10.0)
    window = _window(1.5, 8.5, tokens=7000)
    assert _cpu_per_1k(sampler, window, 1000.0) == pytest.approx(1.5 * 7 / 7)
    # A series that bends between samples is read linearly between them.
    sampler = _sampled(lambda t: t if t <= 5 else 5 + 3 * (t - 5), t0=0.0, every=1.0, until=10.0)
    assert _cpu_per_1k(sampler, _window(4.5, 5.5, tokens=1000), 0.0) == pytest.approx(2.0)
    # Window ends on samples: the difference of those samples.
    assert _cpu_per_1k(sampler, _window(1.0, 9.0, tokens=2000), 0.0) == pytest.approx(8.0)


def test_cpu_per_1k_tokens_reads_past_a_sample_too_slow_to_have_one_time():
    # A starved sampler read the processes over seconds: its CPU total is None and the
    # series is read between the samples around it, not at its (wrong) time.
    sampler = _sampled(lambda t: 1.5 * t, t0=0.0, every=1.0, until=10.0)
    sampler.series[3] = (3.0, 1 << 30, 3, None)
    assert _cpu_per_1k(sampler, _window(2.5, 8.0, tokens=5500), 0.0) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("start", "end", "tokens"),
    [(-0.5, 8.0, 1000), (1.0, 10.5, 1000), (1.0, 8.0, 0)],
    ids=["starts-before-the-samples", "ends-after-them", "no-tokens"],
)
def test_cpu_per_1k_tokens_is_none_where_the_samples_do_not_cover_the_window(start, end, tokens):
    sampler = _sampled(lambda t: t, t0=0.0, every=1.0, until=10.0)
    assert _cpu_per_1k(sampler, _window(start, end, tokens), 0.0) is None
    assert _cpu_per_1k(None, _window(1.0, 8.0, 1000), 0.0) is None


def _output(folder: Path, ids: list[int], tokens: list[int], **extra) -> str:
    folder.mkdir(parents=True)
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            **extra,
            "generated_text": [f"t{i}" for i in ids],
            "num_output_tokens": pa.array(tokens, pa.int32()),
        }
    )
    pq.write_table(table, folder / "part-0.parquet")
    return str(folder)


def test_output_checks_fail_on_missing_rows_and_short_generations(tmp_path):
    w = _workload(tmp_path, rows=4, output_tokens=8)
    ids = pa.array(range(4), pa.int64())
    good = _output(tmp_path / "good", [3, 1, 0, 2], [8] * 4)
    table, problems = _check_output("x", good, w, ids)
    assert problems == [] and table is not None
    assert table.column("id").to_pylist() == [0, 1, 2, 3]  # sorted for comparison

    _, problems = _check_output("x", _output(tmp_path / "short", [0, 1, 2], [8] * 3), w, ids)
    assert problems == ["x: 3 output rows for 4 input rows"]
    _, problems = _check_output("x", _output(tmp_path / "dup", [0, 1, 1, 2], [8] * 4), w, ids)
    assert problems == ["x: output ids are not the input ids, once each"]
    _, problems = _check_output("x", _output(tmp_path / "len", [0, 1, 2, 3], [8, 7, 8, 8]), w, ids)
    assert problems == ["x: 1 rows do not have 8 output tokens"]


def test_carryover_is_compared_by_value_across_types(tmp_path):
    inputs = pa.table(
        {
            "id": pa.array([0, 1], pa.int64()),
            "s": ["a", "b"],
            "e": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32(), 2)),
        }
    )
    # Another system may write a large_string or a variable-size list: same values.
    same = _output(
        tmp_path / "same",
        [1, 0],
        [1, 1],
        s=pa.array(["b", "a"], pa.large_string()),
        e=pa.array([[3.0, 4.0], [1.0, 2.0]], pa.list_(pa.float32())),
    )
    assert _carryover_mismatches(same, inputs, ["id", "s", "e"]) == {}
    other = _output(tmp_path / "other", [0, 1], [1, 1], s=["a", "x"], e=inputs.column("e"))
    assert _carryover_mismatches(other, inputs, ["id", "s", "e"]) == {"s": 1}


def _report() -> dict:
    def system(wall, tps, first, ready=None, **more):
        return {
            "status": "ok",
            "error": None,
            "wall_s": wall,
            "engine_start_s": None if ready is None else ready - 5,
            "engine_ready_s": ready,
            "first_row_s": first,
            "steady_tokens_per_s": tps,
            "steady_window_s": [first, wall - 1],
            "timeline": [(first + i, 100) for i in range(10)],
            "memory": {"peak_bytes": 2 << 30, "metric": "pss", "series": [(0, 0), (1, 1 << 30)]},
            "rows_out": 1000,
            "output_tokens": 1000,
            "rows_differing": {"from": "raw", "rows": 0},
            "left_behind": [],
            **more,
        }

    return {
        "workload": {
            "rows": 1000,
            "prompt_tokens": 64,
            "output_tokens": 1,
            "prompt_tokens_measured": {"mean": 64.0},
            "format": "parquet",
            "carry_strings": 0,
            "carry_string_bytes": 1024,
            "embedding_dim": 0,
        },
        "config": {"batch_size": 256, "replicas": 1},
        "systems": {
            "raw": system(40.0, 15000.0, 39.0, ready=20.0),
            "ray-data-llm": system(76.0, 11000.0, 75.0),
            "llm-batch": {
                **system(0, None, 0),
                "status": "failed",
                "error": "exited with code 1\nTraceback",
                "wall_s": None,
                "first_row_s": None,
                "timeline": [],
            },
        },
        "ratios": {
            "llm-batch/raw": {"steady_tokens_per_s": None, "wall_s": None},
            "llm-batch/ray-data-llm": {"steady_tokens_per_s": None, "wall_s": None},
        },
        "checks": {
            "problems": ["ray-data-llm: 1 rows do not have 1 output tokens"],
            "texts_compared_with": "raw",
        },
    }


def test_table_chart_and_failures_render_even_with_a_failed_system(tmp_path):
    report = _report()
    console = Console(width=150, record=True)
    console.print(render_table(report))
    text = console.export_text()
    assert "15,000" in text and "FAILED" in text and "n/a" in text
    assert write_chart(report, tmp_path / "r.png").stat().st_size > 10_000
    assert failures(report) == [
        "llm-batch: exited with code 1",
        "ray-data-llm: 1 rows do not have 1 output tokens",
    ]


def test_cli_flags_become_a_config(tmp_path):
    import argparse

    from llm_batch.bench.cli import add_bench_parser

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["bench", "--rows", "10", "--systems", "raw,llm-batch", "--no-enforce-eager",
         "--engine-arg", "distributed_executor_backend=uni",
         "--engine-arg", "max_num_batched_tokens=512", "--out", str(tmp_path)]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.systems == ["raw", "llm-batch"]
    assert config.workload.rows == 10 and config.enforce_eager is False
    assert config.engine_args == {
        "distributed_executor_backend": "uni",
        "max_num_batched_tokens": 512,
    }
    assert config.batch_size is None  # llm-batch's default for the engine, chosen at run time


def test_cli_rejects_bad_options_in_one_line(capsys):
    assert main(["--format", "csv", "--embedding-dim", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-batch bench: error: bench options is invalid: ")
    assert "CSV cannot hold" in err
    with pytest.raises(SystemExit):
        main(["--systems", "raw,nope"])


def test_rounds_combine_into_medians_with_every_round_kept(tmp_path):
    def round_of(raw_tps: float, ours_tps: float, ours_peak: int, problems=()) -> dict:
        report = _report()
        ours = {**report["systems"]["raw"], "steady_tokens_per_s": ours_tps}
        ours["memory"] = {**ours["memory"], "peak_bytes": ours_peak}
        report["systems"] = {"raw": {**report["systems"]["raw"]}, "llm-batch": ours}
        report["systems"]["raw"]["steady_tokens_per_s"] = raw_tps
        report["ratios"] = {"llm-batch/raw": {"steady_tokens_per_s": ours_tps / raw_tps}}
        report["checks"] = {"problems": list(problems), "texts_compared_with": "raw"}
        return report

    # A slow machine in round 2 slows both systems; the ratio holds within each round.
    rounds = [
        round_of(30000.0, 27000.0, 3 << 30),
        round_of(18000.0, 16200.0, 4 << 30, problems=["llm-batch: 1 rows differ"]),
        round_of(28000.0, 14000.0, 2 << 30),
    ]
    combined = _combine(rounds)
    assert combined["systems"]["raw"]["steady_tokens_per_s"] == 28000.0
    assert combined["systems"]["llm-batch"]["steady_tokens_per_s"] == 16200.0
    # The median of the rounds' ratios, not the ratio of the medians (16200 / 28000).
    assert combined["ratios"]["llm-batch/raw"]["steady_tokens_per_s"] == pytest.approx(0.9)
    assert combined["systems"]["llm-batch"]["memory"]["peak_bytes"] == 4 << 30
    assert failures(combined) == ["round 2: llm-batch: 1 rows differ"]
    assert [r["ratios"]["llm-batch/raw"]["steady_tokens_per_s"] for r in combined["rounds"]] == [
        pytest.approx(0.9),
        pytest.approx(0.9),
        pytest.approx(0.5),
    ]
    assert rounds_text(combined).splitlines()[1] == (
        "  round 2: steady tok/s raw 18,000, llm-batch 16,200; llm-batch/raw 0.90×"
    )
    console = Console(width=150, record=True)
    console.print(render_table(combined))
    assert "median of 3 rounds" in console.export_text()
