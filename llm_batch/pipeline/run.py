"""Build and run one job's Ray Data pipeline.

    read (only needed columns) ─► render prompts (× n samples) ─► blocks of one batch
        ─► model A engine pool ─► model B engine pool … ─► write Parquet
        (+ _metrics.json from the accumulators)

``plan_job`` does every check that needs no engine (input exists, columns the
template and carryover name are there, templates parse), so a bad job fails in
a second; ``run_job`` then streams the data through Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.fs as pafs

from llm_batch import columns
from llm_batch.errors import EngineUnavailable, JobSpecError
from llm_batch.job.spec import POOLING_TASKS, JobSpec, Step
from llm_batch.pipeline import cache as response_cache
from llm_batch.pipeline.accumulators import JobContext
from llm_batch.pipeline.cache import CacheConfig
from llm_batch.pipeline.engine import EngineStage
from llm_batch.pipeline.engine_args import lora_rank_limit
from llm_batch.pipeline.fs import open_filesystem
from llm_batch.pipeline.limits import check_model_limits
from llm_batch.pipeline.manifest import (
    MANIFEST_NAME,
    Manifest,
    OutputFolder,
    check_apart,
    is_part_file,
    new_run_id,
)
from llm_batch.pipeline.placement import engine_batch_size, engine_map_kwargs, on_gpu
from llm_batch.pipeline.pool import JobCancelled, pool_stage_config, send_to_pool
from llm_batch.pipeline.progress import ProgressTracker, Snapshot
from llm_batch.pipeline.prompts import KeepIf, PromptRenderer
from llm_batch.pipeline.read import InputDatasource, InputInfo, check_columns, inspect_input
from llm_batch.pipeline.retry import finish_moves, prepare_retry
from llm_batch.pipeline.rows import accumulator_view
from llm_batch.pipeline.write import (
    CHECKPOINT_NAME,
    OWN_FILES,
    AtomicParquetDatasink,
    clear_output,
    committed_parts,
    write_metrics,
)

__all__ = [
    "Engines",
    "JobPlan",
    "JobResult",
    "OutputRun",
    "claim_output",
    "engine_pools",
    "ensure_ray",
    "new_tracker",
    "input_dataset",
    "one_batch",
    "plan_job",
    "run_job",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class JobPlan:
    spec: JobSpec
    input_format: str
    input_info: InputInfo
    read_columns: list[str]  # template columns ∪ carryover ∪ label/overrides, in input order
    # Columns that travel to the engines: carryover, label, overrides, and the input
    # columns later stages' templates and keep_if read.
    carried: list[str]

    @property
    def drop_before_write(self) -> list[str]:
        """Columns that ride to the engines but are not output."""
        internal = [
            columns.PROMPT,
            columns.MESSAGES,
            columns.PAIR,
            columns.RENDER_ERROR,
            columns.INPUT_ERROR,
            columns.DROPPED,
        ]
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
    info = inspect_input(spec.input.model_dump(), fmt)
    needed: dict[str, set[str]] = {
        "carryover": set(spec.carryover),
        "input.columns": set(spec.input.columns or []),
        "metrics.label_column": {c for c in [spec.metrics.label_column] if c},
    }
    # Each stage reads input columns and the columns earlier stages wrote (keep_if: its own
    # stage's too); the input columns read after the first render travel with the rows.
    written: set[str] = set()
    later: list[str] = []
    first = PromptRenderer(spec.steps[0].prompt.model_dump())
    for i, step in enumerate(spec.steps):
        at, prompt = step.field, step.prompt
        renderer = first if i == 0 else PromptRenderer(prompt.model_dump(), field=at + "prompt")
        pair = "prompt.template_pair" if prompt.template_pair else "prompt.pair_column"
        reads = {
            at + prompt.field: renderer.variables - renderer.pair_variables - written,
            at + pair: renderer.pair_variables - written,
            at + "sampling.overrides_column": {c for c in [step.sampling.overrides_column] if c},
        }
        written |= set(step.output_columns())
        if step.keep_if is not None:
            keep = KeepIf(step.keep_if, field=at + "keep_if")
            reads[at + "keep_if"] = keep.variables - written
        for field, names in reads.items():
            needed[field] = needed.get(field, set()) | names
            if i or field.endswith(("keep_if", "overrides_column")):
                later += sorted(names)
    check_columns(info.schema, needed)
    for field, model in spec.named_models():
        _check_model_path(field, model.path)
        if model.lora is not None:
            _check_adapter(field, model.lora)
        check_model_limits(field, model, spec.sampling_of(_prefix(spec, field)))
    if spec.output is not None:
        check_apart(spec.input.path, spec.output.path)
        _check_output_folder(spec)
    if spec.metrics.accumulators:  # import errors surface now, not inside an actor
        from llm_batch.pipeline.accumulators import AccumulatorSet, JobContext

        AccumulatorSet(JobContext(), spec.metrics.accumulators)
    extra = [c for c in (spec.metrics.label_column, *later) if c]
    carried = [columns.ROW_ID, *spec.carryover] + [
        c for c in dict.fromkeys(extra) if c not in spec.carryover
    ]
    wanted = first.variables | set(carried[1:]) | set(spec.input.columns or [])
    read_columns = [n for n in info.schema.names if n in wanted]
    return JobPlan(spec, fmt, info, read_columns, carried)


def _prompt_of(spec: JobSpec, model_name: str | None) -> Any:
    """The prompt block of the stage a model (by its column prefix) is in."""
    return next(s.prompt for s in spec.steps if any(n == model_name for _, n, _ in s.models))


def _prefix(spec: JobSpec, field: str) -> str | None:
    """The column prefix of the model at spec path ``field``."""
    return next(name for step in spec.steps for f, name, _ in step.models if f == field)


def _check_output_folder(spec: JobSpec) -> None:
    """Refuse an output folder holding files llm-batch did not write (``manifest.py``).
    Object storage this process cannot reach now is checked when the job starts
    (``claim_output``), where the engines' nodes must reach it."""
    assert spec.output is not None
    try:
        folder = OutputFolder.inspect(spec.output.path)
    except OSError as e:
        if "://" not in spec.output.path:
            raise JobSpecError(f"output.path: {spec.output.path!r} cannot be read: {e}") from None
        logger.warning("output.path %s not checked before the run: %s", spec.output.path, e)
        return
    folder.check(mode=spec.output.mode, will_write=[*OWN_FILES, MANIFEST_NAME])


