"""Reading: check the input against the job before anything starts, then stream it.

``inspect_input`` looks at the input's schema (Parquet footers, or the first
block of a JSONL/CSV file) so that a missing file or a column the template
needs but the input lacks fails in a second, before any engine starts.
``read_dataset`` reads only the columns the job needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from llm_batch.errors import InputError, JobSpecError
from llm_batch.pipeline.write import open_filesystem

__all__ = ["InputInfo", "check_columns", "inspect_input", "read_dataset"]

_FIRST_BLOCK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class InputInfo:
    schema: pa.Schema
    files: list[str]
    rows_total: int | None  # known up front for Parquet (from the footers)


def _list_files(uri: str, fmt: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = open_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input.path: {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        return fs, [path]
    files = sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File and not f.base_name.startswith((".", "_"))
    )
    if not files:
        raise InputError(f"input.path: folder {uri!r} holds no {fmt} files")
    return fs, files


def inspect_input(input_spec: dict[str, Any], fmt: str) -> InputInfo:
    """Schema (and, for Parquet, row count) of the input; raises ``InputError``."""
    uri = input_spec["path"]
    fs, files = _list_files(uri, fmt)
    try:
        if fmt == "parquet":
            dataset = pq.ParquetDataset(files, filesystem=fs)
            rows = sum(f.metadata.num_rows for f in dataset.fragments)
            return InputInfo(dataset.schema, files, rows)
        with fs.open_input_stream(files[0]) as stream:
            head = stream.read(_FIRST_BLOCK_BYTES)
        if not head.strip():
            raise InputError(f"input.path: {files[0]!r} is empty")
        if len(head) == _FIRST_BLOCK_BYTES:  # cut at the last full line
            head = head[: head.rfind(b"\n") + 1] or head
        if fmt == "jsonl":
            table = pajson.read_json(pa.BufferReader(head))
        else:
            table = pacsv.read_csv(pa.BufferReader(head))
    except InputError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"input.path: {uri!r} cannot be read as {fmt}: {e}") from None
    if table.num_rows == 0:
        raise InputError(f"input.path: {uri!r} has no rows")
    return InputInfo(table.schema, files, None)


def check_columns(schema: pa.Schema, needs: dict[str, set[str]]) -> None:
    """Raise ``JobSpecError`` naming the field whose column the input lacks."""
    have = set(schema.names)
    for field, names in needs.items():
        missing = sorted(names - have)
        if missing:
            raise JobSpecError(
                f"{field} uses column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(m) for m in missing)}, which the input does not have "
                f"(it has: {', '.join(schema.names)})"
            )


def read_dataset(input_spec: dict[str, Any], fmt: str, columns: list[str], info: InputInfo) -> Any:
    """A Ray Dataset of the input, projected to ``columns`` (in that order)."""
    import ray.data

    fs, _ = open_filesystem(input_spec["path"])
    if fmt == "parquet":
        ds = ray.data.read_parquet(info.files, filesystem=fs, columns=columns)
    elif fmt == "jsonl":
        ds = ray.data.read_json(info.files, filesystem=fs)  # pyarrow reads NDJSON
    else:
        ds = ray.data.read_csv(info.files, filesystem=fs)
    if fmt != "parquet":
        ds = ds.select_columns(columns)
    return ds
