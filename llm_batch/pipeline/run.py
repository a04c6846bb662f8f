"""Build and run one job's Ray Data pipeline.

    read (only needed columns) ─► render prompts (× n samples) ─► blocks of one batch
        ─► model A engine pool ─► model B engine pool … ─► write Parquet
        (+ _metrics.json from the accumulators)

``plan_job`` does every check that needs no engine (input exists, columns the
template and carryover name are there, templates parse), so a bad job fails in
a second; ``run_job`` then streams the data through Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.fs as pafs

from llm_batch import columns
from llm_batch.errors import EngineUnavailable, JobSpecError
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.accumulators import JobContext
from llm_batch.pipeline.engine import EngineStage
from llm_batch.pipeline.placement import engine_batch_size, engine_map_kwargs
from llm_batch.pipeline.progress import ProgressTracker, Snapshot
from llm_batch.pipeline.prompts import PromptRenderer
from llm_batch.pipeline.read import InputDatasource, InputInfo, check_columns, inspect_input
from llm_batch.pipeline.write import (
    CHECKPOINT_NAME,
    AtomicParquetDatasink,
    clear_output,
    committed_parts,
    open_filesystem,
    write_metrics,
)

__all__ = ["JobPlan", "JobResult", "ensure_ray", "input_dataset", "plan_job", "run_job"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class JobPlan:
    spec: JobSpec
    input_format: str
    input_info: InputInfo
    read_columns: list[str]  # template columns ∪ carryover ∪ label/overrides, in input order
    carried: list[str]  # columns that travel to the engines: carryover + label/overrides

    @property
    def drop_before_write(self) -> list[str]:
        """Columns that ride to the engines but are not output."""
        internal = [columns.PROMPT, columns.MESSAGES, columns.RENDER_ERROR, columns.INPUT_ERROR]
        return internal + [c for c in self.carried if c not in self.written]

    @property
    def written(self) -> list[str]:
        """Input columns in the output: row_id, the carryover, and the label column."""
        label = self.spec.metrics.label_column
        return [columns.ROW_ID, *self.spec.carryover] + (
            [label] if label and label not in self.spec.carryover else []
        )


@dataclasses.dataclass(frozen=True)
class JobResult:
    output_path: str
    progress: Snapshot
    wall_seconds: float


def plan_job(spec: JobSpec) -> JobPlan:
    """All checks that need no engine; raises ``JobSpecError`` or ``InputError``."""
    fmt = spec.input.resolved_format
    renderer = PromptRenderer(spec.prompt.model_dump())
    info = inspect_input(spec.input.model_dump(), fmt)
    check_columns(
        info.schema,
        {
            spec.prompt.field: renderer.variables,
            "carryover": set(spec.carryover),
            "input.columns": set(spec.input.columns or []),
            "metrics.label_column": {spec.metrics.label_column} - {None},
            "sampling.overrides_column": {spec.sampling.overrides_column} - {None},
        },
    )
    for field, model in spec.named_models():
        _check_model_path(field, model.path)
    if spec.metrics.accumulators:  # import errors surface now, not inside an actor
        from llm_batch.pipeline.accumulators import AccumulatorSet, JobContext

        AccumulatorSet(JobContext(), spec.metrics.accumulators)
    extra = [c for c in (spec.metrics.label_column, spec.sampling.overrides_column) if c]
    carried = [columns.ROW_ID, *spec.carryover] + [
        c for c in dict.fromkeys(extra) if c not in spec.carryover
    ]
    wanted = renderer.variables | set(carried[1:]) | set(spec.input.columns or [])
    read_columns = [n for n in info.schema.names if n in wanted]
    return JobPlan(spec, fmt, info, read_columns, carried)


def _check_model_path(field: str, path: str) -> None:
    """A local model folder must hold a config.json; anything else is taken as a hub id."""
    if not (path.startswith(("/", ".", "~")) or os.path.exists(path)):
        return
    folder = os.path.expanduser(path)
    if not os.path.isdir(folder):
        raise JobSpecError(f"{field}.path: model folder {path!r} does not exist")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise JobSpecError(
            f"{field}.path: {path!r} holds no config.json (a Hugging Face model folder is needed)"
        )


@functools.lru_cache(maxsize=8)
def _renderer(prompt_json: str) -> PromptRenderer:
    return PromptRenderer(json.loads(prompt_json))


def _render_batch(batch: pa.Table, *, prompt_json: str, keep: list[str], n: int) -> pa.Table:
    """Render prompts, keep only the columns that travel on, and repeat each row n times."""
    rendered = _renderer(prompt_json)(batch)
    internal = [c for c in rendered.column_names if c.startswith(columns.INTERNAL_PREFIX)]
    out = rendered.select(keep + internal)
    if n > 1:
        # Sample-major within a prompt: rows i*n .. i*n+n-1 are prompt i's samples.
        rows = out.num_rows
        out = out.take(pa.array([i for i in range(rows) for _ in range(n)], pa.int64()))
        index = pa.array([k for _ in range(rows) for k in range(n)], pa.int32())
        out = out.add_column(len(keep), columns.SAMPLE_INDEX, index)
    return out


def _preload(tracker: Any, spec: JobSpec, *, rows_per_call: int = 65_536) -> int:
    """Count what an interrupted run already committed, so progress and metrics cover it.

    Streams only the columns the counts and accumulators read, a slice at a time: an
    output of many rows with wide carryover columns must not land in memory at once.
    """
    import pyarrow.dataset as pads
    import ray

    from llm_batch.pipeline.accumulators import BatchView

    files = committed_parts(spec.output_path)
    if not files:
        return 0
    fs, _ = open_filesystem(spec.output_path)
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    label = spec.metrics.label_column
    structured = spec.sampling.structured
    # The label's probability is scored from the logprobs (choice jobs with a label only).
    scored = (
        label is not None
        and spec.sampling.logprobs is not None
        and structured is not None
        and bool(structured.choice)
    )
    outputs = list(columns.OUTPUT_COLUMNS) + ([columns.LOGPROBS] if scored else [])
    plain = {name: {columns.model_column(name, c): c for c in outputs} for name in spec.model_names}
    wanted = [c for names in plain.values() for c in names] + ([label] if label else [])
    done = 0
    for batch in dataset.to_batches(columns=list(dict.fromkeys(wanted)), batch_size=rows_per_call):
        table = pa.Table.from_batches([batch])
        done += table.num_rows
        for name, names in plain.items():
            view = table.select(list(names)).rename_columns(list(names.values()))
            if label:
                view = view.append_column(label, table.column(label))
            ray.get(
                tracker.preload.remote(
                    model=name,
                    rows=view.num_rows,
                    failed=view.num_rows - view.column(columns.ERROR).null_count,
                    input_tokens=int(
                        pa.compute.sum(view.column(columns.NUM_INPUT_TOKENS)).as_py() or 0
                    ),
                    output_tokens=int(
                        pa.compute.sum(view.column(columns.NUM_OUTPUT_TOKENS)).as_py() or 0
                    ),
                    view=BatchView(view, pa.nulls(view.num_rows, pa.float64()), name),
                )
            )
    return done


def input_dataset(spec: JobSpec, plan: JobPlan, *, rows_per_block: int) -> Any:
    """The job's rows as Ray Data will hand them to the first engine pool: read, rendered
    (× n samples), in blocks of ``rows_per_block`` rows (the last block of a read task may
    be short), all in one fused task per read task.

    Blocks of exactly one engine batch: Ray Data hands an engine actor whole blocks, and
    the call ends when its last batch does. A block of any other size leaves a remainder
    batch that joins the engine's queue behind the next call's rows, so calls end in pairs
    and the engine's queue drains between them (measured, 4000x64->64: steps with the
    engine under-filled and nothing waiting fell from a third to 8% once blocks were cut
    to a batch). The cut is a non-strict streaming repartition, which Ray Data fuses into
    the read-and-render task (``ReadInput->MapBatches(_render_batch)->StreamingRepartition``):
    no operator, task or copy of its own. It falls on multiples of n when
    ``rows_per_block`` is one, so a prompt's samples stay together.
    """
    import ray.data

    ds = ray.data.read_datasource(
        InputDatasource(spec.input.path, plan.input_format, plan.input_info, plan.read_columns),
        # Left to itself, Ray Data splits every read task's output k ways to reach its
        # default parallelism (200 blocks: 20-row blocks for 4,000 rows), and the render
        # step, one task at a time within its CPU budget, then fed the engine pool about
        # one small block per scheduling round, slower than an engine drains it: the engine
        # held one batch instead of max_batches_in_flight and sat idle between batches.
        override_num_blocks=1,
    )
    ds = ds.map_batches(
        _render_batch,
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        fn_kwargs={
            "prompt_json": json.dumps(spec.prompt.model_dump()),
            "keep": plan.carried,
            "n": spec.sampling.n,
        },
    )
    return ds.repartition(target_num_rows_per_block=rows_per_block, strict=False)


# For a Ray this project starts itself (here, and the service's local head). Ray starts
# workers at niceness 15, below its own daemons and the driver; an engine's processes,
# spawned from a worker, would lose a core to any of them in the middle of a step. Here
# they run at normal priority, and each engine's front end lowers itself below them
# (engine._yield_to_engine). On a cluster the cluster's setting stands.
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0}


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {}
    if not address:
        # A local Ray counts logical CPUs. Each CPU-engine actor holds one for
        # its life; at least two more keep reading and writing flowing beside
        # them (the engines' own threads are not Ray's to count).
        kwargs["num_cpus"] = max(os.cpu_count() or 1, 4)
        kwargs["_system_config"] = LOCAL_RAY_SYSTEM_CONFIG
        # A private Ray, never one found on this machine: with no address Ray would join
        # whatever cluster `ray start` last recorded in /tmp/ray (even a dead one) and
        # refuse num_cpus. A cluster is used when named (--address / RAY_ADDRESS).
        address = "local"
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        **kwargs,
    )


def run_job(
    spec: JobSpec,
    *,
    plan: JobPlan | None = None,
    on_progress: Callable[[Snapshot], None] | None = None,
    progress_interval: float = 1.0,
    resume: bool = True,
) -> JobResult:
    """Run a job to completion on the connected (or a new local) Ray; blocks.

    With ``resume`` (the default), a job whose earlier run was interrupted
    continues where it stopped, keeping what that run wrote; without, or when
    there is nothing to resume, the output folder's old part files are removed.
    """
    import ray
    import ray.data
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    plan = plan or plan_job(spec)
    spec.output_path  # noqa: B018 - fails with a clear message when unset
    assert spec.output is not None
    ensure_ray()
    started = time.monotonic()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own, from the tracker
    ctx.print_on_execution_start = False

    rows_total = plan.input_info.rows_total
    if rows_total is not None:
        rows_total *= spec.sampling.n
    structured = spec.sampling.structured
    # The tracker lives beside the driver: losing a worker node must not lose progress.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tracker = ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressTracker).remote(
        rows_total,
        spec.model_names,
        job=JobContext(
            label_column=spec.metrics.label_column,
            choices=tuple(structured.choice) if structured and structured.choice else None,
        ),
        accumulators=spec.metrics.accumulators,
    )
    # Resume when an earlier run of this job left a checkpoint: Ray Data skips
    # the input rows whose output is committed and deletes uncommitted files.
    # Ray Data takes a URI or an absolute path; job files name relative ones (out/<name>).
    output = spec.output_path if "://" in spec.output_path else os.path.abspath(spec.output_path)
    checkpoint = output.rstrip("/") + "/" + CHECKPOINT_NAME
    fs, cp_path = open_filesystem(checkpoint)
    resuming = resume and fs.get_file_info(cp_path).type != pafs.FileType.NotFound
    if resuming:
        done = _preload(tracker, spec)
        logger.info("resuming %s: %d rows already written", spec.name, done)
    else:
        clear_output(spec.output_path)
    ctx.checkpoint_config = CheckpointConfig(
        id_column=columns.ROW_ID,
        checkpoint_path=checkpoint,
        delete_checkpoint_on_success=True,
    )

    # One engine pool per model, chained: the data is read once and every model
    # sees every row; the pools run at the same time on different batches.
    named = spec.named_models()
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    models = [model.model_dump() for _, model in named]
    # Whole prompts per batch: a prompt's n samples are written (and checkpointed) together.
    n = spec.sampling.n
    batch_rows = [-(-engine_batch_size(m, cluster_gpus=cluster_gpus) // n) * n for m in models]

    ds = input_dataset(spec, plan, rows_per_block=batch_rows[0])
    block_rows = batch_rows[0]
    for i, (model_dict, rows, name) in enumerate(
        zip(models, batch_rows, spec.model_names, strict=True)
    ):
        last = i == len(named) - 1
        if rows != block_rows:
            # A model with another batch size: cut again (see input_dataset), strictly,
            # across blocks; an operator of its own. On multiples of n, as rows is one.
            ds = ds.repartition(target_num_rows_per_block=rows, strict=True)
            block_rows = rows
        placed = engine_map_kwargs(model_dict, cluster_gpus=cluster_gpus)
        model_dict["engine"]["extra_args"] = {
            **placed.pop("engine_overrides"),
            **model_dict["engine"]["extra_args"],
        }
        ds = ds.map_batches(
            EngineStage,
            fn_constructor_kwargs={
                "model": model_dict,
                "sampling": spec.sampling.model_dump(),
                "model_name": name,
                "progress": tracker,
                "metrics": spec.metrics.model_dump(),
                "drop": plan.drop_before_write if last else [],
            },
            batch_format="pyarrow",
            batch_size=rows,
            zero_copy_batch=True,
            # Ray Data restarts a dead engine actor and re-runs its tasks as often as it
            # takes (its defaults for actor pools: max_restarts and max_task_retries -1;
            # passing them again is deprecated). The bound is per batch, in the tracker's
            # ledger (progress.py), since a re-run of a task repeats all its batches.
            **placed,
        )

    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(progress_interval):
            try:
                snap = ray.get(tracker.snapshot.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            if on_progress is not None:
                on_progress(snap)

    follower = threading.Thread(target=follow, daemon=True, name="llm-batch-progress")
    follower.start()
    try:
        ds.write_datasink(
            AtomicParquetDatasink(spec.output_path, min_rows_per_file=spec.output.rows_per_file)
        )
    except Exception as e:
        # An engine that cannot start kills its actor; Ray reports the actor's
        # death with the whole traceback. Give the user the one line that matters.
        found = re.search(r"EngineUnavailable: (.+)", str(e))
        if found:
            raise EngineUnavailable(found.group(1).strip()) from e
        raise
    finally:
        stop.set()
        follower.join()
    final = ray.get(tracker.snapshot.remote())
    ray.kill(tracker)
    write_metrics(spec.output_path, final)
    if on_progress is not None:
        on_progress(final)
    return JobResult(spec.output_path, final, time.monotonic() - started)
