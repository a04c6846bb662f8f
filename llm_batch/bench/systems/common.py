"""What the three runners share: the run file, reading the input, the result file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = [
    "ENGINE_STARTS_ENV",
    "OUTPUT_COLUMNS",
    "first_engine",
    "read_input",
    "record_engine_start",
    "write_result",
]

# Engine actors inherit the runner's environment on a local Ray: where to note their start.
ENGINE_STARTS_ENV = "LLM_BATCH_BENCH_ENGINE_STARTS"

# Every system's output, per task: the carryover columns, then these. An embedding is
# a list of float32 (llm-batch: fixed_size_list<float32>[D]; the harness reads any list).
OUTPUT_COLUMNS = {
    "generate": ("generated_text", "num_input_tokens", "num_output_tokens"),
    "embed": ("embedding", "num_input_tokens"),
}


def read_input(files: list[str], fmt: str) -> pa.Table:
    """All input rows as one Arrow table, read the way a user would with pyarrow."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    if fmt == "parquet":
        return pa.concat_tables(pq.read_table(f) for f in files)
    reader = pajson.read_json if fmt == "jsonl" else pacsv.read_csv
    return pa.concat_tables(reader(f) for f in files)


def write_result(path: str, result: dict[str, Any]) -> None:
    """Write the result JSON atomically, so the harness never reads half of one."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, path)


def record_engine_start(started: float, ready: float) -> None:
    """Note one engine's construction (monotonic start and end) for the runner to read."""
    path = os.environ.get(ENGINE_STARTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{started!r} {ready!r}\n")


def first_engine(path: str | Path) -> tuple[float | None, float | None]:
    """(start, ready) of the first engine to become ready, from ``record_engine_start``'s file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None, None
    starts = [tuple(float(v) for v in line.split()) for line in lines if line.strip()]
    if not starts:
        return None, None
    started, ready = min(starts, key=lambda s: s[1])
    return started, ready
