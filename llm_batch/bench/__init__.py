"""``llm-batch bench``: this pipeline side by side with raw vLLM and Ray's ``ray.data.llm``.

    workload.py    the synthetic input (prompts sized in the model's tokens, carried columns)
    systems/       the three runners, each run in its own process
    harness.py     runs them one after another, samples memory, checks and measures outputs
    timeline.py    steady-state throughput, computed one way for every system
    processes.py   memory of a run's process tree; clean-up of what a run leaves behind
    report.py      the table and the chart
    cli.py         the command line (``add_bench_parser``)

Nothing here imports vLLM, torch or Ray at import time; the runners do, in
their own processes.
"""

from __future__ import annotations

from llm_batch.bench.cli import add_bench_parser
from llm_batch.bench.harness import BenchConfig, BenchError, failures, run_bench
from llm_batch.bench.timeline import SteadyState, steady_state
from llm_batch.bench.workload import Workload, WorkloadSpec

__all__ = [
    "BenchConfig",
    "BenchError",
    "SteadyState",
    "Workload",
    "WorkloadSpec",
    "add_bench_parser",
    "failures",
    "run_bench",
    "steady_state",
]
