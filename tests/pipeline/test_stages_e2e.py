"""A three-stage job (draft, judge with a choice and ``keep_if``, rewrite) on the real CPU
engine: every input row is written once, ``dropped_by`` says where a row stopped, and each
stage's texts equal raw ``LLM.generate`` on prompts rendered from the earlier stage's
outputs."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch.job.spec import JobSpec

pytestmark = pytest.mark.e2e

ENGINE = {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True}
CHOICES = ["good", "bad"]
ROWS = 24
NULL_TOPIC = 5  # this row's draft prompt cannot render: it stops at the first stage


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model, ray_local):
    from llm_batch.pipeline.run import run_job

    root = tmp_path_factory.mktemp("stages")
    words = ["rain", "bread", "a cat", "the sea", "music", "a bridge", "winter", "tea"]
    table = pa.table(
        {
            "id": list(range(ROWS)),
            "topic": [None if i == NULL_TOPIC else f"{words[i % 8]} {i}" for i in range(ROWS)],
            "audience": ["children" if i % 2 else "cooks" for i in range(ROWS)],
        }
    )
    pq.write_table(table, root / "in.parquet")
    model = {"path": str(tiny_model), "engine": ENGINE, "batch_size": 8}
    spec = JobSpec.from_dict(
        {
            "name": "chain",
            "input": {"path": str(root / "in.parquet")},
            "stages": [
                {
                    "name": "draft",
                    "prompt": {"template": "Write about {{ topic.strip() }}:"},
                    "model": model,
                    "sampling": {"max_tokens": 8},
                },
                {
                    "name": "judge",
                    "prompt": {"template": "Judge: {{ draft__generated_text }}"},
                    "model": model,
                    "sampling": {"max_tokens": 4, "structured": {"choice": CHOICES}},
                    "keep_if": "judge__generated_text == 'good'",
                },
                {
                    "name": "rewrite",
                    "prompt": {"template": "For {{ audience }}: {{ draft__generated_text }}"},
                    "model": model,
                    "sampling": {"max_tokens": 8},
                },
            ],
            "carryover": ["id"],
            "cache": {"mode": "off"},
            "output": {"path": str(root / "out")},
        }
    )
    snaps: list[dict] = []
    run_job(spec, on_progress=snaps.append, progress_interval=0.5)
    out = pads.dataset(str(root / "out"), format="parquet").to_table().sort_by("id")
    metrics = json.loads((root / "out" / "_metrics.json").read_text())
    return {"input": table, "out": out, "final": snaps[-1], "metrics": metrics}


def test_every_row_is_written_once_with_where_it_stopped(chain):
    out = chain["out"]
    assert out.num_rows == ROWS
    assert sorted(out.column("id").to_pylist()) == list(range(ROWS))
    assert len(set(out.column("row_id").to_pylist())) == ROWS
    assert out.column_names[-1] == "dropped_by"
    assert "topic" not in out.column_names and "audience" not in out.column_names
    rows = out.to_pylist()
    stopped = rows[NULL_TOPIC]
    assert stopped["dropped_by"] == "draft"
    assert stopped["draft__error"].startswith("prompt rendering failed")
    assert stopped["judge__generated_text"] is None and stopped["judge__error"] is None
    for row in rows:
        if row["id"] == NULL_TOPIC:
            continue
        kept = row["judge__generated_text"] == "good"
        assert row["dropped_by"] == (None if kept else "judge"), row
        # A row not kept skips the rewrite: its columns are null, with no error.
        assert (row["rewrite__generated_text"] is not None) == kept, row
        assert row["rewrite__error"] is None
    judged = [r["judge__generated_text"] for r in rows if r["id"] != NULL_TOPIC]
    # The job means something only if the judge both kept and dropped rows.
    assert "good" in judged and "bad" in judged, judged


def test_each_stage_equals_raw_vllm_on_prompts_from_the_stage_before(
    chain, tiny_model, reference_engines
):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    rows = [r for r in chain["out"].to_pylist() if r["id"] != NULL_TOPIC]
    topics = {r["id"]: r["topic"] for r in chain["input"].to_pylist()}
    audiences = {r["id"]: r["audience"] for r in chain["input"].to_pylist()}
    llm = reference_engines(tiny_model)

    def generate(prompts: list[str], **params) -> list[str]:
        out = llm.generate(prompts, SamplingParams(temperature=0.0, **params), use_tqdm=False)
        return [o.outputs[0].text for o in out]

    drafts = generate([f"Write about {topics[r['id']]}:" for r in rows], max_tokens=8)
    assert [r["draft__generated_text"] for r in rows] == drafts
    judged = generate(
        [f"Judge: {d}" for d in drafts],
        max_tokens=4,
        structured_outputs=StructuredOutputsParams(choice=CHOICES),
    )
    assert [r["judge__generated_text"] for r in rows] == judged
    kept = [(r, d) for r, d, j in zip(rows, drafts, judged, strict=True) if j == "good"]
    rewrites = generate([f"For {audiences[r['id']]}: {d}" for r, d in kept], max_tokens=8)
    assert [r["rewrite__generated_text"] for r, _ in kept] == rewrites


def test_progress_and_metrics_are_per_stage(chain):
    final = chain["final"]
    rows = chain["out"].to_pylist()
    judged_out = sum(1 for r in rows if r["dropped_by"] == "judge")
    assert final["rows_done"] == ROWS
    models = final["models"]
    assert set(models) == {"draft", "judge", "rewrite"}
    assert models["draft"]["rows_skipped"] == 0 and models["draft"]["rows_failed"] == 1
    assert models["judge"]["rows_skipped"] == 1
    assert models["rewrite"]["rows_skipped"] == 1 + judged_out
    # Accumulators count the rows each stage ran: the judge's finish reasons cover 23 rows.
    judge = chain["metrics"]["metrics"]["judge"]
    assert sum(judge["finish_reasons"].values()) == ROWS - 1, judge["finish_reasons"]
    rewrite = chain["metrics"]["metrics"]["rewrite"]
    assert sum(rewrite["finish_reasons"].values()) == ROWS - 1 - judged_out
