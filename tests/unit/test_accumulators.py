"""Accumulators: partial states from batches merge exactly, in any split and order."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from llm_batch import columns
from llm_batch.errors import JobSpecError
from llm_batch.pipeline.accumulators import (
    Accumulator,
    AccumulatorSet,
    BatchView,
    JobContext,
    Latency,
)

CHOICES = ("positive", "negative", "neutral")


def batch(rows: list[dict]) -> BatchView:
    table = pa.table(
        {
            columns.GENERATED_TEXT: pa.array([r.get("text") for r in rows], pa.string()),
            columns.NUM_INPUT_TOKENS: pa.array([r.get("in") for r in rows], pa.int32()),
            columns.NUM_OUTPUT_TOKENS: pa.array([r.get("out") for r in rows], pa.int32()),
            columns.FINISH_REASON: pa.array([r.get("finish") for r in rows], pa.string()),
            columns.ERROR: pa.array([r.get("error") for r in rows], pa.string()),
            "label": pa.array([r.get("label") for r in rows], pa.string()),
        }
    )
    return BatchView(table, pa.array([r.get("latency") for r in rows], pa.float64()), None)


def random_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.05:
            rows.append({"error": "VLLMValidationError: too long", "label": rng.choice(CHOICES)})
            continue
        rows.append(
            {
                "text": " " + rng.choice(CHOICES),
                "in": rng.randint(3, 60),
                "out": rng.randint(1, 4),
                "finish": rng.choice(["stop", "length"]),
                "label": rng.choice(CHOICES + (None,)),
                "latency": rng.uniform(0.01, 2.0),
            }
        )
    return rows


def test_merge_is_exact_whatever_the_split():
    rows = random_rows(500)
    acc = AccumulatorSet(JobContext(label_column="label", choices=CHOICES))
    whole = acc.result(acc.update(batch(rows)))
    for seed in range(3):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(rows)), 7))
        parts = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True)]
        rng.shuffle(parts)
        state = None
        for p in parts:
            state = acc.merge(state, acc.update(batch(p)))
        assert acc.result(state) == whole


def test_label_metrics_by_hand():
    rows = [
        {"text": "positive", "label": "positive", "latency": 0.1},
        {"text": " positive", "label": "negative", "latency": 0.1},
        {"text": "negative", "label": "negative", "latency": 0.1},
        {"text": "neutral", "label": None, "latency": 0.1},
        {"error": "boom", "label": "neutral"},
    ]
    acc = AccumulatorSet(JobContext(label_column="label", choices=CHOICES))
    result = acc.result(acc.update(batch(rows)))
    labels = result["labels"]
    assert labels["rows"] == 4  # the unlabeled row is not counted
    assert labels["accuracy"] == 0.5
    assert labels["per_class"]["positive"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": 0.666667,
        "support": 1,
    }
    assert labels["per_class"]["negative"]["recall"] == 0.5
    cm = labels["confusion_matrix"]
    assert cm["labels"] == ["negative", "neutral", "positive"]
    assert cm["predicted"] == ["negative", "neutral", "positive", "(empty or error)"]
    assert cm["matrix"] == [[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    assert result["errors"] == {"count": 1, "samples": ["boom"]}
    assert result["token_usage"]["rows"] == 5


def test_latency_percentiles_within_one_bin():
    values = [i / 1000 for i in range(1, 1001)]
    lat = Latency(JobContext())
    state = lat.update(lat.empty(), batch([{"latency": v} for v in values]))
    result = lat.result(state)
    assert result["count"] == 1000
    assert result["p50_s"] == pytest.approx(0.5, rel=0.02)
    assert result["p99_s"] == pytest.approx(0.99, rel=0.02)
    assert result["max_s"] == 1.0


def test_no_label_column_no_label_metrics():
    acc = AccumulatorSet(JobContext())
    assert "labels" not in acc.result(acc.update(batch(random_rows(10))))


class RowsOver10Tokens(Accumulator[int]):
    name = "long_inputs"

    def empty(self) -> int:
        return 0

    def update(self, state: int, batch: BatchView) -> int:
        return state + sum(
            1 for v in batch.table.column("num_input_tokens").to_pylist() if v and v > 10
        )

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, state: int) -> int:
        return state


def test_user_accumulator_by_import_path():
    acc = AccumulatorSet(JobContext(), [f"{__name__}:RowsOver10Tokens"])
    rows = random_rows(50)
    expected = sum(1 for r in rows if (r.get("in") or 0) > 10)
    assert acc.result(acc.update(batch(rows)))["long_inputs"] == expected


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("nomodule", "not of the form module:ClassName"),
        ("no.such.module:X", "cannot import"),
        (f"{__name__}:CHOICES", "not an Accumulator subclass"),
    ],
)
def test_bad_accumulator_paths(path, needle):
    with pytest.raises(JobSpecError, match=needle):
        AccumulatorSet(JobContext(), [path])
