"""(b) Ray's own batch LLM processor, ``ray.data.llm``.

``build_processor(vLLMEngineProcessorConfig(...))`` with the chat-template,
tokenize and detokenize stages off (the prompts are plain text and vLLM
detokenizes), the same batch size and engine arguments as ours, and Ray's
defaults for everything else, as a user gets them. The carryover columns ride
in the processor's ``__data`` rows and are picked out again by ``postprocess``.
Task embed: the processor's own embedding task (``task_type="embed"``: vLLM's
pooling runner, ``PoolingParams(task="embed")`` per row, vLLM's defaults), no
sampling parameters; ``postprocess`` keeps its ``embeddings`` (a NumPy vector per
row, written as Ray Data writes them) as ``embedding``.

Two probes, both ``time.monotonic()``:

- a cheap ``map_batches`` after the processor stamps each block as it comes
  out: when rows are handed back, which gives the first output row;
- the engine stage is swapped for ``StampingEngineUDF``, the same UDF that
  also notes when its engine started and was ready, and stamps each request
  as it finishes (one clock read per row). The request stamps are
  the throughput timeline: the stage hands back a block only when a whole Ray
  Data task (an input block of several batches) is done, and its batches run
  side by side, so the block stamps alone are too few for a rate.

On a machine without a GPU, Ray is told of one logical GPU (the engine stage
asks for one per replica) and vLLM's Ray metrics logger stays off (it imports
``ray.serve``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF

from llm_batch.bench.systems.common import ENGINE_STARTS_ENV, first_engine, record_engine_start

__all__ = ["DONE_COLUMN", "STAMP_COLUMN", "StampingEngineUDF", "run"]

STAMP_COLUMN = "__bench_block_out_at"
DONE_COLUMN = "__bench_request_done_at"
_ENGINE_STAGE = "vLLMEngineStage"


class StampingEngineUDF(vLLMEngineStageUDF):
    """Ray's vLLM stage UDF, noting its engine's start and stamping each request's row."""

    def __init__(self, *args: Any, **kwargs: Any):
        started = time.monotonic()
        super().__init__(*args, **kwargs)
        record_engine_start(started, time.monotonic())

    async def _generate_with_error_handling(self, row: dict[str, Any], batch_uuid: Any) -> dict:
        out = await super()._generate_with_error_handling(row, batch_uuid)
        out[DONE_COLUMN] = time.monotonic()
        return out


def _preprocess(
    row: dict[str, Any], *, prompt_column: str, sampling: dict[str, Any] | None
) -> dict:
    if sampling is None:  # embed: the stage's default pooling parameters
        return {"prompt": row[prompt_column]}
    return {"prompt": row[prompt_column], "sampling_params": dict(sampling)}


def _postprocess(row: dict[str, Any], *, carryover: list[str], task: str) -> dict[str, Any]:
    out = {c: row[c] for c in carryover}
    if task == "embed":
        out["embedding"] = row["embeddings"]
    else:
        out["generated_text"] = row["generated_text"]
    out["num_input_tokens"] = row["num_input_tokens"]
    if task != "embed":
        out["num_output_tokens"] = row["num_generated_tokens"]
    out[DONE_COLUMN] = row.get(DONE_COLUMN)
    return out


def _stamp(batch: pa.Table) -> pa.Table:
    return batch.append_column(
        STAMP_COLUMN, pa.array([time.monotonic()] * batch.num_rows, pa.float64())
    )


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import ray
    from ray.data import DataContext

    engines_file = Path(cfg["result"]).with_name("engines.txt")
    engines_file.unlink(missing_ok=True)
    os.environ[ENGINE_STARTS_ENV] = str(engines_file)  # before Ray starts: workers inherit it
    init: dict[str, Any] = {
        "address": "local",  # its own Ray, as llm-batch's (pipeline.run.ensure_ray)
        "num_cpus": cfg["num_cpus"],
        "include_dashboard": False,
        "logging_level": logging.WARNING,
    }
    if cfg["on_cpu"]:
        init["num_gpus"] = 1
    ray.init(**init)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False

    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    task = cfg["task"]
    # The stage sets vLLM's runner and convert from task_type itself (the same as ours).
    skip = {"model", "runner", "convert"}
    config = vLLMEngineProcessorConfig(
        model_source=cfg["model"],
        task_type=task,
        engine_kwargs={k: v for k, v in cfg["engine_args"].items() if k not in skip},
        batch_size=cfg["batch_size"],
        concurrency=cfg["replicas"],
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=False,
    )
    processor = build_processor(
        config,
        preprocess=functools.partial(
            _preprocess, prompt_column=cfg["prompt_column"], sampling=cfg["sampling"]
        ),
        postprocess=functools.partial(_postprocess, carryover=cfg["carryover"], task=task),
    )
    notes = [
        f"Ray's defaults: max_concurrent_batches={config.max_concurrent_batches}, "
        f"max_pending_requests={config.max_pending_requests} (auto)"
    ]
    if _ENGINE_STAGE in processor.list_stage_names():
        processor.get_stage_by_name(_ENGINE_STAGE).fn = StampingEngineUDF
    else:
        notes.append(f"no {_ENGINE_STAGE} stage to probe; timeline from block stamps")

    files, fmt = cfg["input"]["files"], cfg["input"]["format"]
    if fmt == "parquet":
        ds = ray.data.read_parquet(files)
    elif fmt == "jsonl":
        ds = ray.data.read_json(files)
    else:
        ds = ray.data.read_csv(files)
    ds = processor(ds).map_batches(
        _stamp, batch_format="pyarrow", batch_size=None, zero_copy_batch=True
    )
    ds.write_parquet(cfg["output"], compression="zstd")
    written = time.monotonic()
    ray.shutdown()

    counted = [] if task == "embed" else ["num_output_tokens"]  # embed: a row each
    times = pq.read_table(cfg["output"], columns=[STAMP_COLUMN, DONE_COLUMN, *counted])
    done = times.column(DONE_COLUMN).to_pylist()
    if not any(done):  # the probe did not take: fall back to the coarse block stamps
        done = times.column(STAMP_COLUMN).to_pylist()
    counts = times.column(counted[0]).to_pylist() if counted else [1] * times.num_rows
    events = [(t, n) for t, n in zip(done, counts, strict=True) if t]
    blocks = pc.count_distinct(times.column(STAMP_COLUMN)).as_py()
    notes.append(f"timeline: each request's completion; rows handed back in {blocks} blocks")
    engine_started, engine_ready = first_engine(engines_file)
    return {
        "engine_started_at": engine_started,
        "engine_ready_at": engine_ready,
        "first_output_at": pc.min(times.column(STAMP_COLUMN)).as_py(),
        "output_written_at": written,
        "events": events,
        "notes": notes,
    }
