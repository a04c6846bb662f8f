"""Pooling models (model.task embed, classify, score) as pure logic: what a job may ask of
them and what it is refused, the engine arguments, their output columns (vectors into
Arrow whole) and the metrics a classifier's rows give. The real engine is in
tests/pipeline/test_pooling_e2e.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from llm_batch import columns
from llm_batch.errors import JobSpecError
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.accumulators import AccumulatorSet, BatchView, JobContext
from llm_batch.pipeline.engine_args import build_engine_args
from llm_batch.pipeline.generation import RowResult
from llm_batch.pipeline.prompts import PromptRenderer
from llm_batch.pipeline.rows import BatchFinisher, accumulator_view

BASE = {
    "input": {"path": "in.parquet"},
    "prompt": {"template": "{{ text }}"},
    "model": {"path": "m", "task": "embed"},
}


def job(**changes) -> JobSpec:
    return JobSpec.from_dict({**BASE, **changes})


def refused(**changes) -> str:
    with pytest.raises(JobSpecError) as e:
        job(**changes)
    return str(e.value)


def test_each_task_names_its_own_columns():
    assert job().output_columns() == ["embedding", "num_input_tokens", "error"]
    classify = job(model={"path": "m", "task": "classify"})
    assert classify.output_columns() == ["label", "probs", "num_input_tokens", "error"]
    score = job(model={"path": "m", "task": "score"}, prompt={"template": "a", "pair_column": "b"})
    assert score.output_columns() == ["score", "num_input_tokens", "error"]
    both = job(
        model=None,
        models=[{"name": "gen", "path": "m"}, {"name": "emb", "path": "m", "task": "embed"}],
    )
    assert both.output_columns()[-3:] == ["emb__embedding", "emb__num_input_tokens", "emb__error"]
    assert both.output_columns()[0] == "gen__generated_text"


def test_what_a_pooling_job_is_refused_names_the_field():
    assert refused(sampling={"max_tokens": 4}).startswith(
        "job is invalid: sampling: does not apply to pooling models (model.task is embed)"
    )
    assert "sampling.n" in refused(
        model=None,
        models=[{"name": "g", "path": "m"}, {"name": "e", "path": "m", "task": "embed"}],
        sampling={"n": 2},
    )
    assert "use prompt.template" in refused(
        prompt={"messages": [{"role": "user", "content": "{{ text }}"}]}
    )
    assert "prompt.template_pair" in refused(model={"path": "m", "task": "score"})
    assert "prompt.pair_column: only a model with task score" in refused(
        prompt={"template": "a", "pair_column": "b"}
    )
    assert "model: pooling: applies to task embed" in refused(
        model={"path": "m", "pooling": {"normalize": False}}
    )
    assert "not to classify" in refused(
        model={"path": "m", "task": "classify", "pooling": {"dimensions": 8}}
    )
    # The classifier's `label` beside an input label column of the same name.
    said = refused(model={"path": "m", "task": "classify"}, metrics={"label_column": "label"})
    assert "metrics.label_column: column 'label' clashes" in said
    assert "name the model" in said


def test_a_mixed_job_keeps_its_sampling_for_the_generator():
    spec = job(
        model=None,
        models=[{"name": "g", "path": "m"}, {"name": "e", "path": "m", "task": "embed"}],
        sampling={"max_tokens": 4},
    )
    assert spec.sampling.max_tokens == 4


def test_engine_args_run_vllms_pooling_runner(tmp_path):
    engine = {
        "dtype": "auto",
        "enforce_eager": True,
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "seed": 0,
    }
    embed = build_engine_args(
        {"path": "m", "task": "embed", "engine": engine, "pooling": {"pooling_type": "MEAN"}},
        on_cpu=False,
    )
    assert (embed["runner"], embed["convert"]) == ("pooling", "embed")
    assert embed["pooler_config"] == {"pooling_type": "MEAN"}
    assert "runner" not in build_engine_args({"path": "m", "engine": engine}, on_cpu=False)
    # A checkpoint that is a classifier already is taken as it is.
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForSequenceClassification"]})
    )
    classify = build_engine_args(
        {"path": str(tmp_path), "task": "classify", "engine": engine}, on_cpu=False
    )
    assert classify["convert"] == "auto"
    causal = build_engine_args({"path": "m", "task": "classify", "engine": engine}, on_cpu=False)
    assert causal["convert"] == "classify"


def test_embeddings_go_into_a_fixed_size_list_with_error_rows_null():
    batch = pa.table({"row_id": pa.array([0, 1, 2], pa.int64())})
    vectors = [np.arange(4, dtype=np.float32) + i for i in range(3)]
    results = [
        RowResult(embedding=vectors[0], input_tokens=3),
        RowResult.failed("too long"),
        RowResult(embedding=vectors[2], input_tokens=5),
    ]
    out, report = BatchFinisher({}, task="embed").finish(batch, results, dim=4)
    column = out.column("embedding")
    assert column.type == pa.list_(pa.float32(), 4)
    assert column.to_pylist() == [vectors[0].tolist(), None, vectors[2].tolist()]
    assert out.column("error").to_pylist() == [None, "too long", None]
    assert (report.rows, report.failed, report.input_tokens, report.output_tokens) == (3, 1, 8, 0)
    assert report.metrics["token_usage"]["input_tokens"] == 8
    # A batch of error rows only still has the engine's vector size.
    out, _ = BatchFinisher({}, task="embed").finish(batch, [RowResult.failed("x")] * 3, dim=4)
    assert out.column("embedding").type == pa.list_(pa.float32(), 4)


def test_a_classifiers_label_and_probabilities_score_against_the_truth():
    labels = ["positive", "negative"]
    batch = pa.table({"row_id": [0, 1, 2, 3], "truth": ["positive", "negative", "negative", None]})
    probs = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.5, 0.5]]
    results = [
        RowResult(probs=np.array(p, np.float32), label=labels[int(np.argmax(p))], input_tokens=2)
        for p in probs
    ]
    finisher = BatchFinisher(
        {}, task="classify", model_name="clf", metrics={"label_column": "truth"}
    )
    out, report = finisher.finish(batch, results, labels=labels)
    assert out.column("clf__label").to_pylist() == ["positive", "negative", "positive", "positive"]
    assert out.column("clf__probs").type == pa.list_(pa.float32())
    assert out.column("clf__probs").to_pylist()[1] == pytest.approx([0.2, 0.8])
    # The tracker's side knows no labels: it merges and reports from the state alone.
    tracker = AccumulatorSet(JobContext(label_column="truth"))
    metrics = tracker.result(tracker.merge(None, report.metrics))["labels"]
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    probability = metrics["probability"]
    assert probability["source"] == "the classifier's class probabilities"
    expected = -(np.log(0.9) + np.log(0.8) + np.log(0.3)) / 3
    assert probability["cross_entropy"] == pytest.approx(expected, abs=1e-5)
    assert probability["roc_auc"]["per_class"]["positive"] == 1.0


def test_a_score_and_an_embedders_rows_carry_no_label_metrics():
    batch = pa.table({"row_id": [0, 1], "truth": ["a", "b"]})
    finisher = BatchFinisher({}, task="score", metrics={"label_column": "truth"})
    out, report = finisher.finish(
        batch, [RowResult(score=0.5, input_tokens=4), RowResult(score=-0.25, input_tokens=4)]
    )
    assert out.column("score").type == pa.float32()
    assert out.column("score").to_pylist() == [0.5, -0.25]
    assert "labels" not in report.metrics
    # A job-wide set with label metrics (another model's) merges and reports this one.
    tracker = AccumulatorSet(JobContext(label_column="truth"))
    assert "labels" not in tracker.result(tracker.merge(None, report.metrics))


def test_the_view_of_a_classifier_reads_its_label_as_the_prediction():
    plain = pa.table(
        {
            "label": ["a", None],
            "probs": pa.array([[1.0, 0.0], None], pa.list_(pa.float32())),
            "num_input_tokens": pa.array([3, None], pa.int32()),
            "error": [None, "bad"],
        }
    )
    view = accumulator_view(plain, "classify")
    assert view.column(columns.GENERATED_TEXT).to_pylist() == ["a", None]
    assert view.column(columns.NUM_OUTPUT_TOKENS).to_pylist() == [0, 0]
    sets = AccumulatorSet(JobContext())
    assert sets.update(BatchView(view, pa.nulls(2, pa.float64()), None))["errors"]["count"] == 1


def test_a_pair_renders_from_its_template_or_its_column():
    batch = pa.table({"q": ["a", "b"], "d": ["x", None], "row_id": [0, 1]})
    out = PromptRenderer({"template": "{{ q }}", "template_pair": "doc: {{ d }}"})(batch)
    assert out.column(columns.PAIR).to_pylist() == ["doc: x", "doc: None"]
    out = PromptRenderer({"template": "{{ q }}", "pair_column": "d"})(batch)
    assert out.column(columns.PAIR).to_pylist() == ["x", None]
    assert out.column(columns.RENDER_ERROR).to_pylist() == [
        None,
        "prompt.pair_column 'd': the value is null",
    ]
    assert PromptRenderer({"template": "{{ q }}", "pair_column": "d"}).variables == {"q", "d"}


def test_a_stored_pooling_spec_loads_again():
    """The service stores a spec as its full dump (the default sampling block spelled out)
    and its scheduler reads it back: a pooling job must survive that."""
    spec = job(model={"path": "m", "task": "classify"})
    again = JobSpec.from_dict(spec.model_dump(mode="json"))
    assert again == spec
    assert refused(sampling={"temperature": 0.5}).startswith("job is invalid: sampling:")
