"""(a) Raw vLLM: what a user writes by hand, and the ceiling.

Read the input with pyarrow, start ``vllm.LLM``, ``LLM.generate`` over all
prompts at once, join the outputs with the carryover columns and write one
Parquet file. ``LLM.generate`` returns nothing before it is done, so its first
output row is at its return.

The timeline: ``LLM.generate`` accepts a factory for its progress bar and
updates it as each request finishes; ``CompletionStamps`` takes that place and
stamps ``time.monotonic()`` per finished request, in this process, as the
pipelines' probes do in theirs. vLLM's own request metrics would need engine
stats (``disable_log_stats=False``), which cost a visible share of throughput
on a 2-core machine; every system runs with the same engine arguments, ours.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llm_batch.bench.systems.common import read_input

__all__ = ["CompletionStamps", "run"]


class CompletionStamps:
    """Stands in for the tqdm bar ``LLM.generate(use_tqdm=...)`` drives; keeps the times."""

    def __init__(self, *, total: int | None = None, **kwargs: Any):
        self.n = 0
        self.total = total
        self.postfix = ""
        self.format_dict = {"elapsed": 1.0}  # read to format the postfix, then unused
        self.times: list[tuple[float, int]] = []

    def update(self, n: int = 1) -> None:
        self.times.append((time.monotonic(), n))
        self.n += n

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    table = read_input(cfg["input"]["files"], cfg["input"]["format"])
    prompts = table.column(cfg["prompt_column"]).to_pylist()

    from vllm import LLM, SamplingParams

    engine_started = time.monotonic()
    llm = LLM(**cfg["engine_args"])
    engine_ready = time.monotonic()
    params = SamplingParams(**cfg["sampling"])
    bars: list[CompletionStamps] = []

    def bar(*args: Any, **kwargs: Any) -> Any:
        if args:  # asked to wrap an iterable (prompts being rendered): hand it back
            return args[0]
        bars.append(CompletionStamps(**kwargs))
        return bars[-1]

    outputs = llm.generate(prompts, params, use_tqdm=bar)
    generated = time.monotonic()

    completions = [o.outputs[0] for o in outputs]
    out = table.select(cfg["carryover"])
    out = out.append_column("generated_text", pa.array([c.text for c in completions], pa.string()))
    out = out.append_column(
        "num_input_tokens", pa.array([len(o.prompt_token_ids or ()) for o in outputs], pa.int32())
    )
    out = out.append_column(
        "num_output_tokens", pa.array([len(c.token_ids) for c in completions], pa.int32())
    )
    folder = Path(cfg["output"])
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, folder / "part-00000.parquet", compression="zstd")
    written = time.monotonic()
    llm.llm_engine.engine_core.shutdown()  # end the engine-core process now, not at exit

    # Every request generates max_tokens (ignore_eos); the harness checks that on the output.
    per_request = cfg["sampling"]["max_tokens"]
    events = [(t, n * per_request) for b in bars for t, n in b.times]
    notes = ["timeline: each request's completion, stamped in LLM.generate's loop"]
    if not events:
        notes.append("LLM.generate reported no completions to its progress bar")
    return {
        "engine_started_at": engine_started,
        "engine_ready_at": engine_ready,
        "first_output_at": generated,
        "output_written_at": written,
        "events": events,
        "notes": notes,
    }
