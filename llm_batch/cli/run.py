"""``llm-batch run`` and ``llm-batch tiny-model``.

``run`` validates the job (``plan_job``: every check that needs no engine) before
anything starts, then runs it on a local Ray of its own, quietly: the progress bar
and a summary on the terminal, Ray's and vLLM's own output in the run's log
(``--verbose``: on the terminal too). With ``--address`` / ``RAY_ADDRESS`` the job
runs as a Ray job on that cluster instead (``cluster.py``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from llm_batch.cli.terminal import ProgressView, RunLog, default_log_path, terminal
from llm_batch.errors import LLMBatchError
from llm_batch.models.tiny import TASKS

__all__ = ["add_commands"]


def _quiet_engines() -> None:
    # Engine actors inherit the driver's environment on a local Ray; vLLM's
    # per-request INFO lines would bury the log.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _cmd_run(args: argparse.Namespace) -> int:
    from llm_batch.job.spec import JobSpec
    from llm_batch.pipeline.run import plan_job, run_job

    spec = JobSpec.from_file(args.job)
    if args.output or spec.output is None:
        spec = spec.with_output(args.output or f"out/{spec.name}")
    if args.no_cache:
        spec = spec.model_copy(update={"cache": spec.cache.model_copy(update={"mode": "off"})})
    plan = plan_job(spec)  # fails fast, before Ray or an engine starts
    if args.retry_errors:
        from llm_batch.pipeline.retry import failed_rows

        out = spec.output_path
        failed = failed_rows(out if "://" in out else os.path.abspath(out), spec.model_names)
        if failed == 0:  # (None: an interrupted run, which this run resumes)
            terminal.say(f"nothing to retry: no row of {spec.output_path} has an error")
            return 0
        if failed:
            terminal.say(f"running again the {failed} row(s) of {out} with an error")
    _quiet_engines()
    if args.address:
        # Ray's Jobs API client takes RAY_ADDRESS over the address it is given.
        os.environ["RAY_ADDRESS"] = args.address
    address = os.environ.get("RAY_ADDRESS")
    if address:
        from llm_batch.cli.cluster import run_on_cluster

        code = run_on_cluster(spec, address=address, retry_errors=args.retry_errors)
        if code == 0 and args.show:
            _print_rows(spec.output_path, args.show)
        return code
    if not args.verbose:
        RunLog(Path(args.log) if args.log else default_log_path(spec.name)).start()
    with ProgressView(spec.name) as view:
        result = run_job(spec, plan=plan, on_progress=view.update, retry_errors=args.retry_errors)
    snap = result.progress
    cached = f", {snap['rows_cached']} from the cache" if snap.get("rows_cached") else ""
    terminal.say(
        f"wrote {snap['rows_done']} rows ({snap['rows_failed']} with errors{cached}) to "
        f"{result.output_path} in {result.wall_seconds:.1f}s"
    )
    if args.show:
        _print_rows(result.output_path, args.show)
    return 0


def _print_rows(path: str, n: int) -> None:
    import pyarrow.dataset as pads

    from llm_batch import columns
    from llm_batch.pipeline.write import owned_parts

    files = owned_parts(path)
    if not files:
        return
    table = pads.dataset(files, format="parquet").head(n)
    shown = [c for c in table.column_names if c not in (columns.NUM_INPUT_TOKENS,)]
    for row in table.select(shown).to_pylist():
        terminal.say("  " + "  ".join(f"{k}={_short(v)}" for k, v in row.items()))


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _cache_root(args: argparse.Namespace) -> str:
    from llm_batch.pipeline.cache import default_root

    return args.path or default_root("")


def _cmd_cache_info(args: argparse.Namespace) -> int:
    import time

    from llm_batch.pipeline.cache import info

    root = _cache_root(args)
    spaces = info(root)
    if not spaces:
        terminal.say(f"the response cache at {root} is empty")
        return 0
    terminal.say(f"response cache at {root}:")
    terminal.say(f"  {'namespace':<34}{'entries':>9}{'files':>7}{'MiB':>9}  {'newest':<20}model")
    for ns in spaces:
        newest = ns["newest"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(newest)) if newest else "-"
        terminal.say(
            f"  {ns['namespace']:<34}{ns['entries']:>9}{ns['files']:>7}"
            f"{ns['bytes'] / 2**20:>9.2f}  {when:<20}{ns['model'] or '?'}"
        )
    return 0


def parse_age(text: str) -> float:
    """``30m``, ``12h``, ``7d``, ``90s`` or plain seconds, in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    value = text.strip().lower()
    scale = units.get(value[-1:])
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise LLMBatchError(
            f"--older-than {text!r}: expected an age such as 30m, 12h, 7d or seconds"
        ) from None
    if seconds < 0:
        raise LLMBatchError(f"--older-than {text!r}: an age is not negative")
    return seconds


