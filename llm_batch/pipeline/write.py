"""Writing: Parquet files that a reader never sees half-written.

Each write task writes a hidden file (a leading ``.``, which Parquet dataset
readers skip) and renames it into place once it is complete; on object stores,
where an upload only becomes visible when it completes, it writes in place.
The folder also holds ``_metrics.json``, the manifest ``_llm_batch.json``
(``manifest.py``: what the job wrote there, so that it never touches anything
else) and, while a job can still resume, ``_checkpoint/`` (leading underscores:
Parquet readers skip them).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
from ray.data._internal.savemode import SaveMode
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.filename_provider import FilenameProvider

from llm_batch.pipeline.fs import open_filesystem
from llm_batch.pipeline.manifest import MANIFEST_NAME, Manifest, part_name
from llm_batch.pipeline.retry import RETRY_NAME

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "OWN_FILES",
    "AtomicParquetDatasink",
    "clear_output",
    "committed_parts",
    "owned_parts",
    "write_metrics",
]

METRICS_NAME = "_metrics.json"
CHECKPOINT_NAME = "_checkpoint"
STATUS_NAME = "_status.json"  # the job driver's (pipeline/driver.py)
# What every run may write in its output folder besides its part files (recorded in the
# manifest before it writes them).
OWN_FILES = [f"{CHECKPOINT_NAME}/", METRICS_NAME, STATUS_NAME, f"{RETRY_NAME}/"]

logger = logging.getLogger(__name__)

PART_PREFIX = "part-"


def clear_output(uri: str, manifest: Manifest, *, foreign_parquet: Sequence[str] = ()) -> list[str]:
    """Delete what earlier runs recorded in ``manifest`` wrote in an output folder (never
    the manifest itself), and the ``foreign_parquet`` files an ``output.mode: overwrite``
    job replaces; returns the names deleted, relative to the folder."""
    fs, path = open_filesystem(uri)
    base = path.rstrip("/")
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    removed = []
    for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if f.type != pafs.FileType.File:
            continue
        name = f.path[len(base) + 1 :]
        if name != MANIFEST_NAME and (manifest.owns(name) or name in foreign_parquet):
            fs.delete_file(f.path)
            removed.append(name)
    checkpoint = f"{base}/{CHECKPOINT_NAME}"
    if (
        manifest.owns(f"{CHECKPOINT_NAME}/")
        and fs.get_file_info(checkpoint).type == pafs.FileType.Directory
    ):
        fs.delete_dir(checkpoint)  # empty by now: every file in it was the manifest's
    staging = f"{base}/{RETRY_NAME}"
    leftover = fs.get_file_info(staging).type == pafs.FileType.Directory
    if leftover and manifest.owns(f"{RETRY_NAME}/"):
        fs.delete_dir(staging)  # a retry cut short before it began
    return removed


def owned_parts(uri: str) -> list[str]:
    """The complete part files of an output folder that its manifest owns, in name order
    (what a reader of the job's results reads; anything else in the folder is not the
    job's)."""
    fs, path = open_filesystem(uri)
    base = path.rstrip("/")
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    manifest = Manifest.read(uri)
    if manifest is None:
        return []
    return sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(base, recursive=False))
        if f.type == pafs.FileType.File
        and f.base_name.endswith(".parquet")
        and not f.base_name.startswith(".")
        and manifest.owns(f.base_name)
    )


def committed_parts(uri: str) -> list[str]:
    """Part files whose rows a checkpoint has committed (what a resumed run keeps)."""
    fs, path = open_filesystem(uri)
    base = path.rstrip("/")
    cp = f"{base}/{CHECKPOINT_NAME}"
    if fs.get_file_info(cp).type == pafs.FileType.NotFound:
        return []
    committed = {
        f.base_name.removesuffix(".parquet")
        for f in fs.get_file_info(pafs.FileSelector(cp, recursive=False))
        if f.base_name.endswith(".parquet") and not f.base_name.endswith(".pending.parquet")
    }
    return sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(base, recursive=False))
        if f.base_name.startswith(PART_PREFIX) and f.base_name.removesuffix(".parquet") in committed
    )


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


class _PartNames(FilenameProvider):
    """``part-<run id>-<task>.parquet``: deterministic per write task, as checkpointing
    needs, and the run's own (``manifest.part_name``)."""

    def __init__(self, run_id: str):
        self._run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return part_name(self._run_id, task_index)


class AtomicParquetDatasink(ParquetDatasink):
    """One Parquet file per write task, renamed into place once complete.

    A Ray file datasink, so that Ray Data checkpointing gives exactly-once
    output: before a task writes, Ray records a pending checkpoint named after
    the task's file; after, it commits the ids the file holds. On resume, files
    of pending (uncommitted) checkpoints are deleted and their rows redone.
    """

    def __init__(
        self,
        uri: str,
        *,
        run_id: str,
        min_rows_per_file: int | None = 10_000,
        compression: str = "zstd",
    ):
        fs, path = open_filesystem(uri)
        super().__init__(
            path,
            filesystem=fs,
            min_rows_per_file=min_rows_per_file,
            filename_provider=_PartNames(run_id),
            mode=SaveMode.APPEND,
        )
        self._compression = compression

    def write(self, blocks: Iterable[Block], ctx: Any) -> None:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows > 0]
        if not tables:
            return
        table = pa.concat_tables(tables, promote_options="permissive")
        name = self.filename_provider.get_filename_for_task(
            ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx
        )
        fs = self.filesystem
        base = self.path.rstrip("/")
        final = f"{base}/{name}"
        # Ray Data wraps the filesystem it is given (RetryingPyFileSystem): look inside.
        inner = fs.unwrap() if hasattr(fs, "unwrap") else fs
        local = isinstance(inner, pafs.LocalFileSystem)
        target = f"{base}/.{name}.{uuid.uuid4().hex[:8]}.inprogress" if local else final
        with fs.open_output_stream(target) as stream:
            pq.write_table(table, stream, compression=self._compression)
        if local:
            fs.move(target, final)  # atomic rename on one filesystem
        logger.debug("wrote %d rows to %s", table.num_rows, final)
