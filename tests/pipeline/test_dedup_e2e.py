"""Duplicate prompts generated once, end to end on the real CPU engine: rows with the same
prompt and deterministic sampling (greedy, or seeded) take one generation's output; rows
with unseeded sampling never do; every row's text equals raw vLLM's."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch.job.spec import JobSpec

pytestmark = pytest.mark.e2e

SEEDED = {"temperature": 1.0, "seed": 7}
UNSEEDED = {"temperature": 1.0}


def rows() -> list[tuple[str, dict | None]]:
    """30 greedy rows of 10 prompts, 10 unseeded of 5, 10 seeded of 5."""
    greedy = [(f"Tell me about thing {i % 10}:", None) for i in range(30)]
    unseeded = [(f"Tell me about thing {i % 5}:", UNSEEDED) for i in range(10)]
    seeded = [(f"Tell me about thing {i % 5}:", SEEDED) for i in range(10)]
    return greedy + unseeded + seeded


def test_duplicates_are_generated_once_and_written_to_every_copy(
    tmp_path, tiny_model, ray_local, reference_engines
):
    from vllm import SamplingParams

    from llm_batch.pipeline.run import run_job

    data = rows()
    pq.write_table(
        pa.table(
            {
                "id": list(range(len(data))),
                "text": [t for t, _ in data],
                "overrides": [json.dumps(o) if o else None for _, o in data],
            }
        ),
        tmp_path / "in.parquet",
    )
    spec = JobSpec.from_dict(
        {
            "name": "dedup",
            "input": {"path": str(tmp_path / "in.parquet")},
            "prompt": {"template": "{{ text }}"},
            "model": {
                "path": str(tiny_model),
                "engine": {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True},
                "batch_size": 16,  # copies in other batches than their first
            },
            "sampling": {"max_tokens": 10, "overrides_column": "overrides"},
            "carryover": ["id"],
            "output": {"path": str(tmp_path / "out")},
        }
    )
    result = run_job(spec)
    out = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("id")
    assert out.column("id").to_pylist() == list(range(len(data)))
    texts = out.column("generated_text").to_pylist()

    llm = reference_engines(tiny_model)
    for i, (prompt, override) in enumerate(data):
        if override is UNSEEDED:
            continue
        params = SamplingParams(max_tokens=10, **(override or {"temperature": 0.0}))
        expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
        assert texts[i] == expected, (i, prompt, override)
    # 20 greedy copies and 5 seeded copies took an earlier row's output; no unseeded row did.
    assert result.progress["rows_deduplicated"] == 25
    metrics = json.loads((tmp_path / "out" / "_metrics.json").read_text())
    assert metrics["rows_deduplicated"] == 25
    # Every row counts as generated in the metrics, copies included.
    usage = metrics["metrics"]["default"]["token_usage"]
    assert usage["rows"] == len(data)
    assert usage["output_tokens"] == sum(out.column("num_output_tokens").to_pylist())