def _cmd_cache_clear(args: argparse.Namespace) -> int:
    from llm_batch.pipeline.cache import clear

    root = _cache_root(args)
    older = parse_age(args.older_than) if args.older_than else None
    removed = clear(root, older_than=older)
    scope = f" written more than {args.older_than} ago" if args.older_than else ""
    terminal.say(
        f"removed {removed['entries']} cached responses{scope} ({removed['files']} files, "
        f"{removed['bytes'] / 2**20:.2f} MiB) from {root}"
    )
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from llm_batch.models.tiny import check_labels, write_tiny_model

    labels = None
    if args.labels is not None:
        if args.task != "classify":
            raise LLMBatchError(f"--labels is only for --task classify (the task is {args.task})")
        labels = [name.strip() for name in args.labels.split(",")]
    if args.task == "classify":
        if labels is None:
            raise LLMBatchError(
                "--task classify needs --labels: the class names, comma-separated "
                "(e.g. --labels positive,negative,neutral)"
            )
        try:
            check_labels(labels)
        except ValueError as e:
            raise LLMBatchError(f"--labels {args.labels!r}: {e}") from None
    out = write_tiny_model(args.dir, seed=args.seed, task=args.task, labels=labels)
    what = f"{args.task}, labels {', '.join(labels)}" if labels else args.task
    terminal.say(f"wrote a tiny model ({what}, seed {args.seed}) to {out}")
    return 0


def add_commands(sub: Any) -> None:
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
    run.add_argument(
        "--retry-errors",
        action="store_true",
        help="run again only the rows whose error is set in the job's finished output (the "
        "job file may change its model or engine block); the other rows are kept",
    )
    run.add_argument(
        "--no-cache",
        action="store_true",
        help="neither take responses from the response cache nor store new ones "
        "(the job's cache.mode: off)",
    )
    run.add_argument("--show", type=int, default=0, metavar="N", help="print N output rows")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and vLLM's own output on the terminal instead of only in the log",
    )
    run.add_argument(
        "--log",
        metavar="FILE",
        help="the run's log (default: ~/.local/state/llm-batch/logs/<job>-<time>.log)",
    )
    run.set_defaults(func=_cmd_run)

    cache = sub.add_parser("cache", help="the response cache: what it holds, and clearing it")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("info", "each model's entries, files, size and age"),
        ("clear", "delete the cache's entries (all, or --older-than)"),
    ):
        cmd = cache_sub.add_parser(name, help=help_text)
        cmd.add_argument(
            "--path",
            help="the cache's folder or URI (default: $LLM_BATCH_CACHE_DIR, else "
            "~/.cache/llm_batch/responses)",
        )
        if name == "clear":
            cmd.add_argument(
                "--older-than",
                metavar="AGE",
                help="only entries written more than AGE ago: 30m, 12h, 7d (or seconds)",
            )
        cmd.set_defaults(func=_cmd_cache_info if name == "info" else _cmd_cache_clear)

    tiny = sub.add_parser("tiny-model", help="write a small deterministic model to DIR")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--task",
        choices=TASKS,
        default="generate",
        help="generate (default) or embed: a causal LM; classify: a sequence classifier",
    )
    tiny.add_argument(
        "--labels",
        metavar="A,B,...",
        help="with --task classify: the class names, comma-separated (at least 2, distinct)",
    )
    tiny.set_defaults(func=_cmd_tiny_model)
