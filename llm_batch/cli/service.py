"""The service's subcommands of the ``llm-batch`` command line.

    llm-batch serve [--host H] [--port P] [--data-dir DIR] [--db URL] [--models FILE]
    llm-batch submit JOB.yaml [--server URL] [--wait]
    llm-batch status [ID] [--server URL]
    llm-batch cancel ID [--server URL]
    llm-batch retry ID [--server URL]
    llm-batch demo                    the whole product in one command (`make demo`)

The client commands talk to ``--server`` (default ``LLM_BATCH_SERVER`` or
http://127.0.0.1:8000) over HTTP; they never import Ray or vLLM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from llm_batch.cli.terminal import ProgressView
from llm_batch.errors import JobSpecError
from llm_batch.job.paths import load_job_mapping

__all__ = ["add_commands"]

DEMO_JOB = Path("prompts/reviews-sentiment.yaml")
DEMO_DATA = Path("data/demo")


def _server_default() -> str:
    from llm_batch.service.client import DEFAULT_SERVER

    return os.environ.get("LLM_BATCH_SERVER", DEFAULT_SERVER)


# -- serve ---------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from llm_batch.service.app import create_app
    from llm_batch.service.errors import SettingsError
    from llm_batch.service.settings import Settings

    flags = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "db": args.db,
        "models": args.models,
    }
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(
            f"LLM_BATCH_{'_'.join(str(p) for p in err['loc']).upper()}: "
            + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        raise SettingsError(f"the service's settings are invalid: {problems}") from None
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per request is uvicorn's access log; the Jobs API client's would double it.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(settings)
    settings = app.state.service.settings  # as the app runs them (the bind address: loopback
    # without API keys)
    logging.getLogger(__name__).info(
        "llm_batch service on http://%s:%d (data %s, database %s)",
        settings.host,
        settings.port,
        settings.data_dir,
        settings.database_url.split("@")[-1],  # no password in the log
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
    return 0


# -- submit / status / cancel ----------------------------------------------------------


def _cmd_submit(args: argparse.Namespace) -> int:
    from llm_batch.service.client import JobsClient

    data = load_job_mapping(args.job)
    with JobsClient(args.server) as client:
        # One key per invocation: a connection retry cannot make a second job.
        job = client.submit(data, idempotency_key=uuid.uuid4().hex)
        print(f"submitted {job['id']} ({job['name']}): {job['status']}")
        if not args.wait:
            return 0
        return _follow(client, job)


def _follow(client: Any, job: dict[str, Any]) -> int:
    """Show a job's progress until it ends; 0 when it succeeded."""
    job_id = job["id"]
    last_status = job["status"]
    try:
        with ProgressView(job["name"]) as view:

            def update(current: dict[str, Any]) -> None:
                nonlocal last_status
                if current["status"] != last_status:
                    last_status = current["status"]
                    logging.getLogger(__name__).debug("%s: %s", job_id, last_status)
                view.update(current["progress"])

            final = client.wait(job_id, on_update=update)
    except KeyboardInterrupt:
        print(
            f"\nstopped waiting; {job_id} goes on (`llm-batch cancel {job_id}` stops it)",
            file=sys.stderr,
        )
        return 130
    p = final["progress"]
    print(
        f"{job_id} {final['status']}: {p['rows_done']} rows ({p['rows_failed']} with errors), "
        f"output in {final['output']['path']}"
    )
    if final["status"] == "succeeded":
        return 0
    if final.get("error"):
        print(f"llm-batch: error: {final['error']}", file=sys.stderr)
    return 1


def _cmd_status(args: argparse.Namespace) -> int:
    from llm_batch.service.client import JobsClient

    with JobsClient(args.server) as client:
        if args.id:
            _print_job(client.get(args.id))
        else:
            _print_jobs(client.list(status=args.status, limit=args.limit)["data"])
    return 0


def _when(value: str | None) -> str:
    if not value:
        return "-"
    from datetime import datetime

    return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _rows(p: dict[str, Any]) -> str:
    total = p.get("rows_total")
    return f"{p.get('rows_done', 0)}/{total if total is not None else '?'}"


