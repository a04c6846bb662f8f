"""Labeling and synthetic data end to end, on the real vLLM CPU engine.

Two jobs, each run once for the module:
- a two-model labeling job (choice-constrained, with a label column and
  logprobs), whose per-model columns must equal each model's own
  ``LLM.generate`` output and whose merged accumulators (cross-entropy and
  ROC-AUC of the label's probability included) must equal the metrics
  recomputed from the file;
- a synthetic-data job: chat messages, a JSON schema parsed into a struct
  column, ``n=3`` samples per prompt, per-row sampling overrides, logprobs.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch import columns
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.accumulators import label_probabilities
from tests.pipeline.test_accumulators import grid_point, pairwise_auc

pytestmark = pytest.mark.e2e

CHOICES = ["positive", "negative", "neutral"]
ENGINE = {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True}


def _read(path: Path) -> pa.Table:
    return pads.dataset(str(path), format="parquet").to_table()


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, tiny_model, tiny_model_b, ray_local):
    from llm_batch.pipeline.run import run_job

    root = tmp_path_factory.mktemp("labels")
    n = 120
    words = ["great", "awful", "fine", "broken", "lovely", "meh"]
    table = pa.table(
        {
            "id": list(range(n)),
            "text": [f"the {words[i % 6]} thing number {i}" for i in range(n)],
            "label": [CHOICES[(i * 7) % 3] if i % 10 else None for i in range(n)],
        }
    )
    pq.write_table(table, root / "in.parquet")
    spec = JobSpec.from_dict(
        {
            "name": "two-models",
            "input": {"path": str(root / "in.parquet")},
            "prompt": {"template": "Review: {{ text }}\nSentiment:"},
            "models": [
                {"name": "small", "path": str(tiny_model), "engine": ENGINE, "batch_size": 32},
                {"name": "large", "path": str(tiny_model_b), "engine": ENGINE, "batch_size": 32},
            ],
            "sampling": {"max_tokens": 8, "structured": {"choice": CHOICES}, "logprobs": 5},
            "metrics": {"label_column": "label"},
            "carryover": ["id"],
            "output": {"path": str(root / "out")},
        }
    )
    snaps: list[dict] = []
    result = run_job(spec, on_progress=snaps.append, progress_interval=0.5)
    metrics = json.loads((root / "out" / "_metrics.json").read_text())
    return {
        "input": table,
        "out": _read(root / "out").sort_by("id"),
        "result": result,
        "metrics": metrics,
        "snaps": snaps,
    }


def test_two_models_each_equal_their_own_llm_generate(
    labeled, tiny_model, tiny_model_b, reference_engines
):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    out = labeled["out"]
    # row_id, the carryover, then the label column (written so metrics can be recomputed).
    assert out.column_names == ["row_id", "id", "label"] + [
        f"{m}__{c}" for m in ("small", "large") for c in (*columns.OUTPUT_COLUMNS, columns.LOGPROBS)
    ]
    assert out.num_rows == labeled["input"].num_rows
    prompts = [f"Review: {t}\nSentiment:" for t in labeled["input"].column("text").to_pylist()]
    params = SamplingParams(
        max_tokens=8, temperature=0.0, structured_outputs=StructuredOutputsParams(choice=CHOICES)
    )
    for name, path in (("small", tiny_model), ("large", tiny_model_b)):
        expected = [
            o.outputs[0].text
            for o in reference_engines(path).generate(prompts, params, use_tqdm=False)
        ]
        assert out.column(f"{name}__generated_text").to_pylist() == expected, name


def test_choice_constrained_labels_are_in_the_set(labeled):
    for name in ("small", "large"):
        labels = labeled["out"].column(f"{name}__generated_text").to_pylist()
        assert set(labels) <= set(CHOICES)


def recompute_labels(truth: list, pred: list) -> dict:
    pairs = [(t, p) for t, p in zip(truth, pred, strict=True) if t is not None]
    confusion = Counter(pairs)
    classes = sorted({t for t, _ in pairs} | ({p for _, p in pairs} & set(CHOICES)))
    per_class = {}
    for c in classes:
        tp = confusion[(c, c)]
        fp = sum(v for (t, p), v in confusion.items() if p == c and t != c)
        fn = sum(v for (t, p), v in confusion.items() if t == c and p != c)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[c] = {
            "precision": round(prec, 6),
            "recall": round(rec, 6),
            "f1": round(f1, 6),
            "support": tp + fn,
        }
    return {
        "rows": len(pairs),
        "accuracy": round(sum(t == p for t, p in pairs) / len(pairs), 6),
        "per_class": per_class,
        "matrix": [[confusion[(t, p)] for p in classes] for t in classes],
    }


def test_accumulators_equal_metrics_recomputed_from_the_output(labeled):
    out, metrics = labeled["out"], labeled["metrics"]
    truth = labeled["input"].sort_by("id").column("label").to_pylist()
    for name in ("small", "large"):
        m = metrics["metrics"][name]
        pred = [p.strip() for p in out.column(f"{name}__generated_text").to_pylist()]
        expected = recompute_labels(truth, pred)
        assert m["labels"]["rows"] == expected["rows"] == 108
        assert m["labels"]["accuracy"] == expected["accuracy"]
        assert m["labels"]["per_class"] == expected["per_class"]
        assert m["labels"]["confusion_matrix"]["matrix"] == expected["matrix"]
        usage = m["token_usage"]
        assert usage["rows"] == out.num_rows
        assert usage["input_tokens"] == sum(out.column(f"{name}__num_input_tokens").to_pylist())
        assert usage["output_tokens"] == sum(out.column(f"{name}__num_output_tokens").to_pylist())
        assert m["finish_reasons"] == dict(
            Counter(out.column(f"{name}__finish_reason").to_pylist())
        )
        assert m["errors"]["count"] == 0
        assert m["latency"]["count"] == out.num_rows
        assert 0 < m["latency"]["p50_s"] <= m["latency"]["p99_s"] <= m["latency"]["max_s"] * 1.02


def recompute_probability(truth: list, logprobs: list, choices: list[str]) -> dict:
    """Cross-entropy and ROC-AUC of the label's probability, from the output file's
    ``logprobs`` column in one pass: p from ``label_probabilities`` (the documented
    derivation, tested by hand in the unit tests), clipped at 1e-6; AUC over every
    (positive, negative) pair of grid-rounded scores, and of the raw scores."""
    rows = [
        (t, label_probabilities(lp, choices))
        for t, lp in zip(truth, logprobs, strict=True)
        if t is not None
    ]
    scored = [(t, p) for t, p in rows if p is not None]
    labels = np.array([t for t, _ in scored])
    p_true = np.array([p.get(t, 0.0) for t, p in scored])
    per_class, raw = {}, {}
    for c in sorted(choices):
        score = np.array([p[c] for _, p in scored])
        points = np.array([grid_point(v) for v in score])
        if (labels == c).any() and (labels != c).any():
            per_class[c] = round(pairwise_auc(points[labels == c], points[labels != c]), 6)
            raw[c] = pairwise_auc(score[labels == c], score[labels != c])
        else:
            per_class[c] = None
    defined = [v for v in per_class.values() if v is not None]
    return {
        "rows": len(scored),
        "rows_unscored": len(rows) - len(scored),
        "rows_at_floor": int((p_true < 1e-6).sum()),
        "cross_entropy": round(float(np.mean(-np.log(np.maximum(p_true, 1e-6)))), 6),
        "per_class": per_class,
        "macro": round(sum(defined) / len(defined), 6),
        "raw": raw,
    }


def assert_probability_metrics_equal_the_file(m: dict, truth: list, logprobs: list, choices):
    expected = recompute_probability(truth, logprobs, list(choices))
    got = m["labels"]["probability"]
    for key in ("rows", "rows_unscored", "rows_at_floor", "cross_entropy"):
        assert got[key] == expected[key], key
    assert got["roc_auc"]["per_class"] == expected["per_class"]
    assert got["roc_auc"]["macro"] == expected["macro"]
    bound = got["roc_auc"]["max_rounding_error"] + 1e-6
    for c, auc in expected["raw"].items():
        assert abs(auc - got["roc_auc"]["per_class"][c]) <= bound, c


def test_label_probability_metrics_equal_the_recompute_from_the_output(labeled):
    out, metrics = labeled["out"], labeled["metrics"]
    truth = out.column("label").to_pylist()
    for name in ("small", "large"):
        logprobs = out.column(f"{name}__logprobs").to_pylist()
        m = metrics["metrics"][name]
        assert_probability_metrics_equal_the_file(m, truth, logprobs, CHOICES)
        prob = m["labels"]["probability"]
        assert prob["rows"] == m["labels"]["rows"] == 108  # every labelled row scored
        assert prob["floor"] == 1e-6
        assert all(v is not None for v in prob["roc_auc"]["per_class"].values())


def test_metrics_are_reported_while_the_job_runs(labeled):
    live = [s for s in labeled["snaps"] if s["metrics"]]
    assert live, "no progress snapshot carried accumulator values"
    assert labeled["result"].progress["metrics"] == labeled["metrics"]["metrics"]


SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": CHOICES},
        "recommend": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["price", "quality"]}, "maxItems": 2},
    },
    "required": ["sentiment", "recommend", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tiny_model, ray_local):
    from llm_batch.pipeline.run import run_job

    root = tmp_path_factory.mktemp("synthetic")
    rows = [
        {"product": p, "overrides": json.dumps(o) if o is not None else None}
        for p, o in [
            ("kettle", None),
            ("lamp", {"temperature": 1.0, "seed": 7}),
            ("chair", {"max_tokens": 60}),
            ("desk", {"temperature": -2}),
            ("mug", None),
        ]
    ]
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = JobSpec.from_dict(
        {
            "name": "synthetic",
            "input": {"path": str(root / "in.jsonl")},
            "prompt": {
                "messages": [
                    {"role": "system", "content": "You write product reviews as JSON."},
                    {"role": "user", "content": "Review the {{ product }}."},
                ]
            },
            "model": {
                "path": str(tiny_model),
                "engine": {
                    **ENGINE,
                    "extra_args": {
                        "structured_outputs_config": {
                            "backend": "xgrammar",
                            "disable_any_whitespace": True,
                        }
                    },
                },
            },
            "sampling": {
                "max_tokens": 48,
                "temperature": 0.8,
                "seed": 1,
                "n": 3,
                "structured": {"json_schema": SCHEMA, "parse": True},
                "overrides_column": "overrides",
                "logprobs": 2,
            },
            "carryover": ["product"],
            "output": {"path": str(root / "out")},
        }
    )
    run_job(spec)
    return {
        "rows": rows,
        "out": _read(root / "out").sort_by(
            [("product", "ascending"), ("sample_index", "ascending")]
        ),
    }


def test_n_samples_give_n_rows_per_prompt(synthetic):
    out = synthetic["out"]
    assert out.column_names[:3] == ["row_id", "product", "sample_index"]
    counts = Counter(out.column("product").to_pylist())
    assert counts == {r["product"]: 3 for r in synthetic["rows"]}
    for product in counts:
        idx = [r["sample_index"] for r in out.to_pylist() if r["product"] == product]
        assert idx == [0, 1, 2]


def test_json_schema_outputs_parse_and_validate(synthetic):
    good = [r for r in synthetic["out"].to_pylist() if r["product"] != "desk"]
    assert good
    for r in good:
        if r["finish_reason"] == "length":  # cut short: must say so, not pretend
            assert "max_tokens" in r["error"]
            continue
        value = json.loads(r["generated_text"])
        jsonschema.validate(value, SCHEMA)
        assert r["parsed"] == {k: value.get(k) for k in ("sentiment", "recommend", "tags")}
        assert r["error"] is None
    parsed_type = synthetic["out"].schema.field("parsed").type
    assert pa.types.is_struct(parsed_type)
    assert parsed_type.field("recommend").type == pa.bool_()
    assert parsed_type.field("tags").type == pa.list_(pa.string())


def test_bad_row_override_is_an_error_row_naming_it(synthetic):
    desk = [r for r in synthetic["out"].to_pylist() if r["product"] == "desk"]
    assert len(desk) == 3
    for r in desk:
        assert r["generated_text"] is None
        assert r["error"].startswith("sampling override (overrides): temperature")


def test_samples_differ_and_logprobs_are_reported(synthetic):
    rows = synthetic["out"].to_pylist()
    kettle = [r["generated_text"] for r in rows if r["product"] == "kettle"]
    assert len(set(kettle)) > 1, "three samples at temperature 0.8 were all identical"
    for r in rows:
        if r["error"] is None:
            assert len(r["logprobs"]) == r["num_output_tokens"]
            assert all(len(step["top_logprobs"]) <= 2 for step in r["logprobs"])
