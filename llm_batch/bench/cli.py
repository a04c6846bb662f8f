"""``llm-batch bench``: the command line of the benchmark.

``add_bench_parser(subparsers)`` registers the ``bench`` subcommand on the
``llm-batch`` parser; ``python -m llm_batch.bench`` takes the same flags.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_batch.bench.systems import SYSTEMS
from llm_batch.bench.timeline import UNITS, rate_key
from llm_batch.bench.workload import TASKS, WorkloadSpec
from llm_batch.errors import JobSpecError, LLMBatchError

__all__ = ["add_bench_parser", "main"]

DESCRIPTION = (
    "Run one workload through raw vLLM, Ray's ray.data.llm and llm-batch, one after another "
    "on the same model, engine arguments, prompts and sampling (or, with --task embed, their "
    "embedding paths); print a side-by-side table and write report.json and report.png."
)


def _systems(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown system {', '.join(unknown) or '(none)'}; choose from {','.join(SYSTEMS)}"
        )
    return names


def _engine_arg(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw  # a bare string: --engine-arg distributed_executor_backend=uni


def _add_arguments(p: argparse.ArgumentParser) -> None:
    w = WorkloadSpec.model_fields
    p.add_argument(
        "--task",
        choices=TASKS,
        default=w["task"].default,
        help="generate: --output-tokens greedy tokens per row, measured in output tokens/s; "
        "embed: one embedding per row (vLLM's pooling runner), measured in rows/s",
    )
    p.add_argument("--rows", type=int, default=w["rows"].default, help="input rows")
    p.add_argument("--prompt-tokens", type=int, default=w["prompt_tokens"].default)
    p.add_argument(
        "--output-tokens",
        type=int,
        default=w["output_tokens"].default,
        help="tokens generated per row (unused with --task embed)",
    )
    p.add_argument(
        "--carry-strings",
        type=int,
        default=w["carry_strings"].default,
        help="string columns carried from input to output",
    )
    p.add_argument("--carry-string-bytes", type=int, default=w["carry_string_bytes"].default)
    p.add_argument(
        "--embedding-dim",
        type=int,
        default=w["embedding_dim"].default,
        help="also carry a float32 embedding of this size (0: none)",
    )
    p.add_argument("--format", choices=["parquet", "jsonl", "csv"], default="parquet")
    p.add_argument("--rows-per-file", type=int, default=w["rows_per_file"].default)
    p.add_argument("--seed", type=int, default=w["seed"].default, help="workload seed")
    p.add_argument("--replicas", type=int, default=1, help="engines of each Ray pipeline")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per engine batch, for both Ray pipelines (default: llm-batch's, "
        "256 on the CPU engine, 1024 on GPUs)",
    )
    p.add_argument(
        "--systems",
        type=_systems,
        default=list(SYSTEMS),
        help=f"comma-separated, run in this order (default: {','.join(SYSTEMS)})",
    )
    p.add_argument("--model", help="model folder (default: the tiny model, built once, cached)")
    p.add_argument("--out", help="output folder (default: out/bench/<timestamp>)")
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip torch.compile in every engine (faster start)",
    )
    p.add_argument("--max-num-seqs", type=int, help="engine's most concurrent sequences")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="CPU engine KV cache, GiB")
    p.add_argument(
        "--engine-arg",
        type=_engine_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another vllm.EngineArgs field for all three systems (VALUE parsed as JSON)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per system")
    p.add_argument(
        "--service",
        action="store_true",
        help="benchmark the job service on warm, shared engine pools instead "
        "(llm_batch/bench/service.py); --rows is then its steady job's size",
    )
    p.add_argument(
        "--cache",
        action="store_true",
        help="benchmark work avoided instead (llm_batch/bench/cache.py): --rows prompts with "
        "a shared few-shot prefix, half repeating earlier rows; raw vLLM, llm-batch run, "
        "and llm-batch run again from the response cache, whole commands timed",
    )
    p.add_argument(
        "--prefix-groups",
        type=int,
        default=1,
        help="--cache: few-shot prefixes the rows are spread over; above 1, also runs "
        "llm-batch run --no-cache with rows grouped by prefix and without",
    )
    p.add_argument("--big-rows", type=int, default=20_000, help="--service: the large job's rows")
    p.add_argument(
        "--small-job-rows",
        type=int,
        default=None,
        help="--service: the service's LLM_BATCH_SMALL_JOB_ROWS (jobs of at most this many "
        "rows run in its long-lived driver; default: the service's, 500)",
    )
    p.add_argument(
        "--small-every",
        type=float,
        default=5.0,
        help="--service: seconds between the 10-row jobs sent beside the large job",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the systems this many times, interleaved; report the median of the "
        "rounds (and each round)",
    )


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an ``add_subparsers()`` object; returns its parser."""
    p = subparsers.add_parser(
        "bench", help="compare llm-batch with raw vLLM and ray.data.llm", description=DESCRIPTION
    )
    _add_arguments(p)
    p.set_defaults(func=run_command)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from llm_batch.bench.harness import BenchConfig
    from llm_batch.job.spec import format_validation_error

    if (args.service or args.cache) and args.task != "generate":
        flag = "service" if args.service else "cache"
        raise JobSpecError(
            f"--task {args.task}: the {flag} bench (--{flag}) measures generation only; "
            f"drop --{flag} or --task"
        )
    out = args.out or f"out/bench/{dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        return BenchConfig(
            workload=WorkloadSpec(
                task=args.task,
                rows=args.rows,
                prompt_tokens=args.prompt_tokens,
                output_tokens=args.output_tokens,
                carry_strings=args.carry_strings,
                carry_string_bytes=args.carry_string_bytes,
                embedding_dim=args.embedding_dim,
                format=args.format,
                rows_per_file=args.rows_per_file,
                seed=args.seed,
            ),
            systems=args.systems,
            model=args.model,
            out=out,
            batch_size=args.batch_size,
            replicas=args.replicas,
            enforce_eager=args.enforce_eager,
            max_num_seqs=args.max_num_seqs,
            kv_cache_gb=args.kv_cache_gb,
            engine_args=dict(args.engine_arg),
            timeout=args.timeout,
            rounds=args.rounds,
        )
    except ValidationError as e:
        raise JobSpecError(format_validation_error(e, source="bench options")) from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table; 1 when a system failed or its output is wrong."""
    from rich.console import Console

    from llm_batch.bench.harness import failures, run_bench
    from llm_batch.bench.report import render_table, write_chart

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
        )
    config = config_from_args(args)
    if args.cache:
        from llm_batch.bench.cache import render as render_cache
        from llm_batch.bench.cache import run_cache_bench

        report = run_cache_bench(config, prefix_groups=args.prefix_groups)
        print(render_cache(report))
        print(f"report: {Path(config.out) / 'report.json'}")
        checks = report["checks"]
        return 0 if checks["first_equals_raw"] and checks["again_equals_first"] else 1
    if args.service:
        from llm_batch.bench.service import render, run_service_bench

        report = run_service_bench(
            config,
            big_rows=args.big_rows,
            small_every=args.small_every,
            small_job_rows=args.small_job_rows,
        )
        print(render(report))
        print(f"report: {Path(config.out) / 'report.json'}")
        return 0
    if threading.current_thread() is threading.main_thread():
        # SIGTERM, and SIGINT in a background job (where the shell ignores it), end
        # the run as Ctrl-C does: the running system's processes are ended, not orphaned.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    report = run_bench(config)
    out = Path(config.out)
    chart = write_chart(report, out / "report.png")
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for every column
        console = Console(width=130)
    console.print(render_table(report))
    for name, system in report["systems"].items():
        for note in system.get("notes") or []:
            console.print(f"  {name}: {note}", highlight=False)
    console.print(rounds_text(report), highlight=False, end="")
    console.print(f"report: {out / 'report.json'}  chart: {chart}")
    problems = failures(report)
    for problem in problems:
        console.print(f"[red]FAILED[/red] {problem}", highlight=False)
    return 1 if problems else 0


def rounds_text(report: dict[str, Any]) -> str:
    """One line per round (none for a single round): each system's steady rate, the ratios."""
    unit = report.get("unit") or UNITS["generate"]
    rate = rate_key(unit)
    label = "rows/s" if unit == "rows" else "tok/s"
    lines = []
    for i, r in enumerate(report.get("rounds") or [], 1):
        ratios = ", ".join(
            f"{key} {v[rate]:.2f}×" for key, v in r["ratios"].items() if v.get(rate) is not None
        )
        fmt = "{:,.1f}" if unit == "rows" else "{:,.0f}"
        done = ", ".join(
            f"{name} {fmt.format(s[rate])}"
            for name, s in r["systems"].items()
            if s.get(rate) is not None
        )
        lines.append(f"  round {i}: steady {label} {done}; {ratios}\n")
    return "".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_batch.bench", description=DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except LLMBatchError as e:
        print(f"llm-batch bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-batch bench: interrupted", file=sys.stderr)
        return 130
