"""The three systems under test, each run in its own process by the harness.

    python -m llm_batch.bench.systems SYSTEM RUN.json

``RUN.json`` holds everything a run needs (task, model, engine arguments,
sampling, input files, carryover, output folder, where to write the result).
Each runner reads the same input files, runs the task with the same engine
arguments (and sampling), writes Parquet with the carryover columns and
``OUTPUT_COLUMNS[task]`` (``common.py``), and writes a result JSON of monotonic
timestamps (``time.monotonic()``, one clock for every process on Linux) and a
completion timeline for the harness to measure: output tokens when generating,
rows when embedding.
"""

from __future__ import annotations

__all__ = ["SYSTEMS"]

# Display order: the ceiling, the alternative, this project.
SYSTEMS = ("raw", "ray-data-llm", "llm-batch")
