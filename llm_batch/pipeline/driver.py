"""The job driver: one process per job, what the service submits to Ray's Jobs API.

    python -m llm_batch.pipeline.driver SPEC.json [--status URI] [--retry-errors]

It runs the job on the Ray cluster it is started in and keeps a small status
file (``_status.json`` in the output folder by default, on storage the service
can read whether the driver runs beside it or on a cluster) up to date:

    {"state": "running" | "succeeded" | "failed", "progress": {...}, "error": str | null,
     "updated_at": float}

The service's scheduler and ``llm-batch run`` on a cluster launch it the same way
(``llm_batch.drivers.launch_driver``) and follow it through that file.

Exit codes: 0 succeeded, 2 the job is invalid (bad spec, unreadable input),
1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from llm_batch.errors import LLMBatchError
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.fs import open_filesystem

__all__ = [
    "StatusFile",
    "default_status_uri",
    "main",
    "read_pools",
    "read_status",
    "remove_status",
    "write_pools",
]

logger = logging.getLogger(__name__)

STATUS_NAME = "_status.json"  # write.STATUS_NAME: listed in the output's manifest


def default_status_uri(spec: JobSpec) -> str:
    return spec.output_path.rstrip("/") + "/" + STATUS_NAME


class StatusFile:
    """Writes the status JSON atomically (temp name, then rename) at most every ``every`` s."""

    def __init__(self, uri: str, *, every: float = 1.0):
        self._uri = uri
        self._every = every
        self._last = 0.0

    def write(
        self,
        state: str,
        progress: dict[str, Any] | None,
        error: str | None = None,
        *,
        force: bool = False,
    ) -> None:
        now = time.time()
        if not force and now - self._last < self._every:
            return
        self._last = now
        body = json.dumps(
            {"state": state, "progress": progress, "error": error, "updated_at": now}
        ).encode()
        fs, path = open_filesystem(self._uri)
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(body)
        fs.move(tmp, path)


def read_status(uri: str) -> dict[str, Any] | None:
    """The last status a driver wrote, or None when it has written none yet."""
    fs, path = open_filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def remove_status(uri: str) -> None:
    """Delete a status file (an earlier run's would show its progress as the next one's)."""
    fs, path = open_filesystem(uri)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(path)


def write_pools(path: Path, pools: dict[str | None, str]) -> None:
    """The ``--pools`` file: model name (``""`` for a job's only model) → engine pool."""
    path.write_text(json.dumps({"" if k is None else k: v for k, v in pools.items()}))


def read_pools(path: str) -> dict[str | None, str]:
    with open(path, encoding="utf-8") as f:
        return {None if k == "" else k: v for k, v in json.load(f).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_batch.pipeline.driver")
    parser.add_argument("spec", help="the job spec as a JSON (or YAML) file")
    parser.add_argument("--status", help="status file URI (default: <output>/_status.json)")
    parser.add_argument(
        "--pools", help="JSON file: model name → the service's engine pool to send it to"
    )
    parser.add_argument("--job-name", help="how engine pools name this job")
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help="run again only the rows with an error of the job's finished output",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from llm_batch.pipeline.run import Engines, plan_job, run_job

    try:
        spec = JobSpec.from_file(args.spec)
    except LLMBatchError as e:
        print(f"llm-batch: error: {e}", file=sys.stderr)
        return 2
    status = StatusFile(args.status or default_status_uri(spec))
    # A status file in the output folder is written only once the run has claimed the
    # folder (its manifest lists the file): never into a folder that is not the job's.
    claimed = args.status is not None
    last: dict[str, Any] | None = None

    def on_progress(snap: dict[str, Any]) -> None:
        nonlocal last, claimed
        first = not claimed or last is None
        claimed = True
        last = snap
        status.write("running", snap, force=first)

    if claimed:
        status.write("running", None, force=True)
    try:
        plan = plan_job(spec)
        engines = Engines()
        if args.pools:
            engines = Engines(pools=read_pools(args.pools), job=args.job_name)
        result = run_job(
            spec,
            plan=plan,
            on_progress=on_progress,
            engines=engines,
            retry_errors=args.retry_errors,
        )
    except LLMBatchError as e:
        if claimed:
            status.write("failed", last, str(e), force=True)
        print(f"llm-batch: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        logger.exception("job failed")
        if claimed:
            status.write("failed", last, f"{type(e).__name__}: {e}", force=True)
        return 1
    status.write("succeeded", result.progress, force=True)
    print(json.dumps({"output": result.output_path, "progress": result.progress}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
