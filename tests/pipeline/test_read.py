"""Reading: stable row ids, projection, and bad input lines kept as error rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_batch import columns
from llm_batch.errors import InputError
from llm_batch.pipeline.read import InputDatasource, inspect_input


def read_all(path, fmt, cols):
    info = inspect_input({"path": str(path)}, fmt)
    source = InputDatasource(str(path), fmt, info, cols)
    tables = [t for task in source.get_read_tasks(1) for t in task.read_fn()]
    return pa.concat_tables(tables)


def test_parquet_row_ids_are_positions_and_projection_holds(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(
        pa.table({"a": range(5), "b": list("vwxyz")}), folder / "0.parquet", row_group_size=2
    )
    pq.write_table(pa.table({"a": range(3), "b": list("abc")}), folder / "1.parquet")
    out = read_all(folder, "parquet", ["b"])
    assert out.column_names == ["b", columns.ROW_ID, columns.INPUT_ERROR]
    ids = out.column(columns.ROW_ID).to_pylist()
    assert sorted(ids) == [0, 1, 2, 3, 4, 1 << 40, (1 << 40) + 1, (1 << 40) + 2]
    assert out.column(columns.INPUT_ERROR).null_count == out.num_rows


def test_jsonl_bad_lines_become_error_rows_naming_the_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"id": 1, "text": "ok"}\n'
        b'{"id": 2, "text": \n'  # malformed JSON
        b"\n"  # blank: not a row
        b'{"id": 3, "text": "caf\xe9"}\n'  # not UTF-8
        b"[1, 2]\n"  # not an object
        b'{"id": 5, "text": "fine"}\n'
    )
    out = read_all(path, "jsonl", ["id", "text"]).to_pylist()
    assert len(out) == 5
    by_line = {r[columns.ROW_ID]: r for r in out}
    assert by_line[0]["text"] == "ok" and by_line[0][columns.INPUT_ERROR] is None
    assert by_line[1][columns.INPUT_ERROR].startswith("input line 2:")
    assert "not UTF-8" in by_line[2][columns.INPUT_ERROR]
    assert by_line[2][columns.INPUT_ERROR].startswith("input line 4:")
    assert "expected a JSON object" in by_line[3][columns.INPUT_ERROR]
    assert by_line[4]["text"] == "fine"


def test_csv_rows_with_wrong_field_count_are_kept_as_errors(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,text\n1,a\n2,b,extra\n3,c\n")
    out = read_all(path, "csv", ["id", "text"]).to_pylist()
    assert [r["id"] for r in out if r[columns.INPUT_ERROR] is None] == [1, 3]
    bad = [r for r in out if r[columns.INPUT_ERROR] is not None]
    assert len(bad) == 1 and "expected 2 fields, got 3" in bad[0][columns.INPUT_ERROR]


@pytest.mark.parametrize(
    ("content", "fmt", "needle"),
    [
        (b"", "jsonl", "is empty"),
        (b"\n\n", "jsonl", "is empty"),
        (b"not json at all\n", "jsonl", "holds no JSON object lines"),
        (b"id,text\n", "csv", "has no rows"),
    ],
)
def test_unusable_inputs_are_refused_up_front(tmp_path, content, fmt, needle):
    path = tmp_path / f"in.{fmt}"
    path.write_bytes(content)
    with pytest.raises(InputError, match=needle):
        inspect_input({"path": str(path)}, fmt)


def test_empty_parquet_is_refused(tmp_path):
    pq.write_table(pa.table({"a": pa.array([], pa.int64())}), tmp_path / "e.parquet")
    with pytest.raises(InputError, match="has no rows"):
        inspect_input({"path": str(tmp_path / "e.parquet")}, "parquet")
