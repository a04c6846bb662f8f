"""Reading: check the input against the job before anything starts, then stream it.

``inspect_input`` looks at the input's schema (Parquet footers, or the first
block of a JSONL/CSV file) so that a missing file or a column the template
needs but the input lacks fails in a second, before any engine starts.

``InputDatasource`` streams the input into Ray Data, reading only the columns
the job needs, and gives every row a stable id (``row_id``: the file's index
in the sorted file list × 2**40 + the row's position in its file). The id is
what resume-after-a-fault keys on (Ray Data checkpointing), so it must be the
same every time the same input is read. A JSONL line that does not parse (bad
JSON, not UTF-8, a value of the wrong type) or a CSV row with the wrong number
of fields is not dropped: it becomes a row whose ``error`` names the line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from llm_batch import columns
from llm_batch.errors import InputError, JobSpecError
from llm_batch.pipeline.fs import open_filesystem

__all__ = ["InputDatasource", "InputInfo", "check_columns", "inspect_input"]

_FIRST_BLOCK_BYTES = 1 << 20
_ROWS_PER_BLOCK = 4096
_FILE_SHIFT = 40  # row ids: file index in the high bits, row position in the low 40


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
            if rows == 0:
                raise InputError(f"input.path: {uri!r} has no rows")
            return InputInfo(dataset.schema, files, rows)
        with fs.open_input_stream(files[0]) as stream:
            head = stream.read(_FIRST_BLOCK_BYTES)
        if not head.strip():
            raise InputError(f"input.path: {files[0]!r} is empty")
        if len(head) == _FIRST_BLOCK_BYTES:  # cut at the last full line
            head = head[: head.rfind(b"\n") + 1] or head
        if fmt == "jsonl":
            table = _json_head(head, files[0])
        else:
            # Rows with a wrong field count become error rows later, not a refusal.
            skip = pacsv.ParseOptions(invalid_row_handler=lambda _row: "skip")
            table = pacsv.read_csv(pa.BufferReader(head), parse_options=skip)
    except InputError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"input.path: {uri!r} cannot be read as {fmt}: {e}") from None
    if table.num_rows == 0:
        raise InputError(f"input.path: {uri!r} has no rows")
    return InputInfo(table.schema, files, None)


def _json_head(head: bytes, name: str) -> pa.Table:
    """The schema-bearing first block of a JSONL file, skipping lines that do not parse."""
    try:
        return pajson.read_json(pa.BufferReader(head))
    except pa.ArrowInvalid:
        pass
    good = []
    for line in head.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(value, dict):
            good.append(value)
    if not good:
        raise InputError(f"input.path: {name!r} holds no JSON object lines (is it JSONL?)")
    return pa.Table.from_pylist(good)


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


def _with_ids(table: pa.Table, file_index: int, first_row: int, errors: list[Any]) -> pa.Table:
    ids = pa.array(
        range(
            (file_index << _FILE_SHIFT) + first_row,
            (file_index << _FILE_SHIFT) + first_row + table.num_rows,
        ),
        pa.int64(),
    )
    table = table.append_column(columns.ROW_ID, ids)
    return table.append_column(columns.INPUT_ERROR, pa.array(errors, pa.string()))


class InputDatasource(Datasource):
    """The job's input as a Ray Data source: projected columns, a stable row id per row.

    One read task per file (JSONL and CSV keep exact line numbers that way;
    Parquet files are split further by row group), each streaming blocks of a
    few thousand rows.
    """

    def __init__(self, uri: str, fmt: str, info: InputInfo, columns_: list[str]):
        self._uri = uri
        self._fmt = fmt
        self._files = list(info.files)
        self._schema = pa.schema([info.schema.field(c) for c in columns_])
        self._columns = list(columns_)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        tasks = []
        out_schema = self._schema.append(pa.field(columns.ROW_ID, pa.int64())).append(
            pa.field(columns.INPUT_ERROR, pa.string())
        )
        for index, path in enumerate(self._files):
            pieces: list[tuple[int, ...]] = [()]
            if self._fmt == "parquet":
                fs, _ = open_filesystem(self._uri)
                meta = pq.ParquetFile(path, filesystem=fs).metadata
                pieces = [(g,) for g in range(meta.num_row_groups)]
            for piece in pieces:
                meta_rows = None
                tasks.append(
                    ReadTask(
                        _ReadFn(
                            self._uri, self._fmt, path, index, piece, self._columns, self._schema
                        ),
                        BlockMetadata(
                            num_rows=meta_rows,
                            size_bytes=None,
                            exec_stats=None,
                            input_files=(path,),
                        ),
                        schema=out_schema,
                    )
                )
        return tasks


class _ReadFn:
    """One read task (a file, or one Parquet row group), picklable."""

    def __init__(
        self,
        uri: str,
        fmt: str,
        path: str,
        index: int,
        piece: tuple[int, ...],
        columns_: list[str],
        schema: pa.Schema,
    ):
        self.uri, self.fmt, self.path, self.index, self.piece = uri, fmt, path, index, piece
        self.columns, self.schema = columns_, schema

    def __call__(self) -> Iterator[pa.Table]:
        fs, _ = open_filesystem(self.uri)
        if self.fmt == "parquet":
            yield from self._parquet(fs)
        elif self.fmt == "jsonl":
            yield from self._jsonl(fs)
        else:
            yield from self._csv(fs)

    def _parquet(self, fs: pafs.FileSystem) -> Iterator[pa.Table]:
        (group,) = self.piece
        pf = pq.ParquetFile(self.path, filesystem=fs)
        first = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        table = pf.read_row_group(group, columns=self.columns)
        for start in range(0, table.num_rows, _ROWS_PER_BLOCK):
            part = table.slice(start, _ROWS_PER_BLOCK)
            yield _with_ids(part, self.index, first + start, [None] * part.num_rows)

    def _jsonl(self, fs: pafs.FileSystem) -> Iterator[pa.Table]:
        row = 0  # rows are the non-blank lines
        lines: list[tuple[int, bytes]] = []
        with fs.open_input_stream(self.path) as stream:
            number = 0
            carry = b""
            while True:
                chunk = stream.read(1 << 22)
                if not chunk:
                    break
                parts = (carry + chunk).split(b"\n")
                carry = parts.pop()
                for line in parts:
                    number += 1
                    if line.strip():
                        lines.append((number, line))
                if len(lines) >= _ROWS_PER_BLOCK:
                    yield self._json_block(lines, row)
                    row += len(lines)
                    lines = []
            if carry.strip():
                lines.append((number + 1, carry))
        if lines:
            yield self._json_block(lines, row)

    def _json_block(self, lines: list[tuple[int, bytes]], first_row: int) -> pa.Table:
        options = pajson.ParseOptions(
            explicit_schema=self.schema, unexpected_field_behavior="ignore"
        )
        data = b"\n".join(b for _, b in lines) + b"\n"
        try:
            # Arrow's JSON reader does not check UTF-8: a bad byte must take the slow path,
            # where its line becomes an error row.
            data.decode("utf-8")
            table = pajson.read_json(pa.BufferReader(data), parse_options=options)
            if table.num_rows == len(lines):
                return _with_ids(
                    table.select(self.columns), self.index, first_row, [None] * len(lines)
                )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError):
            pass
        # Slow path, only for a block with a bad line: each line on its own.
        rows: list[dict[str, Any]] = []
        errors: list[str | None] = []
        for number, line in lines:
            try:
                value = json.loads(line.decode("utf-8"))
                if not isinstance(value, dict):
                    raise ValueError(f"expected a JSON object, got {type(value).__name__}")
                pa.Table.from_pylist([value], schema=self.schema)
            except UnicodeDecodeError as e:
                rows.append({})
                errors.append(f"input line {number}: not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            except RecursionError:
                rows.append({})
                errors.append(f"input line {number}: JSON nested too deeply")
                continue
            except (ValueError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
                rows.append({})
                errors.append(f"input line {number}: {type(e).__name__}: {str(e)[:200]}")
                continue
            rows.append(value)
            errors.append(None)
        table = pa.Table.from_pylist(rows, schema=self.schema)
        return _with_ids(table, self.index, first_row, errors)

    def _csv(self, fs: pafs.FileSystem) -> Iterator[pa.Table]:
        bad: list[Any] = []

        def on_invalid(row: Any) -> str:
            bad.append(row)
            return "skip"

        convert = pacsv.ConvertOptions(
            include_columns=self.columns, column_types={f.name: f.type for f in self.schema}
        )
        parse = pacsv.ParseOptions(invalid_row_handler=on_invalid)
        row = 0
        with fs.open_input_stream(self.path) as stream:
            reader = pacsv.open_csv(stream, parse_options=parse, convert_options=convert)
            for batch in reader:
                table = pa.Table.from_batches([batch]).select(self.columns)
                yield _with_ids(table, self.index, row, [None] * table.num_rows)
                row += table.num_rows
        if bad:
            # Rows with the wrong number of fields: kept, as error rows, after the good ones.
            empty = pa.Table.from_pylist([{}] * len(bad), schema=self.schema)
            errors = [
                f"input line {r.number}: expected {r.expected_columns} fields, "
                f"got {r.actual_columns}"
                for r in bad
            ]
            yield _with_ids(empty, self.index, row, errors)
