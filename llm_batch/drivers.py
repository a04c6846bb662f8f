"""Job drivers on Ray's Jobs API: the one way a job is launched on a cluster.

A job's driver is ``python -m llm_batch.pipeline.driver SPEC [--status URI]``
(``pipeline/driver.py``), submitted through Ray's Jobs API. The service's
scheduler and ``llm-batch run --address`` both launch it with ``launch_driver``
and follow it through ``JobsAPI``:

- ``RayJobs`` is a thin face over ``ray.job_submission.JobSubmissionClient`` that
  turns its errors into answers: an unknown submission is ``None`` (the cluster
  was restarted and forgot it), an unreachable cluster is ``ServiceUnavailable``.
  It is also the seam where unit tests put an in-memory cluster.
- Every driver is tagged with the same metadata (``submission_metadata``), which is
  how either submitter finds the Ray job still writing an output
  (``output_writers``) before it starts a second driver there: two drivers on one
  output delete each other's uncommitted part files and checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llm_batch.errors import ServiceUnavailable

if TYPE_CHECKING:
    from llm_batch.job.spec import JobSpec

__all__ = [
    "JOB_ID_KEY",
    "OUTPUT_KEY",
    "SPEC_KEY",
    "JobsAPI",
    "RayJobs",
    "busy_output",
    "driver_env",
    "driver_error",
    "entrypoint",
    "launch_driver",
    "output_writers",
    "submission_metadata",
    "write_spec",
]

logger = logging.getLogger(__name__)


class JobsAPI(Protocol):
    def submit(
        self,
        submission_id: str,
        entrypoint: str,
        *,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> bool: ...
    def status(self, submission_id: str) -> str | None: ...
    def stop(self, submission_id: str) -> bool: ...
    def failure(self, submission_id: str, *, lines: int = 20) -> str: ...
    def version(self) -> str: ...
    def unfinished(self) -> list[str]: ...
    def unfinished_metadata(self) -> dict[str, dict[str, str]]: ...


# Keys of a job driver's Ray job metadata (besides Ray's usual ``name``).
OUTPUT_KEY = "llm_batch_output"  # the output folder the driver writes
SPEC_KEY = "llm_batch_spec"  # spec_digest of the job it runs
JOB_ID_KEY = "llm_batch_job_id"  # the service's job id (service jobs only)


def submission_metadata(spec: JobSpec, *, job_id: str | None = None) -> dict[str, str]:
    """The Ray job metadata every job driver is submitted with, by the service (``job_id``:
    its job's id) and by ``llm-batch run --address`` alike."""
    metadata = {"name": spec.name[:100], OUTPUT_KEY: spec.output_path, SPEC_KEY: spec.digest()}
    if job_id is not None:
        metadata[JOB_ID_KEY] = job_id
    return metadata


def entrypoint(
    spec_path: str,
    *,
    python: str | None = None,
    status: str | None = None,
    extra: list[str] | None = None,
) -> str:
    """The shell command that runs the job driver on ``spec_path`` as a Ray job, with
    ``python`` (default: this interpreter), keeping its status at ``status`` (default:
    ``_status.json`` in the output folder)."""
    args = [python or sys.executable, "-m", "llm_batch.pipeline.driver", spec_path]
    return shlex.join(args + (["--status", status] if status else []) + (extra or []))


def driver_env() -> dict[str, str]:
    """Environment variables for a driver submitted to Ray (its engine actors inherit them):
    vLLM's per-request INFO lines would bury the job's log, whose tail is what a failed
    job reports."""
    return {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}


SPEC_NAME = "spec.json"
POOLS_NAME = "pools.json"


def write_spec(folder: Path, spec: JobSpec) -> Path:
    """``folder/spec.json``, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{SPEC_NAME}.tmp"
    tmp.write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    os.replace(tmp, folder / SPEC_NAME)
    return folder / SPEC_NAME


def launch_driver(
    jobs: JobsAPI,
    spec: JobSpec,
    *,
    submission_id: str,
    spec_dir: Path | None = None,
    status: str | None = None,
    python: str | None = None,
    job_id: str | None = None,
    clear_status: bool = True,
    pools: dict[str | None, str] | None = None,
    retry_errors: bool = False,
) -> bool:
    """Submit the driver of ``spec`` (absolute paths, validated) under ``submission_id``;
    False when Ray already runs that submission (then it is followed, not started again).

    The spec goes to ``spec_dir/spec.json`` when the cluster's nodes read that folder (the
    service's data directory); without one, it travels as the Ray job's working directory
    (uploaded by the Jobs API). With ``clear_status``, a status file left by an earlier
    run is removed first: it would show that run's progress as this one's. ``pools``
    (model name → Serve application of the service's shared pools) has the job's engine
    stages send their batches there instead of starting engines. ``retry_errors``: the
    driver runs again only the rows with an error of the job's finished output.
    """
    from llm_batch.pipeline.driver import default_status_uri, remove_status, write_pools

    if clear_status:
        remove_status(status or default_status_uri(spec))
    metadata = submission_metadata(spec, job_id=job_id)
    env = {"env_vars": driver_env()}
    extra = ["--job-name", job_id] if job_id else []
    if retry_errors:
        extra.append("--retry-errors")
    if spec_dir is not None:
        write_spec(spec_dir, spec)
        if pools:
            write_pools(spec_dir / POOLS_NAME, pools)
            extra += ["--pools", str(spec_dir / POOLS_NAME)]
        command = entrypoint(str(spec_dir / SPEC_NAME), python=python, status=status, extra=extra)
        return jobs.submit(submission_id, command, runtime_env=env, metadata=metadata)
    with tempfile.TemporaryDirectory(prefix="llm-batch-run-") as folder:
        write_spec(Path(folder), spec)
        if pools:
            write_pools(Path(folder) / POOLS_NAME, pools)
            extra += ["--pools", POOLS_NAME]
        command = entrypoint(SPEC_NAME, python=python, status=status, extra=extra)
        return jobs.submit(
            submission_id, command, runtime_env={**env, "working_dir": folder}, metadata=metadata
        )


def _output_key(path: str) -> str:
    # The service keeps resolved paths, ``llm-batch run`` absolute ones as written: compare
    # local folders resolved, URIs without a trailing slash.
    if "://" in path:
        return path.rstrip("/")
    return os.path.realpath(os.path.expanduser(path))


def output_writers(jobs: JobsAPI, output_path: str) -> dict[str, dict[str, str]]:
    """The cluster's unfinished job drivers (of either submitter) that write ``output_path``:
    submission id → their metadata (``submission_metadata``)."""
    key = _output_key(output_path)
    return {
        submission_id: metadata
        for submission_id, metadata in jobs.unfinished_metadata().items()
        if isinstance(metadata.get(OUTPUT_KEY), str) and _output_key(metadata[OUTPUT_KEY]) == key
    }


def busy_output(output_path: str, submission_id: str) -> str:
    """Why a job writing ``output_path`` is not started while ``submission_id`` writes it."""
    return (
        f"output.path: {output_path!r} is being written by {submission_id}, another job "
        "still running on the Ray cluster; wait for it, stop it, or choose another output"
    )


def driver_error(jobs: JobsAPI, submission_id: str, status: dict[str, Any] | None) -> str:
    """Why a job driver that Ray reports FAILED failed: the error it wrote to its status
    file (``llm_batch.pipeline.driver``), else the last lines of its log."""
    status = status or {}
    error = status.get("error") if status.get("state") == "failed" else None
    if error:
        return str(error)
    tail = jobs.failure(submission_id)
    return "the job driver ended with an error" + (f":\n{tail}" if tail else "")


class RayJobs:
    """``JobsAPI`` on a real cluster; statuses are Ray's (PENDING, RUNNING, STOPPED,
    SUCCEEDED, FAILED)."""

    def __init__(self, address: str):
        self.address = address
        self._client: Any = None
        self._lock = threading.Lock()

    def _jobs(self) -> Any:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.address)
                except (ConnectionError, RuntimeError) as e:
                    raise ServiceUnavailable(
                        f"Ray at {self.address} is not reachable: {e}"
                    ) from None
            return self._client

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        import requests

        try:
            return getattr(self._jobs(), name)(*args, **kwargs)
        except (requests.exceptions.RequestException, ConnectionError) as e:
            self._client = None  # reconnect next time (the head may have been restarted)
            raise ServiceUnavailable(f"Ray at {self.address} is not reachable: {e}") from None

    def submit(
        self,
        submission_id: str,
        entrypoint: str,
        *,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> bool:
        """Submit; False when Ray already has this submission id (then it is followed)."""
        try:
            self._call(
                "submit_job",
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env,
                metadata=metadata,
            )
        except RuntimeError as e:
            if "already exists" in str(e):
                return False
            raise
        return True

    def status(self, submission_id: str) -> str | None:
        try:
            return str(self._call("get_job_status", submission_id).value)
        except RuntimeError as e:
            if "status code 404" in str(e) or "does not exist" in str(e):
                return None
            raise

    def stop(self, submission_id: str) -> bool:
        try:
            return bool(self._call("stop_job", submission_id))
        except RuntimeError as e:
            if "status code 404" in str(e) or "does not exist" in str(e):
                return False
            raise

    def failure(self, submission_id: str, *, lines: int = 20) -> str:
        """The last lines of the driver's log (or Ray's own message when there is none)."""
        try:
            logs = str(self._call("get_job_logs", submission_id) or "")
        except (RuntimeError, ServiceUnavailable):
            logs = ""
        tail = "\n".join(logs.strip().splitlines()[-lines:])
        if tail:
            return tail
        try:
            return str(self._call("get_job_info", submission_id).message or "")
        except (RuntimeError, ServiceUnavailable):
            return ""

    def unfinished(self) -> list[str]:
        """Submission ids of the cluster's jobs that have not ended."""
        return list(self.unfinished_metadata())

    def unfinished_metadata(self) -> dict[str, dict[str, str]]:
        """The cluster's jobs that have not ended: submission id → the metadata they were
        submitted with."""
        return {
            str(j.submission_id): dict(j.metadata or {})
            for j in self._call("list_jobs")
            if j.submission_id and not j.status.is_terminal()
        }

    def version(self) -> str:
        # A cheap round trip to the dashboard (GET /api/version).
        self._call("_check_connection_and_version")
        return str(self._jobs()._server_ray_version)
