"""(a) Raw vLLM: what a user writes by hand, and the ceiling.

Read the input with pyarrow, start ``vllm.LLM``, ``LLM.generate`` over all
prompts at once, join the outputs with the carryover columns and write one
Parquet file. ``LLM.generate`` returns nothing before it is done, so its first
output row is at its return. Task embed: the same with ``LLM.embed`` (the engine
arguments, ours, name the pooling runner), which also returns when done.

The timeline: each finished request (its output tokens, or one row when
embedding), stamped with the engine core's own time of
the step that finished it (``EngineCoreOutputs.timestamp``, ``time.monotonic()``
in the engine-core process; on Linux one clock for every process, the clock the
pipelines' probes use). ``CompletionStamps`` wraps the engine client's
``get_output``, which ``LLM.generate`` calls once per engine step; it changes
nothing it returns. Stamping when ``LLM.generate`` sees a completion (its
progress bar) is not enough: the loop only starts reading outputs once it has
added every prompt, and on a busy machine the engine had by then finished most
or all of them, so their stamps bunched into a fraction of a second and the
rate came out ten times too high. vLLM's own request metrics would need engine
stats (``disable_log_stats=False``), which cost a visible share of throughput
on a 2-core machine; every system runs with the same engine arguments, ours.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_batch.bench.systems.common import read_input

__all__ = ["CompletionStamps", "run"]


class CompletionStamps:
    """Wraps an engine client's ``get_output``: notes ``(engine-core time, requests finished)``."""

    def __init__(self, client: Any):
        self.times: list[tuple[float, int]] = []
        self._get_output = client.get_output
        client.get_output = self

    def __call__(self) -> Any:
        outputs = self._get_output()
        finished = sum(1 for o in outputs.outputs if o.finish_reason is not None)
        if finished:
            self.times.append((outputs.timestamp, finished))
        return outputs


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    table = read_input(cfg["input"]["files"], cfg["input"]["format"])
    prompts = table.column(cfg["prompt_column"]).to_pylist()
    embed = cfg["task"] == "embed"

    from vllm import LLM

    engine_started = time.monotonic()
    llm = LLM(**cfg["engine_args"])
    engine_ready = time.monotonic()
    stamps = CompletionStamps(llm.llm_engine.engine_core)
    out = table.select(cfg["carryover"])
    if embed:
        outputs = llm.embed(prompts, use_tqdm=False)
        finished = time.monotonic()
        out = _embed_columns(out, outputs)
        per_request = 1  # a row
    else:
        from vllm import SamplingParams

        params = SamplingParams(**cfg["sampling"])
        generated = llm.generate(prompts, params, use_tqdm=False)
        finished = time.monotonic()
        out = _generate_columns(out, generated)
        # Every request generates max_tokens (ignore_eos); the harness checks that on the output.
        per_request = cfg["sampling"]["max_tokens"]
    folder = Path(cfg["output"])
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, folder / "part-00000.parquet", compression="zstd")
    written = time.monotonic()
    llm.llm_engine.engine_core.shutdown()  # end the engine-core process now, not at exit

    events = [(t, n * per_request) for t, n in stamps.times]
    notes = ["timeline: each request's completion, stamped with its engine step's time"]
    if not events:
        notes.append("the engine client's get_output returned no finished requests")
    return {
        "engine_started_at": engine_started,
        "engine_ready_at": engine_ready,
        "first_output_at": finished,
        "output_written_at": written,
        "events": events,
        "notes": notes,
    }


def _generate_columns(out: pa.Table, outputs: list[Any]) -> pa.Table:
    completions = [o.outputs[0] for o in outputs]
    out = out.append_column("generated_text", pa.array([c.text for c in completions], pa.string()))
    out = out.append_column(
        "num_input_tokens", pa.array([len(o.prompt_token_ids or ()) for o in outputs], pa.int32())
    )
    return out.append_column(
        "num_output_tokens", pa.array([len(c.token_ids) for c in completions], pa.int32())
    )


def _embed_columns(out: pa.Table, outputs: list[Any]) -> pa.Table:
    vectors = np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    out = out.append_column("embedding", embedding)
    return out.append_column(
        "num_input_tokens", pa.array([len(o.prompt_token_ids or ()) for o in outputs], pa.int32())
    )
