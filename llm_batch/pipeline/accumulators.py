"""Accumulators: metrics updated per batch inside the engine actors and merged across them.

Each engine actor computes a *partial state* from each batch it finishes and
sends it to the job's tracker, which merges partials as they arrive. States
are small and merging is exact (counts add), so the merged numbers equal what
recomputing them from the output file gives, without a second pass over the
data. ``result`` turns a state into JSON-ready values; the tracker reports them
while the job runs, and the driver writes them to ``_metrics.json`` at the end.

Write your own by subclassing :class:`Accumulator` and naming it in the job
file (``metrics.accumulators: ["mypkg.metrics:MyAccumulator"]``).

An accumulator sees a :class:`BatchView`: one model's output for one batch,
with the plain column names (``generated_text``, ``finish_reason``, ...,
``logprobs`` when the job asks for them), the label column when the job names
one, and each row's generation latency.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from llm_batch import columns
from llm_batch.errors import JobSpecError

__all__ = [
    "Accumulator",
    "AccumulatorSet",
    "BatchView",
    "ErrorCount",
    "FinishReasons",
    "JobContext",
    "LabelMetrics",
    "Latency",
    "TokenUsage",
    "label_probabilities",
    "load_accumulator",
    "predicted_label",
]

S = TypeVar("S")


@dataclasses.dataclass(frozen=True)
class JobContext:
    """What an accumulator may need to know about the job (plain, picklable)."""

    label_column: str | None = None
    choices: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class BatchView:
    table: pa.Table  # plain output column names, plus the label column when set
    latency_s: pa.Array  # float64 seconds per row, null for rows never sent to the engine
    model: str | None


class Accumulator(abc.ABC, Generic[S]):
    name: ClassVar[str]

    def __init__(self, job: JobContext):
        self.job = job

    def enabled(self) -> bool:
        """False when the job lacks what this metric needs (a label column, say)."""
        return True

    @abc.abstractmethod
    def empty(self) -> S: ...

    @abc.abstractmethod
    def update(self, state: S, batch: BatchView) -> S: ...

    @abc.abstractmethod
    def merge(self, a: S, b: S) -> S: ...

    @abc.abstractmethod
    def result(self, state: S) -> Any: ...


def _count(arr: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    vc = pc.value_counts(arr)
    return {
        str(v["values"]) if v["values"] is not None else "null": int(v["counts"])
        for v in vc.to_pylist()
    }


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


class TokenUsage(Accumulator[dict[str, int]]):
    name = "token_usage"

    def empty(self) -> dict[str, int]:
        return {"rows": 0, "input_tokens": 0, "output_tokens": 0}

    def update(self, state: dict[str, int], batch: BatchView) -> dict[str, int]:
        t = batch.table
        return self.merge(
            state,
            {
                "rows": t.num_rows,
                "input_tokens": int(pc.sum(t.column(columns.NUM_INPUT_TOKENS)).as_py() or 0),
                "output_tokens": int(pc.sum(t.column(columns.NUM_OUTPUT_TOKENS)).as_py() or 0),
            },
        )

    def merge(self, a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return _add(a, b)

    def result(self, state: dict[str, int]) -> dict[str, int]:
        return {**state, "total_tokens": state["input_tokens"] + state["output_tokens"]}


class FinishReasons(Accumulator[dict[str, int]]):
    name = "finish_reasons"

    def empty(self) -> dict[str, int]:
        return {}

    def update(self, state: dict[str, int], batch: BatchView) -> dict[str, int]:
        col = batch.table.column(columns.FINISH_REASON)
        return _add(state, _count(col.filter(pc.is_valid(col))))

    def merge(self, a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return _add(a, b)

    def result(self, state: dict[str, int]) -> dict[str, int]:
        return dict(sorted(state.items()))


class ErrorCount(Accumulator[dict[str, Any]]):
    """Rows with an error, and the first few distinct messages (for a quick look)."""

    name = "errors"
    SAMPLES = 5

    def empty(self) -> dict[str, Any]:
        return {"count": 0, "samples": []}

    def update(self, state: dict[str, Any], batch: BatchView) -> dict[str, Any]:
        col = batch.table.column(columns.ERROR)
        errors = col.filter(pc.is_valid(col))
        samples = [e[:300] for e in pc.unique(errors).to_pylist()[: self.SAMPLES]]
        return self.merge(state, {"count": len(errors), "samples": samples})

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        samples = list(a["samples"])
        for s in b["samples"]:
            if len(samples) < self.SAMPLES and s not in samples:
                samples.append(s)
        return {"count": a["count"] + b["count"], "samples": samples}

    def result(self, state: dict[str, Any]) -> dict[str, Any]:
        return state


class Latency(Accumulator[dict[str, Any]]):
    """Generation latency per row, in a log-scale histogram (bins 2% wide).

    Percentiles are read off the histogram, so they are exact to within one bin
    (±1%) whatever the number of rows; merging histograms is exact.
    """

    name = "latency"
    _BASE = 1.02
    _MIN = 1e-4  # seconds; anything faster lands in bin 0

    def empty(self) -> dict[str, Any]:
        return {"bins": {}, "count": 0, "sum": 0.0, "max": 0.0}

    def _bin(self, seconds: float) -> int:
        return 0 if seconds <= self._MIN else int(math.log(seconds / self._MIN, self._BASE)) + 1

    def update(self, state: dict[str, Any], batch: BatchView) -> dict[str, Any]:
        values = [v for v in batch.latency_s.to_pylist() if v is not None]
        bins = Counter(str(self._bin(v)) for v in values)
        part = {
            "bins": dict(bins),
            "count": len(values),
            "sum": float(sum(values)),
            "max": max(values, default=0.0),
        }
        return self.merge(state, part)

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {
            "bins": _add(a["bins"], b["bins"]),
            "count": a["count"] + b["count"],
            "sum": a["sum"] + b["sum"],
            "max": max(a["max"], b["max"]),
        }

    def _percentile(self, state: dict[str, Any], q: float) -> float | None:
        if not state["count"]:
            return None
        rank = q * state["count"]
        seen = 0
        for b in sorted(state["bins"], key=int):
            seen += state["bins"][b]
            if seen >= rank:
                i = int(b)
                return round(self._MIN * self._BASE ** max(i - 0.5, 0), 6)
        return state["max"]

    def result(self, state: dict[str, Any]) -> dict[str, Any]:
        n = state["count"]
        return {
            "count": n,
            "mean_s": round(state["sum"] / n, 6) if n else None,
            "p50_s": self._percentile(state, 0.50),
            "p90_s": self._percentile(state, 0.90),
            "p99_s": self._percentile(state, 0.99),
            "max_s": round(state["max"], 6) if n else None,
        }


def predicted_label(
    generated: pa.ChunkedArray | pa.Array, error: pa.ChunkedArray | pa.Array | None = None
) -> pa.Array:
    """The label a row predicts: its generated text, stripped; null for an error row, whose
    text (a structured output cut at max_tokens, kept for inspection) is no prediction."""
    label = pc.utf8_trim_whitespace(generated)
    if error is None:
        return label
    return pc.if_else(pc.is_valid(error), pa.scalar(None, pa.string()), label)


def _alternatives(step: dict[str, Any]) -> list[tuple[str, float]]:
    """(token, probability) of one generated step's listed tokens: its top k, and the
    generated token, which vLLM reports even when it is outside the top k."""
    listed = [(e["token"], e["logprob"]) for e in step.get("top_logprobs") or ()]
    generated = (step.get("token"), step.get("logprob"))
    if generated not in listed:
        listed.append(generated)
    # -inf: a token the grammar masked out; NaN compares false and is dropped too.
    return [
        (t, math.exp(lp)) for t, lp in listed if t is not None and lp is not None and lp > -math.inf
    ]


def _split(
    steps: list[dict[str, Any]], i: int, prefix: str, candidates: list[str]
) -> dict[str, float] | None:
    """How step ``i`` (spelled ``prefix`` so far) shares its probability among the
    candidate choices that begin with ``prefix``; None when no listed token fits one."""
    if i >= len(steps) or steps[i] is None:
        return None
    mass = dict.fromkeys(candidates, 0.0)
    seen = 0.0
    generated = steps[i].get("token")
    for token, p in _alternatives(steps[i]):
        spelled = (prefix + token).lstrip()
        fits = [c for c in candidates if c.startswith(spelled)]
        if not fits:
            if prefix not in mass:
                continue
            # The grammar lets only the end of the sequence follow a whole choice
            # ("no" when "none" is a choice too): that token is the shorter choice's.
            fits = [prefix]
        seen += p
        if len(fits) == 1:
            mass[fits[0]] += p
            continue
        # A token that begins several choices ("ne" of negative and neutral): the next
        # step splits it when the model took it; a path not taken has no next step to
        # read, so it is split evenly.
        share = _split(steps, i + 1, spelled, fits) if token == generated else None
        for c in fits:
            mass[c] += p * (share[c] if share is not None else 1 / len(fits))
    if seen == 0.0:
        return None
    return {c: m / seen for c, m in mass.items()}


def label_probabilities(
    logprobs: list[dict[str, Any]] | None, choices: Sequence[str]
) -> dict[str, float] | None:
    """Each choice's probability for one row, from its ``logprobs`` column (OpenAI's shape).

    vLLM's default ``logprobs_mode`` (``raw_logprobs``) reports the log-softmax of
    the logits after the structured-output grammar has masked them and before
    temperature and top-p: at the first generated step, the tokens listed are the
    model's own probabilities of the ways to begin an allowed choice. A listed
    token that begins one choice only gives it its probability; one that begins
    several is split by the next step when it is the token generated, evenly when
    not. The sums are renormalised over the choices, which spreads the mass of the
    tokens beyond the top k in proportion (and gives the same numbers from
    ``raw_logits``); a choice none of whose tokens is listed gets 0. Text is
    compared without leading whitespace, as :func:`predicted_label` strips it.

    None when no listed token begins a choice (an error row, logprobs missing).
    """
    if not logprobs or not choices:
        return None
    return _split(logprobs, 0, "", list(choices))


class _LabelScores:
    """Cross-entropy and one-vs-rest ROC-AUC of the label's probability (a part of
    :class:`LabelMetrics` for choice-constrained jobs that ask for logprobs).

    The state is bounded whatever the number of rows: the cross-entropy sum is an
    integer of 2**-52 nats (integer sums come out the same in any order, float sums
    do not), and ROC-AUC keeps, per choice, how many rows of that label and of any
    other fall on each point of a grid of the choice's log-odds (``STEP`` nats wide
    between the log-odds of ``FLOOR`` and ``1 - FLOOR``: at most 27,633 points).
    Scores on one grid point are ties, so the AUC is the exact AUC of the scores
    rounded to the grid; ``max_rounding_error`` bounds its distance from the AUC
    of the unrounded scores (it counts every tie, true ties included).
    """

    FLOOR = 1e-6  # p(true label) is clipped to at least this (cross-entropy <= 13.8 nats)
    STEP = 1e-3  # the ROC-AUC score grid, in nats of log-odds
    _UNIT = 2**52  # the cross-entropy sum is kept in these integer units per nat

    def __init__(self, choices: Sequence[str]):
        self.choices = tuple(choices)
        # Steps read per row: a token spells at least one character, and one more
        # step tells a whole choice from a longer one.
        self._depth = max(len(c) for c in self.choices) + 1
        self._top = round(math.log((1 - self.FLOOR) / self.FLOOR) / self.STEP)

    LOGPROBS_SOURCE = "first generated tokens' logprobs, renormalized over the choices"
    PROBS_SOURCE = "the classifier's class probabilities"

    def empty(self) -> dict[str, Any]:
        return {
            "rows": 0,
            "unscored": 0,
            "at_floor": 0,
            "nll": 0,
            "positive": {c: {} for c in self.choices},
            "negative": {c: {} for c in self.choices},
            "source": None,
        }

    def from_logprobs(self, logprobs: pa.ChunkedArray) -> list[dict[str, float] | None]:
        """Each row's choice probabilities from its ``logprobs`` (see label_probabilities)."""
        steps = pc.list_slice(logprobs, 0, self._depth).to_pylist()
        return [label_probabilities(row, self.choices) for row in steps]

    def from_probs(self, probs: pa.ChunkedArray) -> list[dict[str, float] | None]:
        """Each row's class probabilities from a classifier's ``probs`` (label order)."""
        return [
            None if row is None else dict(zip(self.choices, row, strict=False))
            for row in probs.to_pylist()
        ]

    def _point(self, p: float) -> int:
        """The grid point of a probability: its log-odds over ``STEP``, rounded."""
        if p <= self.FLOOR:
            return -self._top
        if p >= 1 - self.FLOOR:
            return self._top
        return round((math.log(p) - math.log1p(-p)) / self.STEP)

    def update(
        self,
        state: dict[str, Any],
        truth: list[str | None],
        rows: list[dict[str, float] | None],
        *,
        source: str,
    ) -> dict[str, Any]:
        part = self.empty()
        part["source"] = source
        positive = {c: Counter[int]() for c in self.choices}
        negative = {c: Counter[int]() for c in self.choices}
        for label, probs in zip(truth, rows, strict=True):
            if label is None:
                continue
            if probs is None:
                part["unscored"] += 1
                continue
            part["rows"] += 1
            p = probs.get(label, 0.0)  # a label outside the choices: the model cannot say it
            if p < self.FLOOR:
                part["at_floor"] += 1
            part["nll"] += round(-math.log(max(p, self.FLOOR)) * self._UNIT)
            for c, prob in probs.items():
                (positive if c == label else negative)[c][self._point(prob)] += 1
        part["positive"] = {c: dict(v) for c, v in positive.items()}
        part["negative"] = {c: dict(v) for c, v in negative.items()}
        return self.merge(state, part)

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {k: a[k] + b[k] for k in ("rows", "unscored", "at_floor", "nll")}
        for side in ("positive", "negative"):
            out[side] = {c: _add(a[side][c], b[side][c]) for c in self.choices}
        out["source"] = a.get("source") or b.get("source")
        return out

    @staticmethod
    def _auc(positive: dict[int, int], negative: dict[int, int]) -> tuple[float, float] | None:
        """(AUC, bound on its rounding error) from grid counts; None without both sides.

        AUC = P(score of a positive > score of a negative) + P(tie) / 2, counted in
        integers over the grid points in order, so it is exact.
        """
        n_pos, n_neg = sum(positive.values()), sum(negative.values())
        if not n_pos or not n_neg:
            return None
        below = twice_wins = ties = 0
        for point in sorted(positive.keys() | negative.keys()):
            pos, neg = positive.get(point, 0), negative.get(point, 0)
            twice_wins += pos * (2 * below + neg)
            ties += pos * neg
            below += neg
        pairs = n_pos * n_neg
        return twice_wins / (2 * pairs), ties / (2 * pairs)

    def result(self, state: dict[str, Any]) -> dict[str, Any]:
        n = state["rows"]
        per_class: dict[str, float | None] = {}
        error = 0.0
        for c in sorted(self.choices):
            auc = self._auc(state["positive"][c], state["negative"][c])
            per_class[c] = None if auc is None else round(auc[0], 6)
            if auc is not None:
                error = max(error, auc[1])
        scored = [v for v in per_class.values() if v is not None]
        return {
            "rows": n,
            "rows_unscored": state["unscored"],
            "cross_entropy": round(state["nll"] / self._UNIT / n, 6) if n else None,
            "roc_auc": {
                "per_class": per_class,
                "macro": round(sum(scored) / len(scored), 6) if scored else None,
                "score_step": self.STEP,
                "max_rounding_error": round(error, 6),
            },
            "floor": self.FLOOR,
            "rows_at_floor": state["at_floor"],
            "source": state.get("source") or self.LOGPROBS_SOURCE,
        }