def _local_folder(path: str) -> str | None:
    """The folder a model or adapter path names, None for a hub id (the engine downloads it)."""
    if not (path.startswith(("/", ".", "~")) or os.path.exists(path)):
        return None
    return os.path.expanduser(path)


def _check_adapter(field: str, path: str) -> None:
    """A local LoRA adapter folder must hold an adapter_config.json (PEFT's)."""
    folder = _local_folder(path)
    if folder is not None and not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise JobSpecError(
            f"{field}.lora: {path!r} holds no adapter_config.json (a PEFT LoRA adapter "
            "folder is needed)"
        )


def _check_model_path(field: str, path: str) -> None:
    """A local model folder must hold a config.json; anything else is taken as a hub id."""
    folder = _local_folder(path)
    if folder is None:
        return
    if not os.path.isdir(folder):
        raise JobSpecError(f"{field}.path: model folder {path!r} does not exist")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise JobSpecError(
            f"{field}.path: {path!r} holds no config.json (a Hugging Face model folder is needed)"
        )


@functools.lru_cache(maxsize=8)
def _renderer(prompt_json: str) -> PromptRenderer:
    return PromptRenderer(json.loads(prompt_json))


def _render_batch(
    batch: pa.Table,
    *,
    prompt_json: str,
    keep: list[str],
    n: int,
    group: bool = False,
    staged: bool = False,
) -> pa.Table:
    """Render prompts, keep only the columns that travel on, group rows by prompt prefix
    (``group``), and repeat each row n times. A staged job's rows get their ``dropped_by``
    (null: none has stopped yet)."""
    rendered = _renderer(prompt_json)(batch)
    internal = [c for c in rendered.column_names if c.startswith(columns.INTERNAL_PREFIX)]
    out = rendered.select(keep + internal)
    if staged:
        out = out.append_column(columns.DROPPED, pa.nulls(out.num_rows, pa.string()))
    if group:
        out = group_by_prefix(out)
    if n > 1:
        # Sample-major within a prompt: rows i*n .. i*n+n-1 are prompt i's samples.
        rows = out.num_rows
        out = out.take(pa.array([i for i in range(rows) for _ in range(n)], pa.int64()))
        index = pa.array([k for _ in range(rows) for k in range(n)], pa.int32())
        out = out.add_column(len(keep), columns.SAMPLE_INDEX, index)
    return out


