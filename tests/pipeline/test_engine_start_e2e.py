"""A CPU engine's first step, on the real vLLM CPU engine: a job whose prompts are a token
or two each runs on a fresh engine and generates every row.

vLLM's attention kernel for AMX processors killed a fresh engine's worker (SIGILL) when
its first step was a prefill that short; every batch then died with its engine and the
job's rows ended as errors (decision 0018). On a processor without AMX this passes
either way; on one with it, it fails without the engine's warm-up step."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch.job.spec import JobSpec

pytestmark = pytest.mark.e2e

ROWS = 8
MAX_TOKENS = 3


def test_a_job_of_one_word_prompts_runs_on_a_fresh_engine(tmp_path, tiny_model, ray_local):
    from llm_batch.pipeline.run import run_job

    words = ["a", "b", "c", "d", "e", "f", "g", "h"][:ROWS]
    pq.write_table(pa.table({"id": list(range(ROWS)), "text": words}), tmp_path / "in.parquet")
    spec = JobSpec.from_dict(
        {
            "name": "short-prompts",
            "input": {"path": str(tmp_path / "in.parquet")},
            "prompt": {"template": "{{ text }}"},
            "model": {
                "path": str(tiny_model),
                "engine": {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True},
            },
            "sampling": {"max_tokens": MAX_TOKENS, "ignore_eos": True},
            "carryover": ["id"],
            "output": {"path": str(tmp_path / "out")},
            "cache": {"mode": "off"},
        }
    )
    result = run_job(spec)
    out = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("id")
    assert out.column("id").to_pylist() == list(range(ROWS))
    assert out.column("error").null_count == ROWS, out.column("error").to_pylist()
    assert out.column("num_output_tokens").to_pylist() == [MAX_TOKENS] * ROWS
    # The prompts are as short as the crash needed: a few tokens each.
    assert max(out.column("num_input_tokens").to_pylist()) <= 4
    # One engine, never restarted after a crash.
    assert result.progress["engine_starts"] == 1
    # The warm-up step's request is no row's: one time to first token per row.
    assert sum(e["ttft_count"] for e in result.progress["engines"]) == ROWS
