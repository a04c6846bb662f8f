"""Accumulators: partial states from batches merge exactly, in any split and order."""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pytest

from llm_batch import columns
from llm_batch.errors import JobSpecError
from llm_batch.pipeline.accumulators import (
    Accumulator,
    AccumulatorSet,
    BatchView,
    JobContext,
    LabelMetrics,
    Latency,
    label_probabilities,
)
from llm_batch.pipeline.rows import LOGPROBS_TYPE

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
    if any("logprobs" in r for r in rows):
        logprobs = pa.array([r.get("logprobs") for r in rows], LOGPROBS_TYPE)
        table = table.append_column(columns.LOGPROBS, logprobs)
    return BatchView(table, pa.array([r.get("latency") for r in rows], pa.float64()), None)


def step(generated: str, top: dict[str, float]) -> dict:
    """One generated step of the ``logprobs`` column: the token taken, and the top k."""
    listed = [{"token": t, "logprob": lp} for t, lp in top.items()]
    return {"token": generated, "logprob": top.get(generated, -9.0), "top_logprobs": listed}


def random_logprobs(rng: random.Random, label: str | None) -> tuple[str, list[dict]]:
    """A model's answer and its logprobs: a first step over the choices' words that
    leans to ``label`` (some words beyond the top k, a masked-out token now and then)."""
    weights = {c: rng.expovariate(1.0) * (4.0 if c == label else 1.0) for c in CHOICES}
    total = sum(weights.values())
    answer = max(weights, key=weights.__getitem__)
    top = {c: math.log(w / total) for c, w in weights.items() if c == answer or rng.random() < 0.8}
    if rng.random() < 0.1:
        top["<pad>"] = -math.inf  # what vLLM lists past the tokens the grammar allows
    return answer, [step(answer, top), step("</s>", {"</s>": 0.0})]


