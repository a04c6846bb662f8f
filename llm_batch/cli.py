"""The ``llm-batch`` command line.

    llm-batch run JOB.yaml            run a job on a local Ray, or as a Ray job on the
                                      cluster of --address / RAY_ADDRESS (``cli_cluster``)
    llm-batch tiny-model DIR          write a small deterministic model for tests and demos
    llm-batch bench                   raw vLLM vs ray.data.llm vs this pipeline, one run
    llm-batch serve | submit | status | cancel | demo
                                      the job service and its client (``cli_service``)

Errors a user can fix print as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_batch.errors import LLMBatchError

__all__ = ["main"]


def _quiet_engines() -> None:
    # Engine actors inherit the driver's environment on a local Ray; vLLM's
    # per-request INFO lines would bury the progress bar.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


class ProgressView:
    """A rich progress bar on a terminal; plain periodic lines otherwise."""

    def __init__(self, label: str, *, plain_every: float = 10.0, stream: Any = None):
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._label = label
        self._plain_every = plain_every
        self._last_plain = -1e9
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressView:
        if self._tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows · {task.fields[tps]:>8.1f} tok/s · failed {task.fields[failed]}"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(file=self._stream),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self._label, total=None, tps=0.0, failed=0)
        return self

    def update(self, snap: dict[str, Any]) -> None:
        import time

        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=snap["rows_done"],
                total=snap.get("rows_total"),
                tps=snap.get("output_tokens_per_second") or 0.0,
                failed=snap.get("rows_failed", 0),
            )
            return
        now = time.monotonic()
        if now - self._last_plain < self._plain_every:
            return
        self._last_plain = now
        total = snap.get("rows_total")
        eta = snap.get("eta_seconds")
        print(
            f"{self._label}: {snap['rows_done']}/{total if total is not None else '?'} rows, "
            f"{snap.get('output_tokens_per_second', 0):.1f} tok/s, "
            f"{snap.get('rows_failed', 0)} failed"
            + (f", ~{eta:.0f}s left" if eta is not None else ""),
            file=self._stream,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _cmd_run(args: argparse.Namespace) -> int:
    from llm_batch.job.spec import JobSpec
    from llm_batch.pipeline.run import plan_job, run_job

    spec = JobSpec.from_file(args.job)
    if args.output or spec.output is None:
        spec = spec.with_output(args.output or f"out/{spec.name}")
    plan = plan_job(spec)  # fails fast, before Ray or an engine starts
    _quiet_engines()
    if args.address:
        # Ray's Jobs API client takes RAY_ADDRESS over the address it is given.
        os.environ["RAY_ADDRESS"] = args.address
    address = os.environ.get("RAY_ADDRESS")
    if address:
        from llm_batch.cli_cluster import run_on_cluster

        code = run_on_cluster(spec, address=address)
        if code == 0 and args.show:
            _print_rows(spec.output_path, args.show)
        return code
    with ProgressView(spec.name) as view:
        result = run_job(spec, plan=plan, on_progress=view.update)
    snap = result.progress
    print(
        f"wrote {snap['rows_done']} rows ({snap['rows_failed']} with errors) to "
        f"{result.output_path} in {result.wall_seconds:.1f}s"
    )
    if args.show:
        _print_rows(result.output_path, args.show)
    return 0


def _print_rows(path: str, n: int) -> None:
    import pyarrow.dataset as pads

    from llm_batch import columns

    table = pads.dataset(path, format="parquet").head(n)
    shown = [c for c in table.column_names if c not in (columns.NUM_INPUT_TOKENS,)]
    for row in table.select(shown).to_pylist():
        print("  " + "  ".join(f"{k}={_short(v)}" for k, v in row.items()))


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from llm_batch.models.tiny import write_tiny_model

    out = write_tiny_model(args.dir, seed=args.seed)
    print(f"wrote a tiny model (seed {args.seed}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-batch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run a job file (YAML or JSON) on a local Ray, or on a Ray cluster"
    )
    run.add_argument("job", help="the job file")
    run.add_argument("--output", help="override output.path")
    run.add_argument(
        "--address",
        help="Ray cluster to run on as a Ray job: dashboard URL http://head:8265, "
        "ray://head:10001 or head:6379 (default: RAY_ADDRESS; unset: a local Ray here)",
    )
    run.add_argument("--show", type=int, default=0, metavar="N", help="print N output rows")
    run.set_defaults(func=_cmd_run)

    tiny = sub.add_parser("tiny-model", help="write a small deterministic model to DIR")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_tiny_model)

    from llm_batch.bench.cli import add_bench_parser
    from llm_batch.cli_service import add_service_commands

    add_service_commands(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LLMBatchError as e:
        print(f"llm-batch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-batch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
