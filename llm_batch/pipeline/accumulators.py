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
with the plain column names (``generated_text``, ``finish_reason``, ...), the
label column when the job names one, and each row's generation latency.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import math
from collections import Counter
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


def predicted_label(generated: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The label a row predicts: its generated text, stripped (null for error rows)."""
    return pc.utf8_trim_whitespace(generated)


class LabelMetrics(Accumulator[dict[str, int]]):
    """Accuracy, per-class precision/recall/F1 and the confusion matrix against the label column.

    The state is the confusion matrix itself (``"true\\x1fpredicted" -> count``);
    everything else is derived from it. Rows without a label are not counted;
    rows with an error count as predicting null (a miss).
    """

    name = "labels"
    _SEP = "\x1f"

    def enabled(self) -> bool:
        return self.job.label_column is not None

    def empty(self) -> dict[str, int]:
        return {}

    def update(self, state: dict[str, int], batch: BatchView) -> dict[str, int]:
        truth = batch.table.column(self.job.label_column).cast(pa.string())
        pred = predicted_label(batch.table.column(columns.GENERATED_TEXT))
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
        return _add(state, part)

    def merge(self, a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return _add(a, b)

    def result(self, state: dict[str, int]) -> dict[str, Any]:
        cells = {tuple(k.split(self._SEP, 1)): v for k, v in state.items()}
        truths = {t for t, _ in cells}
        preds = {p for _, p in cells}
        classes = sorted(truths | (set(self.job.choices or ()) & preds) | (truths & preds))
        # Predictions outside the classes (free text, errors) get their own column.
        other = sorted(p for p in preds if p not in classes)
        total = sum(state.values())
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
        return {
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

    def merge(self, a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
        if a is None:
            return b
        return {acc.name: acc.merge(a[acc.name], b[acc.name]) for acc in self.accumulators}

    def result(self, state: dict[str, Any]) -> dict[str, Any]:
        return {acc.name: acc.result(state[acc.name]) for acc in self.accumulators}