def _print_job(job: dict[str, Any]) -> None:
    p = job["progress"]
    lines = [
        ("id", job["id"]),
        ("name", job["name"]),
        ("status", job["status"]),
        ("created", _when(job["created_at"])),
        ("started", _when(job["started_at"])),
        ("finished", _when(job["finished_at"])),
        (
            "progress",
            f"{_rows(p)} rows, {p.get('rows_failed', 0)} failed, "
            f"{p.get('output_tokens', 0)} output tokens, {p.get('rows_per_second', 0):.1f} rows/s",
        ),
        ("output", job["output"]["path"]),
    ]
    if job.get("error"):
        lines.append(("error", job["error"]))
    for key, value in lines:
        print(f"{key:<9} {value}")


def _print_jobs(jobs: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not jobs:
        print("no jobs")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "NAME", "STATUS", "ROWS", "FAILED", "CREATED"):
        table.add_column(column)
    for job in jobs:
        p = job["progress"]
        table.add_row(
            job["id"],
            job["name"],
            job["status"],
            _rows(p),
            str(p.get("rows_failed", 0)),
            _when(job["created_at"]),
        )
    Console(width=max(shutil.get_terminal_size().columns, 120)).print(table)


def _cmd_cancel(args: argparse.Namespace) -> int:
    from llm_batch.service.client import JobsClient

    with JobsClient(args.server) as client:
        job = client.cancel(args.id)
    print(f"{job['id']}: {job['status']}")
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    from llm_batch.service.client import JobsClient

    with JobsClient(args.server) as client:
        job = client.retry(args.id)
    print(f"{job['id']}: {job['status']} (its rows with errors run again; retry {job['retries']})")
    return 0


# -- demo --------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from llm_batch.service.client import JobsClient
    from llm_batch.service.process import ServiceProcess

    job_file = Path(args.job)
    if not job_file.exists():
        raise JobSpecError(
            f"demo job {str(job_file)!r} not found; run `make demo` from the repository root"
        )
    data = load_job_mapping(job_file)
    # A fresh data folder: a job left from an interrupted demo would run first.
    shutil.rmtree(DEMO_DATA, ignore_errors=True)
    service = ServiceProcess(
        DEMO_DATA,
        # The service takes paths only under its storage roots: allow exactly what the
        # demo job reads and writes (the repository's prompts/ is not allowed by default).
        env={"VLLM_LOGGING_LEVEL": "WARNING", "LLM_BATCH_STORAGE_ROOTS": _job_paths(data)},
    )
    print(f"1. starting the service on {service.url} (data in {DEMO_DATA}/, a local Ray head)…")
    started = time.monotonic()
    try:
        service.start()
        print(f"   ready in {time.monotonic() - started:.0f}s; API docs at {service.url}/docs")
        with JobsClient(service.url) as client:
            print(f"2. POST {service.url}/v1/jobs  ← {job_file}")
            job = client.submit(data, idempotency_key=uuid.uuid4().hex)
            print(f"   {job['id']} {job['status']}; following GET /v1/jobs/{job['id']}")
            print("3. running (the first batch waits for the vLLM engine to start)…")
            code = _follow(client, job)
            if code != 0:
                print(f"   the service log is {service.log_path}", file=sys.stderr)
                return code
            print(f"4. GET {service.url}/v1/jobs/{job['id']}/results (first {args.rows} rows):")
            for i, row in enumerate(client.rows(job["id"])):
                if i >= args.rows:
                    break
                print("   " + json.dumps(_shorten(row), ensure_ascii=False))
            _print_metrics(client.get(job["id"]))
    finally:
        print("5. stopping the service and its Ray head")
        service.stop()
        service.stop_ray()
    return 0