def random_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.05:
            rows.append({"error": "VLLMValidationError: too long", "label": rng.choice(CHOICES)})
            continue
        # Now and then a label the model cannot give (it is not a choice).
        label = "mixed" if rng.random() < 0.03 else rng.choice(CHOICES + (None,))
        answer, logprobs = random_logprobs(rng, label)
        rows.append(
            {
                "text": " " + answer,
                "logprobs": logprobs,
                "label": label,
                "in": rng.randint(3, 60),
                "out": rng.randint(1, 4),
                "finish": rng.choice(["stop", "length"]),
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


def probabilities(steps: list[dict], choices=CHOICES) -> dict[str, float]:
    got = label_probabilities(steps, choices)
    assert got is not None
    return {c: round(v, 12) for c, v in got.items()}


def test_probability_of_one_token_choices_is_renormalized_over_them():
    steps = [step("positive", {"positive": math.log(0.6), "neutral": math.log(0.3)})]
    assert probabilities(steps) == {
        "positive": 0.666666666667,
        "negative": 0.0,
        "neutral": 0.333333333333,
    }


def test_a_token_beginning_several_choices_is_split_by_the_next_step_when_taken():
    # How the tiny test models spell the labels: n-e-g..., n-e-utral, p-os-...
    steps = [
        step("n", {"n": math.log(0.6), "p": math.log(0.4)}),
        step("e", {"e": 0.0}),
        step(
            "gat",
            {
                "g": math.log(0.3),
                "gat": math.log(0.2),
                "utral": math.log(0.25),
                "u": math.log(0.05),
            },
        ),
    ]
    assert probabilities(steps) == {"positive": 0.4, "negative": 0.375, "neutral": 0.225}


def test_a_token_beginning_several_choices_not_taken_is_split_evenly():
    steps = [step("p", {"p": math.log(0.7), "n": math.log(0.3)}), step("os", {"os": 0.0})]
    assert probabilities(steps) == {"positive": 0.7, "negative": 0.15, "neutral": 0.15}


def test_a_whole_choice_that_begins_a_longer_one_ends_with_the_sequence():
    steps = [
        step("no", {"no": math.log(0.8), "yes": math.log(0.2)}),
        step("</s>", {"</s>": math.log(0.75), "ne": math.log(0.25)}),
    ]
    assert probabilities(steps, ("no", "none", "yes")) == {"no": 0.6, "none": 0.2, "yes": 0.2}


def test_the_generated_token_counts_beyond_the_top_k_and_leading_space_is_ignored():
    first = step(" neutral", {" positive": math.log(0.5), " negative": math.log(0.3)})
    first["logprob"] = math.log(0.1)  # ranked below the top 2, reported as the step's token
    assert probabilities([first]) == {
        "positive": 0.555555555556,
        "negative": 0.333333333333,
        "neutral": 0.111111111111,
    }


def test_nothing_to_score_without_a_listed_choice():
    assert label_probabilities(None, CHOICES) is None
    assert label_probabilities([], CHOICES) is None
    assert label_probabilities([step("<pad>", {"<pad>": 0.0, "x": -math.inf})], CHOICES) is None


def one_step(answer: str, probs: dict[str, float]) -> list[dict]:
    return [step(answer, {c: math.log(p) for c, p in probs.items()})]


def test_cross_entropy_and_roc_auc_by_hand():
    rows = [
        {
            "label": "positive",
            "logprobs": one_step("positive", {"positive": 0.8, "negative": 0.1, "neutral": 0.1}),
        },
        {
            "label": "negative",
            "logprobs": one_step("negative", {"positive": 0.3, "negative": 0.6, "neutral": 0.1}),
        },
        {
            "label": "neutral",
            "logprobs": one_step("positive", {"positive": 0.5, "negative": 0.25, "neutral": 0.25}),
        },
        # The true label is beyond the top k: p = 0, clipped to the floor.
        {"label": "positive", "logprobs": one_step("neutral", {"neutral": 0.7, "negative": 0.3})},
        {"label": "neutral", "error": "boom"},  # no logprobs: not scored
        {"label": None, "logprobs": one_step("positive", {"positive": 1.0})},  # no label
    ]
    for r in rows:
        r.setdefault("text", r.get("logprobs") and r["logprobs"][0]["token"])
    acc = AccumulatorSet(JobContext(label_column="label", choices=CHOICES))
    prob = acc.result(acc.update(batch(rows)))["labels"]["probability"]
    expected_ce = -(math.log(0.8) + math.log(0.6) + math.log(0.25) + math.log(1e-6)) / 4
    assert prob["cross_entropy"] == round(expected_ce, 6)
    # positive: positives score 0.8 and 1e-6, negatives 0.3 and 0.5 -> 2 of 4 pairs.
    # negative: 0.6 against 0.1, 0.25, 0.3 -> 3 of 3. neutral: 0.25 against 0.1, 0.1, 0.7.
    assert prob["roc_auc"]["per_class"] == {"negative": 1.0, "neutral": 0.666667, "positive": 0.5}
    assert prob["roc_auc"]["macro"] == round((1.0 + 2 / 3 + 0.5) / 3, 6)
    assert prob["roc_auc"]["max_rounding_error"] == 0.0
    assert (prob["rows"], prob["rows_unscored"], prob["rows_at_floor"]) == (4, 1, 1)
    assert prob["floor"] == 1e-6


def grid_point(p: float) -> int:
    """The documented score grid: log-odds of p clipped to [1e-6, 1 - 1e-6], in 0.001 nats."""
    p = min(max(p, 1e-6), 1 - 1e-6)
    return round((math.log(p) - math.log1p(-p)) / 1e-3)


def pairwise_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(positive scores higher) + P(tie) / 2, over every pair."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_probability_metrics_equal_a_reference_computation():
    rows = random_rows(1500, seed=3)
    acc = AccumulatorSet(JobContext(label_column="label", choices=CHOICES))
    prob = acc.result(acc.update(batch(rows)))["labels"]["probability"]
    scored = [
        (r["label"], label_probabilities(r["logprobs"], CHOICES))
        for r in rows
        if r.get("label") is not None and r.get("logprobs")
    ]
    truth = np.array([t for t, _ in scored])
    p = {c: np.array([s[c] for _, s in scored]) for c in CHOICES}
    p_true = np.array([s.get(t, 0.0) for t, s in scored])
    assert prob["rows"] == len(scored)
    assert prob["rows_at_floor"] == int((p_true < 1e-6).sum()) > 0
    assert prob["cross_entropy"] == round(float(np.mean(-np.log(np.maximum(p_true, 1e-6)))), 6)
    aucs = []
    for c in CHOICES:
        points = np.array([grid_point(v) for v in p[c]])
        on_grid = pairwise_auc(points[truth == c], points[truth != c])
        assert prob["roc_auc"]["per_class"][c] == round(on_grid, 6)
        raw = pairwise_auc(p[c][truth == c], p[c][truth != c])
        assert (
            abs(raw - prob["roc_auc"]["per_class"][c])
            <= prob["roc_auc"]["max_rounding_error"] + 1e-6
        )
        aucs.append(on_grid)
    assert prob["roc_auc"]["macro"] == round(float(np.mean([round(a, 6) for a in aucs])), 6)
    assert 0.6 < prob["roc_auc"]["macro"] < 1.0  # the answers lean to the label


def test_score_state_is_bounded_whatever_the_number_of_rows():
    rows = random_rows(4000, seed=4)
    # Certain answers: scores at both ends of the grid.
    rows += [
        {
            "label": "positive",
            "text": "positive",
            "logprobs": one_step("positive", {"positive": 1.0}),
        }
    ] * 50
    labels = LabelMetrics(JobContext(label_column="label", choices=CHOICES))
    state = labels.update(labels.empty(), batch(rows))["probability"]
    for side in ("positive", "negative"):
        for c in CHOICES:
            points = state[side][c]
            assert all(-13816 <= p <= 13816 for p in points)
    assert state["positive"]["positive"][13816] >= 50
    assert state["negative"]["neutral"][-13816] >= 50
    assert isinstance(state["nll"], int)  # summed exactly, in any order


def test_no_probability_part_without_logprobs_or_choices():
    rows = random_rows(40)
    plain = [{k: v for k, v in r.items() if k != "logprobs"} for r in rows]
    acc = AccumulatorSet(JobContext(label_column="label", choices=CHOICES))
    assert "probability" not in acc.result(acc.update(batch(plain)))["labels"]
    free_text = AccumulatorSet(JobContext(label_column="label"))
    assert "probability" not in free_text.result(free_text.update(batch(rows)))["labels"]


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
