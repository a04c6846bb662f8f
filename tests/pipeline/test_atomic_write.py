"""A part file appears under its final name only once it is complete: the sink writes a
hidden file and renames it, also through the filesystem wrapper Ray Data puts around it."""

from __future__ import annotations

import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llm_batch.pipeline import write
from llm_batch.pipeline.write import WRITE_UUID_KWARG_NAME, AtomicParquetDatasink


def test_a_part_is_written_hidden_then_renamed(tmp_path: Path, monkeypatch):
    sink = AtomicParquetDatasink(str(tmp_path), run_id="r1")
    assert hasattr(sink.filesystem, "unwrap")  # Ray Data's retrying wrapper
    seen: list[list[str]] = []
    real = pq.write_table

    def spy(table, where, **kwargs):  # noqa: ANN001, ANN003
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real(table, where, **kwargs)

    monkeypatch.setattr(write.pq, "write_table", spy)
    ctx = types.SimpleNamespace(kwargs={WRITE_UUID_KWARG_NAME: "u"}, task_idx=0)
    sink.write([pa.table({"x": [1, 2]})], ctx)
    (during,) = seen
    assert len(during) == 1 and during[0].startswith(".") and during[0].endswith(".inprogress")
    (part,) = [p for p in tmp_path.iterdir()]
    assert not part.name.startswith(".") and pq.read_table(part).num_rows == 2
