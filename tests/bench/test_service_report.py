"""The service bench's table (``llm-batch bench --service``), from a report of one run."""

from __future__ import annotations

from llm_batch.bench.service import render


def test_the_table_shows_each_steady_run_and_both_raw_runs():
    report = {
        "rows": 3000,
        "big_rows": 20000,
        "small_job_s": [2.1, 1.5, 1.6],
        "small_job_median_s": 1.6,
        "burst_all_done_s": 7.5,
        "small_beside_big_s": [3.2, 8.4],
        "big_shared_steady_tokens_per_s": 15000.0,
        "big_alone_steady_tokens_per_s": 16000.0,
        "service_steady_runs_tokens_per_s": [17000.0, 18500.5, None],
        "service_steady_tokens_per_s": 17000.0,
        "raw_runs_tokens_per_s": [18000.0, 20000.0],
        "raw_steady_tokens_per_s": 19000.0,
        "ratios": {"big_shared_over_alone": 0.938, "service_over_raw": 0.895},
    }
    table = render(report)
    assert "max 8.40 s over 2 jobs" in table
    assert "0.938 (15000.0 ÷ 16000.0)" in table
    assert (
        "0.895 (17,000, median of 17,000, 18,500, 0; ÷ 19,000, mean of raw before and after: "
        "18,000, 20,000)" in table
    )
    assert "3,000-row job" not in table.split("steady tok/s ÷ raw")[1]  # no wall times kept


def test_the_table_says_where_the_mid_size_job_ran():
    report = {
        "rows": 3000,
        "big_rows": 20000,
        "small_job_s": [0.4],
        "small_job_median_s": 0.4,
        "burst_all_done_s": 3.3,
        "small_beside_big_s": [5.8],
        "big_shared_steady_tokens_per_s": 1.0,
        "big_alone_steady_tokens_per_s": 1.0,
        "service_steady_runs_tokens_per_s": [1.0],
        "service_steady_tokens_per_s": 1.0,
        "service_steady_runs_s": [15.2, 14.9],
        "raw_runs_tokens_per_s": [1.0],
        "raw_steady_tokens_per_s": 1.0,
        "ratios": {"big_shared_over_alone": 1.0, "service_over_raw": 1.0},
    }
    assert "| 3,000-row job, POST → succeeded (a driver of its own) | 15.20, 14.90 s |" in render(
        report
    )
    report["small_job_rows"] = 5000
    assert "(the engine host) | 15.20, 14.90 s" in render(report)
