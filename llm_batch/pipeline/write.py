"""Writing: Parquet files that a reader never sees half-written.

Each write task writes a hidden file (a leading ``.``, which Parquet dataset
readers skip) and renames it into place once it is complete; on object stores,
where an upload only becomes visible when it completes, it writes in place.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

__all__ = ["AtomicParquetDatasink", "clear_output", "open_filesystem", "write_metrics"]

METRICS_NAME = "_metrics.json"

logger = logging.getLogger(__name__)

PART_PREFIX = "part-"


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a local path or URI."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), uri


def clear_output(uri: str) -> int:
    """Delete the part files a previous run left in an output folder; returns how many."""
    fs, path = open_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return 0
    removed = 0
    for f in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = f.base_name
        if f.type == pafs.FileType.File and (
            name.startswith(PART_PREFIX)
            or name.startswith("." + PART_PREFIX)
            or name == METRICS_NAME
        ):
            fs.delete_file(f.path)
            removed += 1
    return removed


def write_metrics(uri: str, snapshot: dict[str, Any]) -> str:
    """Write the job's final counts and accumulator results as ``_metrics.json``.

    The leading underscore keeps Parquet readers reading the folder as one dataset.
    """
    import json

    fs, path = open_filesystem(uri)
    final = f"{path.rstrip('/')}/{METRICS_NAME}"
    body = {k: v for k, v in snapshot.items() if k != "series"}
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{path.rstrip('/')}/.{METRICS_NAME}.inprogress" if local else final
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(target) as stream:
        stream.write(json.dumps(body, indent=2, sort_keys=True).encode())
    if local:
        fs.move(target, final)
    return final


class AtomicParquetDatasink(Datasink[None]):
    """One Parquet file per write task, named ``part-<run>-<task>-<n>.parquet``."""

    def __init__(self, uri: str, *, min_rows_per_file: int = 10_000, compression: str = "zstd"):
        self._uri = uri
        self._min_rows = min_rows_per_file
        self._compression = compression
        self._run = uuid.uuid4().hex[:12]

    @property
    def min_rows_per_write(self) -> int | None:
        return self._min_rows

    def on_write_start(self, schema: Any = None) -> None:
        fs, path = open_filesystem(self._uri)
        fs.create_dir(path, recursive=True)

    def write(self, blocks: Iterable[Block], ctx: Any) -> None:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows > 0]
        if not tables:
            return
        table = pa.concat_tables(tables, promote_options="permissive")
        fs, path = open_filesystem(self._uri)
        name = f"{PART_PREFIX}{self._run}-{ctx.task_idx:06d}-{uuid.uuid4().hex[:8]}.parquet"
        final = f"{path.rstrip('/')}/{name}"
        local = isinstance(fs, pafs.LocalFileSystem)
        target = f"{path.rstrip('/')}/.{name}.inprogress" if local else final
        with fs.open_output_stream(target) as stream:
            pq.write_table(table, stream, compression=self._compression)
        if local:
            fs.move(target, final)  # atomic rename on one filesystem
        logger.debug("wrote %d rows to %s", table.num_rows, final)
