"""A job's output rows over HTTP: JSON lines or one Parquet file, streamed batch by batch.

Reads the part files the job has written so far (complete files only: the
writer renames each into place when it is whole), so a running or cancelled
job's rows are readable too. Memory stays bounded by one record batch.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "PARQUET_MEDIA_TYPE",
    "iter_file",
    "iter_jsonl",
    "iter_parquet",
    "owned_files",
    "part_files",
]

PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
_JSONL_BATCH_ROWS = 1024
_PARQUET_BATCH_ROWS = 64 * 1024  # a row group each


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    from llm_batch.pipeline.fs import open_filesystem

    return open_filesystem(uri)


def part_files(output_path: str) -> list[str]:
    """The complete Parquet part files the job wrote in its output folder (its manifest
    says which: other files there are not its rows), in name order."""
    from llm_batch.pipeline.write import owned_parts

    return owned_parts(output_path)


def owned_files(output_path: str) -> list[tuple[str, int]]:
    """(name, bytes) of the complete files the job's manifest lists in its output folder
    (top level: part files, ``_metrics.json``), in name order."""
    from llm_batch.pipeline.manifest import MANIFEST_NAME, Manifest

    manifest = Manifest.read(output_path)
    if manifest is None:
        return []
    fs, path = _filesystem(output_path)
    base = path.rstrip("/")
    found = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
    return sorted(
        (f.base_name, int(f.size or 0))
        for f in found
        if f.type == pafs.FileType.File
        and not f.base_name.startswith(".")
        and f.base_name != MANIFEST_NAME
        and manifest.owns(f.base_name)
    )


def iter_file(output_path: str, name: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of one file of the output folder, a chunk at a time."""
    fs, path = _filesystem(output_path)
    with fs.open_input_stream(f"{path.rstrip('/')}/{name}") as f:
        while block := f.read(chunk):
            yield block


def _batches(
    output_path: str, files: list[str], batch_rows: int, limit: int | None = None
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    fs, _ = _filesystem(output_path)
    for attempt in range(3):
        try:
            dataset = pads.dataset(files, filesystem=fs, format="parquet")
            break
        except (pa.ArrowInvalid, FileNotFoundError):
            # A part file replaced between the listing and this read (a write task run
            # again renames its file over the first one's): list again and retry.
            if attempt == 2:
                raise
            time.sleep(0.2)
            files = part_files(output_path)
    batches = dataset.to_batches(batch_size=batch_rows)
    return dataset.schema, batches if limit is None else _first(batches, limit)


def _first(batches: Iterator[pa.RecordBatch], limit: int) -> Iterator[pa.RecordBatch]:
    left = limit
    for batch in batches:
        if left <= 0:
            return
        batch = batch.slice(0, left)
        left -= batch.num_rows
        yield batch


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return str(value)


def iter_jsonl(output_path: str, files: list[str], *, limit: int | None = None) -> Iterator[bytes]:
    """One JSON object per row (binary as base64, timestamps as ISO 8601, decimals as strings);
    the first ``limit`` rows only, when given."""
    _, batches = _batches(output_path, files, _JSONL_BATCH_ROWS, limit)
    for batch in batches:
        lines = [json.dumps(row, default=_json_default) for row in batch.to_pylist()]
        if lines:
            yield ("\n".join(lines) + "\n").encode("utf-8")


class _Chunks:
    """A write-only file that hands over what was written so far."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0
        self.closed = False

    def write(self, data: Any) -> int:
        b = bytes(data)
        self._parts.append(b)
        self._pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


def iter_parquet(
    output_path: str, files: list[str], *, limit: int | None = None
) -> Iterator[bytes]:
    """All rows (or the first ``limit``) as one Parquet file, one row group per batch, sent
    as each is written."""
    schema, batches = _batches(output_path, files, _PARQUET_BATCH_ROWS, limit)
    sink = _Chunks()
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for batch in batches:
            writer.write_batch(batch)
            chunk = sink.take()
            if chunk:
                yield chunk
    yield sink.take()
