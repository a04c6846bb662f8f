"""The prompt library and the demo model, end to end on the real vLLM CPU engine.

Every job file in ``prompts/`` runs as shipped (output redirected to a temporary
folder); the labeling job must reach an accuracy of at least 0.9 against the
held-out labels with the trained demo model, and its labels must equal what
``vllm.LLM.generate`` gives for the same prompts. The two-model job must write
both trained models' columns and score each against the labels, its
cross-entropy and ROC-AUC equal to the recompute from its output file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from llm_batch import columns
from llm_batch.job.spec import JobSpec
from tests.pipeline.test_labeling import assert_probability_metrics_equal_the_file

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
JOB_FILES = sorted((ROOT / "prompts").glob("*.yaml"))


@pytest.fixture(scope="module")
def results(tmp_path_factory, ray_local):
    """Run every job file once; {file name: (spec, output table, _metrics.json)}."""
    import os

    from llm_batch.pipeline.run import run_job

    out_root = tmp_path_factory.mktemp("prompts")
    here = os.getcwd()
    os.chdir(ROOT)  # job files name paths relative to the repository root
    try:
        done = {}
        for path in JOB_FILES:
            spec = JobSpec.from_file(path).with_output(str(out_root / path.stem))
            run_job(spec)
            table = pads.dataset(str(out_root / path.stem), format="parquet").to_table()
            metrics = json.loads((out_root / path.stem / "_metrics.json").read_text())
            done[path.name] = (spec, table, metrics)
        return done
    finally:
        os.chdir(here)


def test_library_has_the_common_cases():
    names = {p.name for p in JOB_FILES}
    assert {
        "reviews-sentiment.yaml",
        "reviews-sentiment-compare.yaml",
        "synthetic-reviews.yaml",
        "review-records.yaml",
        "reviews-classify.yaml",
        "reviews-embed.yaml",
        "synthetic-reviews-judged.yaml",
    } <= names


def test_the_judged_synthetic_reviews_keep_what_the_judge_agrees_with(results):
    """prompts/synthetic-reviews-judged.yaml: generate, judge, filter; no row lost."""
    _, table, metrics = results["synthetic-reviews-judged.yaml"]
    rows = table.to_pylist()
    for row in rows:
        agrees = row["judge__generated_text"] == row["label"]
        assert row["dropped_by"] == (None if agrees else "judge"), row
    kept = sum(r["dropped_by"] is None for r in rows)
    assert 0 < kept < len(rows)
    assert metrics["models"]["judge"]["rows_done"] == len(rows)


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.name for p in JOB_FILES])
def test_every_job_file_runs_one_row_per_input_row_and_sample(results, path):
    spec, table, metrics = results[path.name]
    inputs = pads.dataset(
        str(ROOT / spec.input.path),
        format=("json" if spec.input.resolved_format == "jsonl" else spec.input.resolved_format),
    ).count_rows()
    assert table.num_rows == inputs * spec.samples_per_row
    assert metrics["rows_done"] == table.num_rows
    errors = [c for c in table.column_names if c.endswith("error")]
    for column in errors:
        assert table.column(column).null_count == table.num_rows, table.column(column)


def test_demo_model_labels_the_held_out_reviews(results):
    _, table, metrics = results["reviews-sentiment.yaml"]
    labels = metrics["metrics"]["default"]["labels"]
    assert labels["accuracy"] >= 0.9, labels
    got = sum(
        p.strip() == t
        for p, t in zip(
            table.column("generated_text").to_pylist(),
            table.column("label").to_pylist(),
            strict=True,
        )
    )
    assert got / table.num_rows == labels["accuracy"]


def test_the_trained_classifier_labels_the_held_out_reviews(results):
    """prompts/reviews-classify.yaml: the sequence classifier on vLLM's pooling runner."""
    _, table, metrics = results["reviews-classify.yaml"]
    labels = metrics["metrics"]["clf"]["labels"]
    assert labels["accuracy"] >= 0.9, labels
    truth = table.column("label").to_pylist()
    predicted = table.column("clf__label").to_pylist()
    assert (
        sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
        == (labels["accuracy"])
    )
    probs = table.column("clf__probs").to_pylist()
    names = ["positive", "negative", "neutral"]  # the model's id2label
    assert [names[max(range(3), key=p.__getitem__)] for p in probs] == predicted
    assert labels["probability"]["source"] == "the classifier's class probabilities"
    # The embedding job: one normalized 128-float vector per review.
    _, embedded, _ = results["reviews-embed.yaml"]
    assert embedded.column("embedding").type == pa.list_(pa.float32(), 128)


def test_demo_labels_equal_llm_generate(results, reference_engines):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    spec, table, _ = results["reviews-sentiment.yaml"]
    table = table.sort_by("row_id")
    prompts = [f"Review: {t}\nSentiment:" for t in table.column("text").to_pylist()]
    params = SamplingParams(
        max_tokens=spec.sampling.max_tokens,
        temperature=0.0,
        structured_outputs=StructuredOutputsParams(choice=spec.sampling.structured.choice),
    )
    llm = reference_engines(ROOT / spec.model.path)
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert table.column("generated_text").to_pylist() == expected


def test_two_models_label_in_one_pass_each_scored_against_the_labels(results):
    spec, table, metrics = results["reviews-sentiment-compare.yaml"]
    table = table.sort_by("row_id")
    names = [m.name for m in spec.models]
    assert names == ["large", "small"]
    assert table.column_names == ["row_id", *spec.carryover, "label"] + [
        f"{m}__{c}" for m in names for c in (*columns.OUTPUT_COLUMNS, columns.LOGPROBS)
    ]
    truth = table.column("label").to_pylist()
    for name in names:
        m = metrics["metrics"][name]
        pred = [p.strip() for p in table.column(f"{name}__generated_text").to_pylist()]
        assert m["labels"]["accuracy"] == round(
            sum(p == t for p, t in zip(pred, truth, strict=True)) / len(truth), 6
        )
        assert m["labels"]["accuracy"] >= 0.9, (name, m["labels"])
        assert sum(map(sum, m["labels"]["confusion_matrix"]["matrix"])) == table.num_rows
        logprobs = table.column(f"{name}__logprobs").to_pylist()
        choices = spec.sampling.structured.choice
        assert_probability_metrics_equal_the_file(m, truth, logprobs, choices)
        assert m["labels"]["probability"]["rows"] == table.num_rows
    # The same model, prompts and greedy sampling as the one-model job: the same labels.
    _, single, _ = results["reviews-sentiment.yaml"]
    assert (
        table.column("large__generated_text").to_pylist()
        == single.sort_by("row_id").column("generated_text").to_pylist()
    )
    # Two different candidates: the 2-layer model is not a copy of the 4-layer one.
    assert (
        table.column("small__logprobs").to_pylist() != table.column("large__logprobs").to_pylist()
    )


def test_synthetic_samples_carry_their_seed_columns(results):
    spec, table, _ = results["synthetic-reviews.yaml"]
    rows = table.to_pylist()
    by_seed: dict = {}
    for r in rows:
        by_seed.setdefault(r["seed_id"], []).append(r)
    for samples in by_seed.values():
        assert sorted(s["sample_index"] for s in samples) == list(range(spec.sampling.n))
        assert len({(s["product"], s["label"]) for s in samples}) == 1


def test_records_parse_into_typed_columns(results):
    _, table, _ = results["review-records.yaml"]
    for r in table.to_pylist():
        assert r["parsed"]["sentiment"] in ("positive", "negative", "neutral")
        assert isinstance(r["parsed"]["recommend"], bool)
