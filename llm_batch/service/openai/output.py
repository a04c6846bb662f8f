"""Finalizing a batch: its jobs' Parquet outputs into OpenAI output and error files.

One line per request, streamed part file by part file (memory: one record batch):

    output file  {"id", "custom_id", "response": {"status_code": 200, "request_id",
                  "body": <chat.completion | text_completion | list of embeddings>},
                  "error": null}
    error file   {"id", "custom_id", "response": {"status_code": 400 | 500, "request_id",
                  "body": {"error": {...}}}, "error": {"code", "message"}}

A request with ``n > 1`` is ``n`` consecutive output rows (its samples, written
together); it is one line with ``n`` choices, or an error line when any sample
failed. An embeddings request is one row per element of its ``input``, which
may be written in different part files: its rows are held until all of them
(``input_count``) have been read, so memory holds the requests a part file
boundary cut, not the batch. The files' ids derive from the batch's id, so
finalizing again after a restart rewrites the same files instead of leaving
orphans.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow.dataset as pads

from llm_batch import columns
from llm_batch.service import results
from llm_batch.service.openai.convert import CHAT, EMBEDDINGS
from llm_batch.service.store import Job, StoredFile, utcnow

__all__ = ["BatchResults", "error_code", "write_results"]

_BATCH_ROWS = 1024
_LOWEST_LOGPROB = -9999.0  # what OpenAI reports for a token whose log-probability underflows


@dataclasses.dataclass
class BatchResults:
    files: list[StoredFile]  # to register with the batch's final status
    output_file_id: str | None
    error_file_id: str | None
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int

    @property
    def usage(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }


def _file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def error_code(message: str) -> tuple[int, str]:
    """(HTTP status, OpenAI error code) for a row's ``error`` text."""
    lowered = message.lower()
    if any(
        words in lowered
        for words in ("maximum model length", "maximum context length", "max_model_len")
    ):
        return 400, "context_length_exceeded"
    if message.startswith(
        ("sampling override", "prompt.messages_column", "prompt rendering", "chat template")
    ):
        return 400, "invalid_request"
    if "does not parse as the schema" in message:
        return 500, "invalid_response_format"
    if "matryoshka" in lowered or "supports dimensions" in lowered:
        return 400, "invalid_request"  # a `dimensions` the embedding model cannot give
    return 500, "server_error"


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _chat_logprobs(steps: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if steps is None:
        return None

    def entry(token: str | None, logprob: float | None) -> dict[str, Any]:
        text = token or ""
        return {
            "token": text,
            "logprob": _LOWEST_LOGPROB if logprob is None else max(logprob, _LOWEST_LOGPROB),
            "bytes": list(text.encode("utf-8")),
        }

    return {
        "content": [
            {
                **entry(step["token"], step["logprob"]),
                "top_logprobs": [entry(t["token"], t["logprob"]) for t in step["top_logprobs"]],
            }
            for step in steps
        ],
        "refusal": None,
    }


def _completion_logprobs(steps: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if steps is None:
        return None
    tokens = [step["token"] or "" for step in steps]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [step["logprob"] for step in steps],
        "top_logprobs": [
            {t["token"] or "": t["logprob"] for t in step["top_logprobs"]} for step in steps
        ],
        "text_offset": offsets,
    }


class _Lines:
    """A JSONL file written under a hidden name, renamed into place by ``close``."""

    def __init__(self, folder: Path, file_id: str):
        self.file_id = file_id
        self.final = folder / file_id
        self.partial = folder / f".{file_id}.partial"
        self.lines = 0
        self._f: IO[bytes] | None = None

    def write(self, line: dict[str, Any]) -> None:
        if self._f is None:
            self._f = open(self.partial, "wb")  # noqa: SIM115 - closed in close()
        # ASCII-only: generated text may hold U+2028/U+0085, which `str.splitlines()`
        # (what clients read JSONL with) would take for line breaks inside a string.
        self._f.write(json.dumps(line).encode("ascii") + b"\n")
        self.lines += 1

    def close(self) -> int | None:
        """Bytes written, or None when there was no line (no file then)."""
        if self._f is None:
            self.final.unlink(missing_ok=True)  # from an earlier attempt that had lines
            return None
        self._f.flush()
        os.fsync(self._f.fileno())
        size = self._f.tell()
        self._f.close()
        os.replace(self.partial, self.final)
        return size

    def discard(self) -> None:
        if self._f is not None:
            self._f.close()
        self.partial.unlink(missing_ok=True)


_WANTED = (
    columns.ROW_ID,
    "custom_id",
    columns.SAMPLE_INDEX,
    columns.GENERATED_TEXT,
    columns.REASONING_TEXT,
    columns.NUM_INPUT_TOKENS,
    columns.NUM_OUTPUT_TOKENS,
    columns.FINISH_REASON,
    columns.ERROR,
    columns.LOGPROBS,
    columns.EMBEDDING,
    "input_index",
    "input_count",
    "encoding_format",
)


def _rows(job: Job) -> Iterator[dict[str, Any]]:
    """The job's written output rows, in the order of its part files (an embedding as a
    numpy float32 vector, None for a failed row)."""
    from llm_batch.pipeline.fs import open_filesystem

    files = results.part_files(job.output_path)
    if not files:
        return
    fs, _ = open_filesystem(job.output_path)
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    names = [c for c in _WANTED if c in dataset.schema.names]
    for batch in dataset.to_batches(columns=names, batch_size=_BATCH_ROWS):
        if columns.EMBEDDING not in names:
            yield from batch.to_pylist()
            continue
        # One numpy vector per row, not a Python float per value.
        vectors = batch.column(columns.EMBEDDING).to_numpy(zero_copy_only=False)
        others = batch.drop_columns([columns.EMBEDDING]).to_pylist()
        for row, vector in zip(others, vectors, strict=True):
            row[columns.EMBEDDING] = vector
            yield row


def _requests(job: Job, endpoint: str) -> Iterator[list[dict[str, Any]]]:
    """The job's written output rows, grouped per request: its samples (consecutive), or
    the rows of an embeddings request's inputs (by ``input_index``), once all are read."""
    if endpoint != EMBEDDINGS:
        current: list[dict[str, Any]] = []
        for row in _rows(job):
            if current and row[columns.ROW_ID] != current[0][columns.ROW_ID]:
                yield current
                current = []
            current.append(row)
        if current:
            yield current
        return
    pending: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(job):
        inputs = pending.setdefault(row["custom_id"], [])
        inputs.append(row)
        if len(inputs) == row["input_count"]:
            del pending[row["custom_id"]]
            yield sorted(inputs, key=lambda r: r["input_index"])
    # What is still pending was not finished (a cancelled or expired job): no line.


def _tokens(samples: list[dict[str, Any]], endpoint: str) -> tuple[int, int]:
    """A request's (prompt, completion) tokens: its samples share one prompt; an
    embeddings request's prompt is all its inputs."""
    if endpoint == EMBEDDINGS:
        return sum(s[columns.NUM_INPUT_TOKENS] or 0 for s in samples), 0
    completion = sum(s.get(columns.NUM_OUTPUT_TOKENS) or 0 for s in samples)
    return samples[0][columns.NUM_INPUT_TOKENS] or 0, completion


def _embedding(vector: Any, encoding_format: str) -> list[float] | str:
    """OpenAI's ``embedding``: the floats, or their little-endian float32 bytes in base64
    (what the ``openai`` client decodes with ``numpy.frombuffer(..., "float32")``)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector.tolist()


def _embeddings_body(inputs: list[dict[str, Any]], *, model: str) -> dict[str, Any]:
    tokens, _ = _tokens(inputs, EMBEDDINGS)
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": row["input_index"],
                "embedding": _embedding(row[columns.EMBEDDING], row["encoding_format"]),
            }
            for row in inputs
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _body(
    samples: list[dict[str, Any]], *, endpoint: str, model: str, created: int
) -> dict[str, Any]:
    if endpoint == EMBEDDINGS:
        return _embeddings_body(samples, model=model)
    prompt_tokens, completion_tokens = _tokens(samples, endpoint)
    choices = []
    for s in sorted(samples, key=lambda s: s.get(columns.SAMPLE_INDEX) or 0):
        index = s.get(columns.SAMPLE_INDEX) or 0
        reason = _finish_reason(s[columns.FINISH_REASON])
        if endpoint == CHAT:
            message = {"role": "assistant", "content": s[columns.GENERATED_TEXT], "refusal": None}
            if columns.REASONING_TEXT in s:  # a reasoning model's, as vLLM's server says it
                message["reasoning_content"] = s[columns.REASONING_TEXT]
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": _chat_logprobs(s.get(columns.LOGPROBS)),
                    "finish_reason": reason,
                }
            )
        else:
            choices.append(
                {
                    "index": index,
                    "text": s[columns.GENERATED_TEXT],
                    "logprobs": _completion_logprobs(s.get(columns.LOGPROBS)),
                    "finish_reason": reason,
                }
            )
    chat = endpoint == CHAT
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
    }


def _line(custom_id: str, response: dict[str, Any], error: dict[str, str] | None) -> dict[str, Any]:
    return {
        "id": "batch_req_" + secrets.token_hex(12),
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def _requested(job: Job) -> Iterator[str]:
    """The custom ids of the requests a batch's job was given (its converted input)."""
    path = (job.spec.get("input") or {}).get("path")
    if not path:
        return
    dataset = pads.dataset(path, format="parquet")
    for batch in dataset.to_batches(columns=["custom_id"], batch_size=_BATCH_ROWS):
        yield from (str(c) for c in batch.column("custom_id").to_pylist())


def write_results(
    *,
    batch_id: str,
    endpoint: str,
    runs: list[tuple[Job, str]],
    folder: Path,
    owner: str | None,
    unfinished: str | None = None,
) -> BatchResults:
    """Write the output and error files of a batch whose jobs (with their model names)
    have ended, from the rows they wrote. Files with no line are not made. With
    ``unfinished`` (an expired batch: ``batch_expired``), each request that has no result
    gets an error line with that code, as OpenAI writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    out = _Lines(folder, _file_id(batch_id, "output"))
    err = _Lines(folder, _file_id(batch_id, "error"))
    counts = BatchResults([], None, None, 0, 0, 0, 0)
    try:
        for job, model in runs:
            created = int((job.finished_at or utcnow()).timestamp())
            answered: set[str] = set()
            for samples in _requests(job, endpoint):
                custom_id = samples[0]["custom_id"]
                answered.add(custom_id)
                prompt_tokens, completion_tokens = _tokens(samples, endpoint)
                counts.input_tokens += prompt_tokens
                counts.output_tokens += completion_tokens
                failed = next((s[columns.ERROR] for s in samples if s[columns.ERROR]), None)
                request_id = "req_" + secrets.token_hex(12)
                if failed is None:
                    body = _body(samples, endpoint=endpoint, model=model, created=created)
                    response = {"status_code": 200, "request_id": request_id, "body": body}
                    out.write(_line(custom_id, response, None))
                    counts.completed += 1
                    continue
                status, code = error_code(failed)
                kind = "invalid_request_error" if status == 400 else "server_error"
                error = {"message": failed, "type": kind, "param": None, "code": code}
                response = {
                    "status_code": status,
                    "request_id": request_id,
                    "body": {"error": error},
                }
                err.write(_line(custom_id, response, {"code": code, "message": failed}))
                counts.failed += 1
            if unfinished is not None:
                for custom_id in _requested(job):
                    if custom_id in answered:
                        continue
                    answered.add(custom_id)
                    message = (
                        "This request could not be executed before the completion window ended."
                    )
                    error = {"message": message, "type": "invalid_request_error",
                             "param": None, "code": unfinished}  # fmt: skip
                    response = {
                        "status_code": 400,
                        "request_id": "req_" + secrets.token_hex(12),
                        "body": {"error": error},
                    }
                    err.write(_line(custom_id, response, {"code": unfinished, "message": message}))
                    counts.failed += 1
        sizes = {"output": out.close(), "error": err.close()}
    except BaseException:
        out.discard()
        err.discard()
        raise
    now = utcnow()
    for kind, lines in (("output", out), ("error", err)):
        size = sizes[kind]
        if size is None:
            continue
        counts.files.append(
            StoredFile(
                id=lines.file_id,
                owner=owner,
                filename=f"{batch_id}_{kind}.jsonl",
                purpose="batch_output",
                bytes=size,
                created_at=now,
            )
        )
        if kind == "output":
            counts.output_file_id = lines.file_id
        else:
            counts.error_file_id = lines.file_id
    return counts