def _print_metrics(job: dict[str, Any]) -> None:
    """The accumulators of a finished job, as the service reports them."""
    metrics = (job.get("progress") or {}).get("metrics") or {}
    for model, values in metrics.items():
        usage = values.get("token_usage", {})
        print(
            f"   metrics ({model}): {usage.get('rows', 0)} rows, {usage.get('input_tokens', 0)} "
            f"input and {usage.get('output_tokens', 0)} output tokens, "
            f"finish reasons {values.get('finish_reasons', {})}"
        )
        labels = values.get("labels")
        if not labels:
            continue
        print(
            f"   accuracy against the label column: {labels['accuracy']:.3f} "
            f"({labels['rows']} labeled rows, macro F1 {labels['macro_f1']:.3f})"
        )
        cm = labels["confusion_matrix"]
        width = max(len(x) for x in cm["labels"] + cm["predicted"]) + 2
        print("   confusion matrix (rows: truth, columns: predicted)")
        print("   " + " " * width + "".join(p.rjust(width) for p in cm["predicted"]))
        for truth, row in zip(cm["labels"], cm["matrix"], strict=True):
            print("   " + truth.rjust(width) + "".join(str(v).rjust(width) for v in row))


def _job_paths(data: dict[str, Any]) -> str:
    """The local paths and URIs a job file names (input, output, models), comma-separated."""
    blocks = [data.get("input"), data.get("output"), data.get("model"), *(data.get("models") or [])]
    paths = [b["path"] for b in blocks if isinstance(b, dict) and isinstance(b.get("path"), str)]
    return ",".join(p for p in paths if "://" in p or Path(p).is_absolute())


def _shorten(row: dict[str, Any], width: int = 60) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, str) and len(v) > width:
            v = v[: width - 1] + "…"
        out[k] = v
    return out


# -- wiring ----------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    """Add serve, submit, status, cancel and demo to the ``llm-batch`` subparsers."""
    serve = sub.add_parser("serve", help="run the job service (REST API, queue, scheduler)")
    serve.add_argument("--host", help="bind address (LLM_BATCH_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (LLM_BATCH_PORT, default 8000)")
    serve.add_argument(
        "--data-dir", type=Path, help="database, job specs, outputs (LLM_BATCH_DATA_DIR, ./data)"
    )
    serve.add_argument("--db", help="database URL (LLM_BATCH_DB, default SQLite in --data-dir)")
    serve.add_argument(
        "--models", type=Path, help="YAML file of named models jobs may use (LLM_BATCH_MODELS)"
    )
    serve.set_defaults(func=_cmd_serve)

    server_help = "service URL (LLM_BATCH_SERVER, default http://127.0.0.1:8000)"
    submit = sub.add_parser("submit", help="submit a job file to the service")
    submit.add_argument("job", help="the job file (YAML or JSON)")
    submit.add_argument("--server", default=_server_default(), help=server_help)
    submit.add_argument(
        "--wait", action="store_true", help="show progress until the job ends; non-zero if it fails"
    )
    submit.set_defaults(func=_cmd_submit)

    status = sub.add_parser("status", help="one job's status, or a table of recent jobs")
    status.add_argument("id", nargs="?", help="a job id (default: list recent jobs)")
    status.add_argument("--server", default=_server_default(), help=server_help)
    status.add_argument(
        "--status",
        choices=["queued", "running", "cancelling", "cancelled", "succeeded", "failed"],
        help="list only jobs in this status",
    )
    status.add_argument("--limit", type=int, default=20, help="jobs to list (default 20)")
    status.set_defaults(func=_cmd_status)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("id", help="the job id")
    cancel.add_argument("--server", default=_server_default(), help=server_help)
    cancel.set_defaults(func=_cmd_cancel)

    retry = sub.add_parser("retry", help="run an ended job's rows with errors again")
    retry.add_argument("id", help="the job id")
    retry.add_argument("--server", default=_server_default(), help=server_help)
    retry.set_defaults(func=_cmd_retry)

    demo = sub.add_parser(
        "demo", help="start the service, submit the example job over REST, show results, stop"
    )
    demo.add_argument("--job", default=str(DEMO_JOB), help=f"job file (default {DEMO_JOB})")
    demo.add_argument("--rows", type=int, default=5, help="result rows to print (default 5)")
    demo.set_defaults(func=_cmd_demo)
