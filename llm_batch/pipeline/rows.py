"""A batch's output columns: what an engine stage appends to the Arrow table it got.

``BatchFinisher`` turns one ``RowResult`` per row into this model's columns
(``generated_text`` … ``error``, ``parsed``, ``logprobs``), marks structured outputs
cut by ``max_tokens`` as error rows, and computes the batch's accumulator partial
and report for the job's tracker. The carryover columns are never converted to
Python objects: columns are appended to the table as it came.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

import numpy as np
import pyarrow as pa

from llm_batch import columns
from llm_batch.job.jsonschema import arrow_type_for_schema, coerce
from llm_batch.pipeline.accumulators import AccumulatorSet, BatchView, JobContext
from llm_batch.pipeline.generation import RowResult

__all__ = [
    "LOGPROBS_TYPE",
    "accumulator_view",
    "BatchFinisher",
    "BatchReport",
    "batch_key",
    "output_schema",
    "structured_complete",
]

_TOP = pa.struct([("token", pa.string()), ("logprob", pa.float64())])
# OpenAI's shape: one entry per generated token, with its top alternatives.
LOGPROBS_TYPE = pa.list_(
    pa.struct([("token", pa.string()), ("logprob", pa.float64()), ("top_logprobs", pa.list_(_TOP))])
)


def output_schema(
    model_name: str | None,
    sampling: dict[str, Any],
    *,
    task: str = "generate",
    dim: int | None = None,
    reasoning: bool = False,
) -> list[tuple[str, pa.DataType]]:
    """The columns one model appends, in order (``dim``: an embedder's vector size;
    ``reasoning``: the model has a reasoning parser)."""
    if task != "generate":
        pooled: dict[str, pa.DataType] = {
            columns.EMBEDDING: pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32()),
            columns.LABEL: pa.string(),
            columns.PROBS: pa.list_(pa.float32()),
            columns.SCORE: pa.float32(),
            columns.NUM_INPUT_TOKENS: pa.int32(),
            columns.ERROR: pa.string(),
        }
        return [
            (columns.model_column(model_name, c), pooled[c]) for c in columns.TASK_COLUMNS[task]
        ]
    types: dict[str, pa.DataType] = {
        columns.GENERATED_TEXT: pa.string(),
        columns.NUM_INPUT_TOKENS: pa.int32(),
        columns.NUM_OUTPUT_TOKENS: pa.int32(),
        columns.FINISH_REASON: pa.string(),
        columns.ERROR: pa.string(),
    }
    if reasoning:
        types[columns.REASONING_TEXT] = pa.string()
    structured = sampling.get("structured") or {}
    if structured.get("parse"):
        types[columns.PARSED] = arrow_type_for_schema(structured["json_schema"])
    if sampling.get("logprobs") is not None:
        types[columns.LOGPROBS] = LOGPROBS_TYPE
    return [(columns.model_column(model_name, c), t) for c, t in types.items()]


def accumulator_view(plain: pa.Table, task: str) -> pa.Table:
    """What the accumulators read of one model's output (plain column names): a pooling
    model's as a generator's, its label as the generated text, no output tokens."""
    if task == "generate":
        return plain
    n = plain.num_rows
    view = {
        columns.GENERATED_TEXT: (
            plain.column(columns.LABEL) if task == "classify" else pa.nulls(n, pa.string())
        ),
        columns.NUM_INPUT_TOKENS: plain.column(columns.NUM_INPUT_TOKENS),
        columns.NUM_OUTPUT_TOKENS: pa.array(np.zeros(n, np.int32)),
        columns.FINISH_REASON: pa.nulls(n, pa.string()),
        columns.ERROR: plain.column(columns.ERROR),
    }
    if columns.PROBS in plain.column_names:
        view[columns.PROBS] = plain.column(columns.PROBS)
    return pa.table(view)


def _vectors(values: list[Any], dim: int | None, fixed: bool) -> pa.Array:
    """One row's float32 vector each (None for an error row), into Arrow in one copy: a
    fixed_size_list (embeddings) or a list (class probabilities)."""
    valid = [v is not None for v in values]
    sizes = [len(v) if v is not None else 0 for v in values]
    if fixed:
        dim = next((size for size, ok in zip(sizes, valid, strict=True) if ok), dim) or 0
        flat = np.zeros((len(values), dim), np.float32)
        for i, v in enumerate(values):
            if v is not None:
                flat[i] = v
        mask = pa.array([not ok for ok in valid])
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=mask)
    flat_values = np.concatenate([v for v in values if v is not None] or [np.zeros(0, np.float32)])
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    return pa.ListArray.from_arrays(
        offsets,
        pa.array(flat_values.astype(np.float32, copy=False)),
        mask=pa.array([not ok for ok in valid]),
    )


def structured_complete(text: str | None, structured: dict[str, Any] | None) -> bool:
    """Whether a structured output's text is whole: one of the choices, a full match of
    the regex, or JSON that parses. A generation cut by ``max_tokens`` usually is not."""
    if text is None or not structured:
        return True
    if structured.get("choice"):
        return text in structured["choice"]
    if structured.get("regex") is not None:
        return re.fullmatch(structured["regex"], text) is not None
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def batch_key(batch: pa.Table, model_name: str | None) -> str | None:
    """A batch's key in the tracker's ledger: its row ids (stable across retries, unique but
    for a prompt's n samples) and the model."""
    if columns.ROW_ID not in batch.column_names:
        return None
    digest = hashlib.blake2b(batch.column(columns.ROW_ID).to_numpy().tobytes(), digest_size=12)
    digest.update(str(model_name).encode())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class BatchReport:
    """What a finished batch tells the job's tracker (``ProgressTracker.report``)."""

    rows: int
    failed: int
    input_tokens: int
    output_tokens: int
    metrics: dict[str, Any]
    deduplicated: int = 0  # rows that took another row's output (the same prompt, sampling)
    cached: int = 0  # rows answered by the response cache
    skipped: int = 0  # rows stopped at an earlier stage: passed through, not generated


class BatchFinisher:
    """Appends one model's columns to batches of one job (plain-dict configuration, as the
    job spec's ``sampling`` and ``metrics`` blocks dump)."""

    def __init__(
        self,
        sampling: dict[str, Any],
        *,
        model_name: str | None = None,
        metrics: dict[str, Any] | None = None,
        drop: list[str] | tuple[str, ...] = (),
        task: str = "generate",
        reasoning: bool = False,
    ):
        metrics = metrics or {}
        self._reasoning = reasoning
        self._task = task
        self._sampling = sampling
        self._structured = (sampling.get("structured") or None) if task == "generate" else None
        self._model_name = model_name
        self._drop = list(drop)
        # Label metrics read a prediction: a generator's text or a classifier's label.
        self._label_column = (
            metrics.get("label_column") if task in ("generate", "classify") else None
        )
        self._custom = metrics.get("accumulators") or ()
        choices = (self._structured or {}).get("choice")
        self._accumulators: AccumulatorSet | None = None
        if task != "classify":  # a classifier's choices are its labels, known once it runs
            self._accumulators = self._accumulator_set(tuple(choices) if choices else None)
        self._schema = output_schema(model_name, sampling, reasoning=reasoning)
        # The same columns without the model prefix: what accumulators read.
        self._plain_names = [c for c, _ in output_schema(None, sampling, reasoning=reasoning)]
        structured = self._structured or {}
        self._parsed_type = (
            arrow_type_for_schema(structured["json_schema"]) if structured.get("parse") else None
        )

    def _accumulator_set(self, choices: tuple[str, ...] | None) -> AccumulatorSet:
        return AccumulatorSet(
            JobContext(label_column=self._label_column, choices=choices), self._custom
        )

    def finish(
        self,
        batch: pa.Table,
        results: list[RowResult],
        *,
        dim: int | None = None,
        labels: list[str] | None = None,
    ) -> tuple[pa.Table, BatchReport]:
        """``dim`` and ``labels``: a pooling engine's vector size and class names."""
        if self._task != "generate":
            return self._finish_pooled(batch, results, dim=dim, labels=labels)
        n = batch.num_rows
        texts = [r.text for r in results]
        finishes = [r.finish_reason for r in results]
        errors = [r.error for r in results]
        if self._structured:
            for i in range(n):
                if (
                    errors[i] is None
                    and finishes[i] == "length"
                    and not structured_complete(texts[i], self._structured)
                ):
                    # The cut text stays in generated_text for inspection; the row is an
                    # error row, never a prediction.
                    errors[i] = (
                        f"structured output cut at max_tokens after {results[i].output_tokens} "
                        "tokens, before it was complete; raise sampling.max_tokens"
                    )
        values: list[list[Any]] = [
            texts,
            [r.input_tokens for r in results],
            [r.output_tokens for r in results],
            finishes,
            errors,
        ]
        if self._reasoning:
            values.append([r.reasoning for r in results])
        if self._parsed_type is not None:
            parsed = []
            for i in range(n):
                value, problem = self._parse(texts[i], finishes[i])
                parsed.append(value)
                if problem is not None and errors[i] is None:
                    errors[i] = problem
            values.append(parsed)
        if self._sampling.get("logprobs") is not None:
            values.append([r.logprobs for r in results])

        out = batch.drop_columns([c for c in self._drop if c in batch.column_names])
        arrays = [pa.array(v, type=t) for (_, t), v in zip(self._schema, values, strict=True)]
        for (name, _), arr in zip(self._schema, arrays, strict=True):
            out = out.append_column(name, arr)

        view = pa.Table.from_arrays(arrays, names=self._plain_names)
        assert self._accumulators is not None
        return out, self._report(batch, view, results, self._accumulators)

    def _report(
        self,
        batch: pa.Table,
        view: pa.Table,
        results: list[RowResult],
        accumulators: AccumulatorSet,
    ) -> BatchReport:
        if self._label_column is not None:
            view = view.append_column(self._label_column, batch.column(self._label_column))
        latencies = pa.array([r.latency for r in results], pa.float64())
        skipped = sum(1 for r in results if r.skipped)
        if skipped:  # rows stopped at an earlier stage: not this model's outputs
            ran = pa.array([not r.skipped for r in results])
            view, latencies = view.filter(ran), latencies.filter(ran)
        # The error column as written: it holds errors found here too (a cut structured output).
        failed = view.num_rows - view.column(columns.ERROR).null_count
        return BatchReport(
            rows=batch.num_rows,
            failed=failed,
            input_tokens=sum(r.input_tokens or 0 for r in results),
            output_tokens=sum(r.output_tokens or 0 for r in results),
            metrics=accumulators.update(BatchView(view, latencies, self._model_name)),
            deduplicated=sum(1 for r in results if r.deduplicated),
            cached=sum(1 for r in results if r.cached),
            skipped=skipped,
        )

    def _finish_pooled(
        self,
        batch: pa.Table,
        results: list[RowResult],
        *,
        dim: int | None,
        labels: list[str] | None,
    ) -> tuple[pa.Table, BatchReport]:
        """A pooling model's columns (``columns.TASK_COLUMNS``): vectors into Arrow whole."""
        values: dict[str, pa.Array] = {
            columns.NUM_INPUT_TOKENS: pa.array([r.input_tokens for r in results], pa.int32()),
            columns.ERROR: pa.array([r.error for r in results], pa.string()),
        }
        if self._task == "embed":
            values[columns.EMBEDDING] = _vectors([r.embedding for r in results], dim, fixed=True)
        elif self._task == "score":
            values[columns.SCORE] = pa.array([r.score for r in results], pa.float32())
        else:
            values[columns.LABEL] = pa.array([r.label for r in results], pa.string())
            values[columns.PROBS] = _vectors([r.probs for r in results], None, fixed=False)
        own = columns.TASK_COLUMNS[self._task]
        out = batch.drop_columns([c for c in self._drop if c in batch.column_names])
        for name in own:
            out = out.append_column(columns.model_column(self._model_name, name), values[name])
        if self._accumulators is None:
            self._accumulators = self._accumulator_set(tuple(labels) if labels else None)
        view = accumulator_view(pa.table({c: values[c] for c in own}), self._task)
        return out, self._report(batch, view, results, self._accumulators)

    def _parse(self, text: str | None, finish: str | None) -> tuple[Any, str | None]:
        if text is None:
            return None, None
        try:
            return coerce(json.loads(text), self._parsed_type), None
        except (ValueError, TypeError) as e:
            hint = (
                " (the generation was cut at max_tokens; raise sampling.max_tokens)"
                if (finish == "length")
                else ""
            )
            return None, f"output does not parse as the schema: {e}{hint}"