class LabelMetrics(Accumulator[dict[str, Any]]):
    """Accuracy, per-class precision/recall/F1 and the confusion matrix against the label column;
    with a choice list and ``sampling.logprobs``, cross-entropy and ROC-AUC of the label's
    probability too (``probability``; see :func:`label_probabilities` and :class:`_LabelScores`).

    The state is the confusion matrix itself (``"true\\x1fpredicted" -> count``),
    from which everything else but the probability part is derived, and that
    part's own state. Rows without a label are not counted; rows with an error
    count as predicting null (a miss) and, having no logprobs, are not scored.
    """

    name = "labels"
    _SEP = "\x1f"

    def __init__(self, job: JobContext):
        super().__init__(job)
        self._scores = _LabelScores(job.choices) if job.choices else None

    def enabled(self) -> bool:
        return self.job.label_column is not None

    def empty(self) -> dict[str, Any]:
        return {
            "confusion": {},
            "probability": self._scores.empty() if self._scores is not None else None,
        }

    def update(self, state: dict[str, Any], batch: BatchView) -> dict[str, Any]:
        assert self.job.label_column is not None
        truth = batch.table.column(self.job.label_column).cast(pa.string())
        pred = predicted_label(
            batch.table.column(columns.GENERATED_TEXT), batch.table.column(columns.ERROR)
        )
        pairs = pa.table({"t": truth, "p": pred}).filter(pc.is_valid(truth))
        counts = pairs.group_by(["t", "p"], use_threads=False).aggregate([([], "count_all")])
        part = {
            f"{t}{self._SEP}{'' if p is None else p}": int(c)
            for t, p, c in zip(
                counts.column("t").to_pylist(),
                counts.column("p").to_pylist(),
                counts.column("count_all").to_pylist(),
                strict=True,
            )
        }
        probability = state["probability"]
        names = batch.table.column_names
        # A classifier's probabilities, or a choice job's logprobs; neither: a job without
        # sampling.logprobs, or rows read back on resume without them.
        scored = columns.PROBS if columns.PROBS in names else columns.LOGPROBS
        if self._scores is not None and scored in names:
            # An error row is not scored (a cut output's logprobs are no answer).
            values = batch.table.column(scored)
            values = pc.if_else(
                pc.is_valid(batch.table.column(columns.ERROR)),
                pa.scalar(None, values.type),
                values,
            )
            if scored == columns.PROBS:
                rows, source = self._scores.from_probs(values), _LabelScores.PROBS_SOURCE
            else:
                rows, source = self._scores.from_logprobs(values), _LabelScores.LOGPROBS_SOURCE
            probability = self._scores.update(probability, truth.to_pylist(), rows, source=source)
        return {"confusion": _add(state["confusion"], part), "probability": probability}

    def _scores_of(self, probability: dict[str, Any] | None) -> _LabelScores | None:
        """The scorer of a probability state: the job's choices, else (a classifier's labels,
        which only its engine knows) the state's own."""
        if self._scores is not None or probability is None:
            return self._scores
        return _LabelScores(tuple(probability["positive"]))

    def merge(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        probability = a["probability"] if b["probability"] is None else b["probability"]
        if a["probability"] is not None and b["probability"] is not None:
            scores = self._scores_of(a["probability"])
            assert scores is not None
            probability = scores.merge(a["probability"], b["probability"])
        return {"confusion": _add(a["confusion"], b["confusion"]), "probability": probability}

    def result(self, state: dict[str, Any]) -> dict[str, Any]:
        confusion: dict[str, int] = state["confusion"]
        cells = {tuple(k.split(self._SEP, 1)): v for k, v in confusion.items()}
        truths = {t for t, _ in cells}
        preds = {p for _, p in cells}
        classes = sorted(truths | (set(self.job.choices or ()) & preds) | (truths & preds))
        # Predictions outside the classes (free text, errors) get their own column.
        other = sorted(p for p in preds if p not in classes)
        total = sum(confusion.values())
        correct = sum(v for (t, p), v in cells.items() if t == p)
        per_class = {}
        for c in classes:
            tp = cells.get((c, c), 0)
            fp = sum(v for (t, p), v in cells.items() if p == c and t != c)
            fn = sum(v for (t, p), v in cells.items() if t == c and p != c)
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_class[c] = {
                "precision": round(precision, 6),
                "recall": round(recall, 6),
                "f1": round(f1, 6),
                "support": tp + fn,
            }
        columns_ = classes + other
        out: dict[str, Any] = {
            "rows": total,
            "accuracy": round(correct / total, 6) if total else None,
            "macro_f1": round(sum(m["f1"] for m in per_class.values()) / len(per_class), 6)
            if per_class
            else None,
            "per_class": per_class,
            "confusion_matrix": {
                "labels": classes,
                "predicted": [p if p else "(empty or error)" for p in columns_],
                "matrix": [[cells.get((t, p), 0) for p in columns_] for t in classes],
            },
        }
        probability = state["probability"]
        scores = self._scores_of(probability)
        if scores is not None and probability and probability["rows"] + probability["unscored"]:
            out["probability"] = scores.result(probability)
        return out


BUILTIN: tuple[type[Accumulator[Any]], ...] = (
    TokenUsage,
    FinishReasons,
    ErrorCount,
    Latency,
    LabelMetrics,
)


def load_accumulator(path: str) -> type[Accumulator[Any]]:
    """Import ``package.module:ClassName``; errors name the field."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise JobSpecError(f"metrics.accumulators: {path!r} is not of the form module:ClassName")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise JobSpecError(f"metrics.accumulators: cannot import {path!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Accumulator)):
        raise JobSpecError(f"metrics.accumulators: {path!r} is not an Accumulator subclass")
    return cls


class AccumulatorSet:
    """The job's accumulators, per model: ``{model: {name: state}}``."""

    def __init__(self, job: JobContext, custom: list[str] | tuple[str, ...] = ()):
        classes = list(BUILTIN) + [load_accumulator(p) for p in custom]
        self.accumulators = [a for a in (cls(job) for cls in classes) if a.enabled()]
        names = [a.name for a in self.accumulators]
        if len(set(names)) != len(names):
            raise JobSpecError(f"metrics.accumulators: two accumulators share a name: {names}")

    def update(self, batch: BatchView) -> dict[str, Any]:
        """A partial state from one batch."""
        return {a.name: a.update(a.empty(), batch) for a in self.accumulators}

    # A model's batches carry the accumulators that apply to it (an embedder's no labels).
    def merge(self, a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
        if a is None:
            return b
        return {
            acc.name: acc.merge(a[acc.name], b[acc.name])
            for acc in self.accumulators
            if acc.name in a and acc.name in b
        }

    def result(self, state: dict[str, Any]) -> dict[str, Any]:
        return {
            acc.name: acc.result(state[acc.name]) for acc in self.accumulators if acc.name in state
        }