def group_by_prefix(block: pa.Table) -> pa.Table:
    """The block's rows in the order of their prompts (chat messages: their roles and
    contents), so that rows sharing a prefix sit side by side and the cut into batches puts
    them in the same batch: one engine gets them together, and its prefix cache (and the
    duplicate and response caches) serve them. Rows that failed to render go last. The
    window is the read block, so the dataset is never held or sorted whole."""
    if block.num_rows < 2:
        return block
    if columns.PROMPT in block.column_names:
        keys = block.column(columns.PROMPT)
    elif columns.MESSAGES in block.column_names:
        keys = pa.array(
            [
                None if m is None else "\0".join(f"{x['role']}\0{x['content']}" for x in m)
                for m in block.column(columns.MESSAGES).to_pylist()
            ],
            pa.string(),
        )
    else:
        return block
    order = pa.compute.array_sort_indices(keys, null_placement="at_end")
    return block.take(order)


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
    # A pooling model's own columns but its vectors (an embedder's are not read).
    own = {
        task: [c for c in columns.TASK_COLUMNS[task] if c != columns.EMBEDDING]
        for task in POOLING_TASKS
    }
    tasks: dict[str | None, str] = {}
    plain: dict[str | None, dict[str, str]] = {}
    # A staged job's model ran on the rows that had not stopped before its stage.
    ran_after: dict[str | None, list[str]] = {}
    staged = spec.stages is not None
    for k, step in enumerate(spec.steps):
        structured = step.sampling.structured
        # The label's probability is scored from the logprobs (choice jobs with a label only).
        scored = (
            label is not None
            and step.sampling.logprobs is not None
            and structured is not None
            and bool(structured.choice)
        )
        outputs = list(columns.OUTPUT_COLUMNS) + ([columns.LOGPROBS] if scored else [])
        for _, name, model in step.models:
            tasks[name] = model.task
            plain[name] = {columns.model_column(name, c): c for c in own.get(model.task, outputs)}
            ran_after[name] = [str(s.name) for s in spec.steps[k:]]
    wanted = [c for names in plain.values() for c in names] + ([label] if label else [])
    wanted += [columns.DROPPED_BY] if staged else []
    done = 0
    for batch in dataset.to_batches(columns=list(dict.fromkeys(wanted)), batch_size=rows_per_call):
        table = pa.Table.from_batches([batch])
        done += table.num_rows
        for name, names in plain.items():
            view = table.select(list(names)).rename_columns(list(names.values()))
            view = accumulator_view(view, tasks[name])
            if label and tasks[name] in ("generate", "classify"):
                view = view.append_column(label, table.column(label))
            if staged:
                stopped = table.column(columns.DROPPED_BY)
                ran = pa.compute.or_kleene(
                    stopped.is_null(), pa.compute.is_in(stopped, pa.array(ran_after[name]))
                )
                view = view.filter(ran)
            ray.get(
                tracker.preload.remote(
                    model=name,
                    rows=table.num_rows,
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


def input_dataset(
    spec: JobSpec, plan: JobPlan, *, rows_per_block: int, task_cpus: float | None = None
) -> Any:
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
        **_cpus(task_cpus),
    )
    ds = ds.map_batches(
        _render_batch,
        **_cpus(task_cpus),
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        fn_kwargs={
            "prompt_json": json.dumps(spec.steps[0].prompt.model_dump()),
            "keep": plan.carried,
            "n": spec.samples_per_row,
            "group": spec.steps[0].prompt.group_by_prefix,
            "staged": spec.stages is not None,
        },
    )
    if task_cpus is not None:
        # A small job (the service's engine host): its few rows are one block already, and
        # without the cut Ray Data fuses the read, render, the pool call and the write into
        # one task (_pool_stage_resources, _write): one scheduling round instead of four.
        return ds
    return ds.repartition(target_num_rows_per_block=rows_per_block, strict=False)


def _cpus(task_cpus: float | None) -> dict[str, Any]:
    return {} if task_cpus is None else {"num_cpus": task_cpus}


# For a Ray this project starts itself (here, and the service's local head). Ray starts
# workers at niceness 15, below its own daemons and the driver; an engine's processes,
# spawned from a worker, would lose a core to any of them in the middle of a step. Here
# they run at normal priority, and each engine's front end lowers itself below them
# (generation._yield_to_engine). On a cluster the cluster's setting stands.
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


@dataclasses.dataclass(frozen=True)
class Engines:
    """How a job's models get their engines. By default each model starts engines of its
    own (``EngineStage``, the actor class; replaceable, as the benchmark's timing stage
    does). ``pools`` (model name, None for a single model → Serve application) sends the
    batches of those models to a service's shared pools instead (``pool.py``), as job
    ``job`` (a name shown by the pool) with the spec's priority."""

    stage: type = EngineStage
    pools: dict[str | None, str] = dataclasses.field(default_factory=dict)
    job: str | None = None
    # CPUs each read, render and write task asks Ray for: 1 by default; a small job beside
    # large ones (the service's engine host) asks for a sliver, so that its few tasks are
    # not queued behind a large job's for a CPU slot they would barely use.
    task_cpus: float | None = None


def run_job(
    spec: JobSpec,
    *,
    plan: JobPlan | None = None,
    on_progress: Callable[[Snapshot], None] | None = None,
    progress_interval: float = 1.0,
    resume: bool = True,
    engines: Engines | None = None,
    tracker_class: type = ProgressTracker,
    tracker: Any = None,
    cancel: threading.Event | None = None,
    retry_errors: bool = False,
) -> JobResult:
    """Run a job to completion on the connected (or a new local) Ray; blocks.

    The output folder is claimed first (its manifest, ``manifest.py``): nothing in it
    that an earlier run of llm-batch did not write is ever touched. With ``resume``
    (the default), a job whose earlier run of the very same spec was interrupted
    continues where it stopped, keeping what that run wrote; otherwise the files of
    earlier runs are replaced. ``on_progress`` is called once as soon as the folder is
    claimed, then every ``progress_interval`` seconds. Setting ``cancel`` stops the
    job (``JobCancelled``); rows already written stay. ``tracker``: a warm tracker actor
    (``new_tracker()``) to reset for this job and leave running, instead of a new one.
    ``retry_errors``: the job finished in its output folder before; only its rows with an
    error run again (``retry.py``), the others are kept.
    """
    import ray
    from ray.data import DataContext

    plan = plan or plan_job(spec)
    spec.output_path  # noqa: B018 - fails with a clear message when unset
    engines = engines or Engines()
    ensure_ray()
    started = time.monotonic()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own, from the tracker
    ctx.print_on_execution_start = False

    args, kwargs = _tracker_args(spec, plan)
    own_tracker = tracker is None
    if tracker is None:
        tracker = new_tracker(tracker_class, *args, **kwargs)
    else:
        tracker.reset.remote(*args, **kwargs)
    phases = {"start": started}
    try:
        run = claim_output(spec, resume=resume, retry_errors=retry_errors)
        phases["claim"] = time.monotonic()
        if run.resuming:
            done = _preload(tracker, spec)
            logger.info("resuming %s: %d rows already written", spec.name, done)
        if on_progress is not None:
            on_progress(ray.get(tracker.snapshot.remote()))

        ds = input_dataset(
            spec, plan, rows_per_block=_batch_rows(spec)[0], task_cpus=engines.task_cpus
        )
        # Per dataset, not on the process's DataContext: a service's long-lived driver runs
        # several jobs at once, and each dataset keeps its own copy of the context.
        ds.context.checkpoint_config = run.checkpoint_config()
        caches = cache_configs(spec, run.run_id)
        ds = engine_pools(ds, spec, plan, tracker, engines, job_run=run.run_id, caches=caches)
        phases["plan"] = time.monotonic()
        with _following(tracker, on_progress, progress_interval, cancel):
            _write(ds, spec, run, task_cpus=engines.task_cpus)
        phases["pipeline"] = time.monotonic()
        for config in caches.values():
            if config is not None:
                response_cache.merge_run(config)
        final = ray.get(tracker.snapshot.remote())
    finally:
        if own_tracker:
            with contextlib.suppress(Exception):
                ray.kill(tracker)
    write_metrics(spec.output_path, final)
    run.finish()
    phases["finish"] = time.monotonic()
    # Where a job's time goes (small jobs in a service pay each of these).
    marks = list(phases.items())
    logger.info(
        "job %s done in %.2fs: %s",
        engines.job or spec.name,
        marks[-1][1] - started,
        ", ".join(f"{name} {t - marks[i - 1][1]:.2f}s" for i, (name, t) in enumerate(marks) if i),
    )
    if on_progress is not None:
        on_progress(final)
    return JobResult(spec.output_path, final, time.monotonic() - started)


@dataclasses.dataclass
class OutputRun:
    """One run's claim on its output folder: its id (in its part files' names), whether it
    resumes an interrupted run, and the folder's manifest."""

    uri: str  # absolute path or URI (what Ray Data takes)
    run_id: str
    resuming: bool
    manifest: Manifest

    def checkpoint_config(self) -> Any:
        from ray.data.checkpoint import CheckpointConfig

        # Ray Data skips the input rows whose output is committed and deletes the files of
        # uncommitted ones: this run's and earlier runs' part files, whose names it knows.
        return CheckpointConfig(
            id_column=columns.ROW_ID,
            checkpoint_path=self.uri.rstrip("/") + "/" + CHECKPOINT_NAME,
            delete_checkpoint_on_success=True,
        )

    def finish(self) -> None:
        """List the part files the folder now holds (this run's and, resumed, earlier
        runs'; their run ids name them already) in the manifest."""
        folder = OutputFolder.inspect(self.uri)
        parts = [f for f in folder.files if is_part_file(f) and self.manifest.owns(f)]
        self.manifest.files = sorted({*OWN_FILES, *parts})
        self.manifest.write(self.uri)


def claim_output(spec: JobSpec, *, resume: bool = True, retry_errors: bool = False) -> OutputRun:
    """Check the output folder again (it may have changed since ``plan_job``), record this
    run in its manifest before anything else is written there, and clear what earlier
    runs wrote unless this run resumes one of the very same job, or retries the rows with
    errors of a finished one (``retry.prepare_retry``: the folder becomes an interrupted
    run of this spec without those rows)."""
    assert spec.output is not None
    # Ray Data takes a URI or an absolute path; job files name relative ones (out/<name>).
    uri = spec.output.path if "://" in spec.output.path else os.path.abspath(spec.output.path)
    folder = OutputFolder.inspect(uri)
    folder.check(mode=spec.output.mode, will_write=[*OWN_FILES, MANIFEST_NAME])
    manifest = folder.manifest or Manifest(job=spec.name)
    digest = spec.digest()
    fs, checkpoint = open_filesystem(uri.rstrip("/") + "/" + CHECKPOINT_NAME)
    resuming = (
        resume
        and folder.manifest is not None
        and manifest.last_digest == digest
        and fs.get_file_info(checkpoint).type != pafs.FileType.NotFound
    )
    run_id = new_run_id()
    if retry_errors and not resuming:  # (a retry cut short resumes as any run does)
        manifest = prepare_retry(
            uri, folder.manifest, run_id, digest=digest, model_names=spec.model_names
        )
        return OutputRun(uri, run_id, True, manifest)
    manifest.add_run(run_id, digest, OWN_FILES)
    manifest.write(uri)  # before this run writes anything
    if resuming:
        finish_moves(uri)  # a retry cut short after its checkpoint was in place
    else:
        replaced = folder.foreign_parquet if spec.output.mode == "overwrite" else []
        if replaced:
            logger.warning(
                "output.mode overwrite: replacing %d Parquet file(s) llm-batch did not write in %s",
                len(replaced),
                uri,
            )
        removed = clear_output(uri, manifest, foreign_parquet=replaced)
        logger.info("cleared %d file(s) of earlier runs from %s", len(removed), uri)
        manifest.runs = manifest.runs[-1:]
        manifest.files = list(OWN_FILES)
        manifest.write(uri)
    return OutputRun(uri, run_id, resuming, manifest)


def new_tracker(tracker_class: type = ProgressTracker, *args: Any, **kwargs: Any) -> Any:
    """A progress tracker actor beside the driver: losing a worker node must not lose
    progress. Without arguments, one to ``reset`` for a job later (a warm one)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor: Any = ray.remote(tracker_class)
    return actor.options(num_cpus=0, scheduling_strategy=here).remote(*args, **kwargs)


def _tracker_args(spec: JobSpec, plan: JobPlan) -> tuple[tuple[Any, ...], dict[str, Any]]:
    rows_total = plan.input_info.rows_total
    if rows_total is not None:
        rows_total *= spec.samples_per_row
    # Label metrics read a choice stage's choices (a staged job has at most one with a label).
    choices = next(
        (
            tuple(s.sampling.structured.choice)
            for s in spec.steps
            if s.sampling.structured and s.sampling.structured.choice
        ),
        None,
    )
    job = JobContext(label_column=spec.metrics.label_column, choices=choices)
    return (rows_total, spec.model_names), {
        "job": job,
        "accumulators": spec.metrics.accumulators,
    }


_GPUS: list[float] = []  # [when asked, GPUs]: a long-lived driver asks for every job


def _cluster_gpus(ttl: float = 30.0) -> float:
    """GPUs of the cluster, asked at most every ``ttl`` seconds (the answer from the GCS
    is rebuilt from every node's resources each time)."""
    import ray

    if not _GPUS or time.monotonic() - _GPUS[0] > ttl:
        _GPUS[:] = [time.monotonic(), float(ray.cluster_resources().get("GPU", 0))]
    return _GPUS[1]


def _batch_rows(spec: JobSpec) -> list[int]:
    """Rows per engine batch of each model: whole prompts (a prompt's n samples are
    written, and checkpointed, together)."""
    n = spec.samples_per_row
    gpus = _cluster_gpus()
    return [
        -(-engine_batch_size(model.model_dump(), cluster_gpus=gpus) // n) * n
        for _, model in spec.named_models()
    ]


def one_batch(spec: JobSpec, plan: JobPlan) -> bool:
    """Whether a job's rows fit in one engine batch of each of its models (a JSONL or CSV
    input, whose rows are counted only as it is read, counts as one when it is that
    small: the service's engine host admits those by size, ``small_job_bytes``)."""
    rows = plan.input_info.rows_total
    return rows is None or rows * spec.samples_per_row <= min(_batch_rows(spec))


def cache_configs(spec: JobSpec, job_run: str) -> dict[str | None, CacheConfig | None]:
    """Each model's response cache (``cache.py``), None where it has none: the job turned
    it off, a pooling model, or n samples per prompt (never the same output twice)."""
    out: dict[str | None, CacheConfig | None] = {}
    mode = spec.cache.mode
    root = spec.cache.path or response_cache.default_root(spec.output_path)
    if "://" not in root:  # every worker must mean the driver's folder
        root = os.path.abspath(os.path.expanduser(root))
    gpus = _cluster_gpus()
    for name, model in zip(spec.model_names, spec.model_specs, strict=True):
        out[name] = None
        sampling = spec.sampling_of(name).model_dump()
        if mode == "off" or model.pools or spec.samples_per_row > 1 or model.reasoning_parser:
            continue  # (a reasoning model's split is not cached)
        model_dict = model.model_dump()
        device = "gpu" if on_gpu(model_dict, cluster_gpus=gpus) else "cpu"
        try:
            # A chat template's arguments change the prompt the engine sees.
            chat = _prompt_of(spec, name).chat_template_kwargs
            keyed = sampling if chat is None else {**sampling, "chat_template_kwargs": chat}
            ns = response_cache.namespace(model_dict, keyed, device=device)
        except Exception as e:  # noqa: BLE001 - the cache is an aid: the job runs without it
            logger.warning("response cache off for %s: %s", model.path, e)
            continue
        if ns is None:
            logger.info("response cache off for %s: its files are not readable here", model.path)
            continue
        config = CacheConfig(root=root, namespace=ns, mode=mode, run=job_run)
        warm = config.reads and response_cache.is_warm(root, ns)
        if config.writes:
            response_cache.describe(config, model_dict, sampling)
        out[name] = dataclasses.replace(config, warm=warm)
    return out


def engine_pools(
    ds: Any,
    spec: JobSpec,
    plan: JobPlan,
    tracker: Any,
    engines: Engines | None = None,
    *,
    job_run: str = "",
    caches: dict[str | None, CacheConfig | None] | None = None,
) -> Any:
    """One engine stage per model, chained: the data is read once and every model sees
    every row; the stages run at the same time on different batches. ``caches``: each
    model's response cache (``cache_configs``)."""
    engines = engines or Engines()
    caches = caches or {}
    cluster_gpus = _cluster_gpus()
    staged = spec.stages is not None
    steps = spec.steps
    units = engine_units(steps, engines)  # the same Step objects: compared by identity
    rows_of = dict(zip(spec.model_names, _batch_rows(spec), strict=True))
    block_rows = None
    for i, (step, members) in enumerate(units):
        name, model = members[0]
        if i and units[i - 1][0] is not step:
            ds = _in_model_order(ds, units, units[i - 1][0])
        if staged and step is not steps[0] and step.models[0][1] == name:
            # A later stage's first model: the rows before it stop or go on, and its
            # prompts are rendered from what the earlier stages wrote.
            ds = _between_stages(ds, spec, steps.index(step), engines.task_cpus)
        rows = rows_of[name]
        if block_rows is not None and rows != block_rows:
            # A model with another batch size: cut again (see input_dataset), strictly,
            # across blocks; an operator of its own. On multiples of n, as rows is one.
            ds = ds.repartition(target_num_rows_per_block=rows, strict=True)
        block_rows = rows
        model_dict = model.model_dump()
        sampling = step.sampling.model_dump()
        # The last stage drops what is not written (a staged job's final step does).
        drop = plan.drop_before_write if i == len(units) - 1 and not staged else []
        pool = engines.pools.get(name)
        if pool is not None:
            ds = ds.map_batches(
                send_to_pool,
                fn_kwargs={
                    "pool": pool,
                    "config": pool_stage_config(
                        model_dict,
                        sampling,
                        model_name=name,
                        metrics=spec.metrics.model_dump(),
                        drop=drop,
                        cache=caches.get(name),
                        chat_template_kwargs=step.prompt.chat_template_kwargs,
                    ),
                    "job": {
                        # A warm tracker serves job after job: the key is this run's.
                        "key": f"{tracker._actor_id.hex()[:16]}-{job_run}",
                        "name": engines.job or spec.name,
                        "priority": spec.priority,
                        "tracker": tracker,
                    },
                    "progress": tracker,
                },
                batch_format="pyarrow",
                # Whole blocks, which are one batch each already (input_dataset's cut):
                # with a batch size, Ray Data holds a short last block back for about a
                # second, looking for rows to fill it, which a ten-row job would pay.
                batch_size=None,
                zero_copy_batch=True,
                **_pool_stage_resources(model.max_batches_in_flight, engines.task_cpus),
            )
            continue
        placed = engine_map_kwargs(model_dict, cluster_gpus=cluster_gpus)
        adapters = [m.lora for _, m in members if m.lora]
        model_dict["lora"] = None  # each member's requests carry their own adapter
        model_dict["engine"]["extra_args"] = {
            **placed.pop("engine_overrides"),
            # One engine for all the adapters, its LoRA limits theirs.
            **(
                {
                    "enable_lora": True,
                    # A slot more when the base model's rows share the engine: on vLLM's
                    # CPU engine, rows without an adapter in a step that fills every slot
                    # were served with the last slot's adapter (seen with LLM.generate,
                    # 2 adapters, max_loras 2; right with 3).
                    "max_loras": len(set(adapters)) + int(len(adapters) < len(members)),
                    "max_lora_rank": lora_rank_limit(*adapters, floor=8),
                }
                if adapters
                else {}
            ),
            **model_dict["engine"]["extra_args"],
        }
        ds = ds.map_batches(
            engines.stage,
            fn_constructor_kwargs={
                "model": model_dict,
                "sampling": sampling,
                "model_name": name,
                "progress": tracker,
                "metrics": spec.metrics.model_dump(),
                "drop": drop,
                "cache": caches.get(name),
                "chat_template_kwargs": step.prompt.chat_template_kwargs,
                "members": [
                    {"name": n, "lora": m.lora, "cache": caches.get(n)} for n, m in members
                ],
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
    ds = _in_model_order(ds, units, steps[-1])
    if staged:
        ds = _between_stages(ds, spec, len(steps), engines.task_cpus, drop=plan.drop_before_write)
    return ds


def engine_units(steps: list[Step], engines: Engines) -> list[tuple[Step, list[tuple[Any, Any]]]]:
    """The job's engine stages, in order, each with the models it serves ((column prefix,
    spec) pairs): one per model, but the models of a stage that differ only in their LoRA
    adapter (and their base beside them) share one engine, run by the job itself."""
    units: list[tuple[Step, list[tuple[Any, Any]]]] = []
    for step in steps:
        groups: dict[str, list[tuple[Any, Any]]] = {}
        keys = []
        for _, name, model in step.models:
            key = json.dumps(model.model_dump(exclude={"name", "lora"}), sort_keys=True)
            if engines.pools.get(name) is not None:
                key = f"pool {name}"  # the service's pool shares the engine itself
            groups.setdefault(key, []).append((name, model))
            keys.append(key)
        for key, (_, name, model) in zip(keys, step.models, strict=True):
            members = groups[key]
            if not any(m.lora for _, m in members):
                units.append((step, [(name, model)]))
            elif members[0][0] == name:  # the group, where its first model is
                units.append((step, members))
    return units


def _in_model_order(ds: Any, units: list[tuple[Step, list[tuple[Any, Any]]]], step: Step) -> Any:
    """After a stage whose shared engines appended its models' columns out of the stage's
    order: the columns in the order the spec lists them (``JobSpec.output_columns``)."""
    served = [name for s, members in units if s is step for name, _ in members]
    if served == [name for _, name, _ in step.models]:
        return ds
    wanted = step.output_columns()
    return ds.map_batches(
        _reorder,
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        fn_kwargs={"wanted": wanted},
    )


def _reorder(batch: pa.Table, *, wanted: list[str]) -> pa.Table:
    rest = [c for c in batch.column_names if c not in set(wanted)]
    return batch.select(rest + [c for c in wanted if c in batch.column_names])


def _between_stages(
    ds: Any, spec: JobSpec, index: int, task_cpus: float | None, *, drop: list[str] | None = None
) -> Any:
    """The step after stage ``index - 1`` of a staged job: its rows stop or go on
    (``next_stage``), then stage ``index``'s prompts are rendered; after the last stage,
    ``dropped_by`` is written and the columns that are not output dropped."""
    done = spec.steps[index - 1]
    following = spec.steps[index] if index < len(spec.steps) else None
    return ds.map_batches(
        next_stage,
        **_cpus(task_cpus),
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        fn_kwargs={
            "stage": done.name,
            "models": [name for _, name, _ in done.models],
            "keep_if": done.keep_if,
            "field": done.field + "keep_if",
            "prompt_json": (
                None if following is None else json.dumps(following.prompt.model_dump())
            ),
            "prompt_field": None if following is None else following.field + "prompt",
            "drop": list(drop or []),
        },
    )


@functools.lru_cache(maxsize=8)
def _keep_if(source: str, field: str) -> KeepIf:
    return KeepIf(source, field=field)


def next_stage(
    batch: pa.Table,
    *,
    stage: str,
    models: list[str | None],
    keep_if: str | None,
    field: str,
    prompt_json: str | None,
    prompt_field: str | None,
    drop: list[str],
) -> pa.Table:
    """After a stage: a row that a model of the stage failed, or whose ``keep_if`` is false,
    stops here (its ``dropped_by`` names the stage; the later stages skip it). Then the
    next stage's prompts are rendered over the row's columns (``prompt_json``), or, after
    the last stage, ``dropped_by`` takes its output name and ``drop`` goes."""
    dropped = batch.column(columns.DROPPED).to_pylist()
    failed = [False] * batch.num_rows
    for name in models:
        error = batch.column(columns.model_column(name, columns.ERROR)).is_valid().to_pylist()
        failed = [f or e for f, e in zip(failed, error, strict=True)]
    live = [d is None and not f for d, f in zip(dropped, failed, strict=True)]
    kept: list[bool | str] = list(live)
    if keep_if is not None:
        kept = _keep_if(keep_if, field)(batch, live)
    problems = {i: k for i, k in enumerate(kept) if isinstance(k, str)}
    if problems:
        # Said in the stage's (first model's) error column: the row is an error row there.
        name = columns.model_column(models[0], columns.ERROR)
        errors = batch.column(name).to_pylist()
        for i, problem in problems.items():
            errors[i] = problem
        at = batch.column_names.index(name)
        batch = batch.set_column(at, name, pa.array(errors, pa.string()))
    stopped = [
        d if d is not None else (None if k is True else stage)
        for d, k in zip(dropped, kept, strict=True)
    ]
    at = batch.column_names.index(columns.DROPPED)
    batch = batch.set_column(at, columns.DROPPED, pa.array(stopped, pa.string()))
    if prompt_json is None:
        batch = batch.drop_columns([c for c in drop if c in batch.column_names])
        return batch.append_column(columns.DROPPED_BY, pa.array(stopped, pa.string()))
    rendered = [columns.PROMPT, columns.MESSAGES, columns.PAIR, columns.RENDER_ERROR]
    batch = batch.drop_columns([c for c in rendered if c in batch.column_names])
    return _stage_renderer(prompt_json, prompt_field or "prompt")(batch)


@functools.lru_cache(maxsize=8)
def _stage_renderer(prompt_json: str, field: str) -> PromptRenderer:
    return PromptRenderer(json.loads(prompt_json), field=field)


def _pool_stage_resources(in_flight: int, task_cpus: float | None) -> dict[str, Any]:
    """A pool stage's tasks: ``in_flight`` at once (the job's admission limit in front of
    the pool), holding no CPU of the job's budget while they wait on the pool. A small
    job's (``task_cpus`` set) asks what its read, render and write ask instead, so that Ray
    Data fuses them all and the pool call into one task (see ``_write``): under load,
    every task more is a scheduling round a ten-row job waits for."""
    if task_cpus is not None:
        # The same remote arguments as the read's and the write's, or Ray Data fuses
        # nothing (a task is retried on a lost worker as Ray's default does: 3 times).
        return {"num_cpus": task_cpus}
    return {"concurrency": in_flight, "num_cpus": 0, "max_retries": 3}


@contextlib.contextmanager
def _following(
    tracker: Any,
    on_progress: Callable[[Snapshot], None] | None,
    interval: float,
    cancel: threading.Event | None = None,
) -> Iterator[None]:
    """Report the tracker's snapshot every ``interval`` seconds while the job runs, and pass
    a cancel on to the tracker (the engine stages ask it before each batch)."""
    import ray

    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(interval):
            if cancel is not None and cancel.is_set():
                tracker.cancel.remote()
            try:
                snap = ray.get(tracker.snapshot.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            if on_progress is not None:
                on_progress(snap)

    follower = threading.Thread(target=follow, daemon=True, name="llm-batch-progress")
    follower.start()
    try:
        yield
    finally:
        stop.set()
        follower.join()


def _write(ds: Any, spec: JobSpec, run: OutputRun, *, task_cpus: float | None = None) -> None:
    assert spec.output is not None
    # A small job (the engine host's, task_cpus set) writes what its one read gives, as
    # one file: a minimum of rows per file makes Ray Data bundle the write's input, and
    # then fuse nothing with the read (a read may change the row count), so that the
    # job's read was a task of its own and the rest waited about a second for the read's
    # end to be noticed (several seconds beside a large job).
    rows_per_file = None if task_cpus is not None else spec.output.rows_per_file
    try:
        ds.write_datasink(
            AtomicParquetDatasink(run.uri, run_id=run.run_id, min_rows_per_file=rows_per_file),
            ray_remote_args=_cpus(task_cpus),
        )
    except Exception as e:
        # An engine that cannot start kills its actor; Ray reports the actor's
        # death with the whole traceback. Give the user the one line that matters.
        for kind, error in (
            ("EngineUnavailable", EngineUnavailable),
            ("JobCancelled", JobCancelled),
        ):
            found = re.search(kind + r": (.+)", str(e))
            if found:
                raise error(found.group(1).strip()) from e
        raise
