"""``llm-batch run`` on a Ray cluster: the job's driver runs there, as a Ray job.

With ``--address`` (or ``RAY_ADDRESS``), ``llm-batch run`` does for one job what the
service's scheduler does for each of its jobs: it launches the job driver
(``python -m llm_batch.pipeline.driver``) through Ray's Jobs API with
``llm_batch.drivers.launch_driver`` and follows it from here: Ray for the job's state,
the driver's status file (``<output>/_status.json``) for its progress, shown with the
same progress view as a local run. The driver belongs to the cluster, so the job
keeps running when this process ends; Ctrl-C only stops following, and says how to
follow or stop the job (running the same command again follows it).

The spec travels as the Ray job's working directory (``runtime_env.working_dir``,
uploaded by the Jobs API), with its local paths made absolute first: they must mean
the same files on the cluster's nodes (a shared mount, or a cluster on this
machine); object storage URIs mean the same everywhere. The driver runs with the
cluster's ``python``, or with this interpreter when the cluster is on this machine.
"""

from __future__ import annotations

import ipaddress
import logging
import shlex
import socket
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llm_batch.cli.terminal import ProgressView, terminal
from llm_batch.drivers import (
    SPEC_KEY,
    RayJobs,
    busy_output,
    driver_error,
    launch_driver,
    output_writers,
)
from llm_batch.errors import LLMBatchError, ServiceUnavailable
from llm_batch.job.paths import absolute_paths
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.driver import default_status_uri, read_status

__all__ = ["on_this_machine", "run_on_cluster"]

_ACTIVE = ("PENDING", "RUNNING")
# How long the dashboard may be unreachable while following (a head restarting)
# before giving up on following; the job itself is Ray's.
UNREACHABLE_GRACE = 120.0


def on_this_machine(address: str) -> bool:
    """Whether a Ray address (dashboard URL, ``ray://`` client address, GCS ``host:port``
    or ``auto``) names a cluster on this machine: a loopback host or one of its own
    addresses."""
    if address.strip() == "auto":
        return True
    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        ips = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, ValueError):
        return False
    if all(ip.is_loopback for ip in ips):
        return True
    import psutil

    own = {
        a.address.split("%")[0]
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.address
    }
    return bool(ips) and all(str(ip) in own for ip in ips)


def _absolute(spec: JobSpec) -> JobSpec:
    # The driver runs in the Ray job's working directory, not here.
    data = spec.model_dump(mode="json")
    return JobSpec.from_dict(absolute_paths(data, Path.cwd()), source="job")


def _submission_id(name: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in name.lower())[:40].strip("-")
    return f"llm-batch-{slug or 'job'}-{uuid.uuid4().hex[:8]}"


def run_on_cluster(
    spec: JobSpec,
    *,
    address: str,
    jobs: Any = None,
    poll: float = 1.0,
    retry_errors: bool = False,
) -> int:
    """Run ``spec`` (validated and planned already) as a Ray job on the cluster at
    ``address`` and follow it to its end; the exit code of ``llm-batch run`` (0 when the
    job succeeded, its output at ``spec.output_path``). ``jobs`` is the Jobs API
    (default: ``RayJobs(address)``), the seam for tests."""
    _quiet_ray_client()
    spec = _absolute(spec)
    jobs = jobs if jobs is not None else RayJobs(address)
    status_uri = default_status_uri(spec)
    started = time.monotonic()
    submission_id = _already_running(jobs, spec, address)
    if submission_id is not None:
        said = f"following {submission_id}, which already runs this job on the cluster"
    else:
        submission_id = _submission_id(spec.name)
        python = None if on_this_machine(address) else "python"
        launch_driver(
            jobs, spec, submission_id=submission_id, python=python, retry_errors=retry_errors
        )
        said = f"submitted {spec.name} to the Ray cluster at {address} as {submission_id}"
    # From here on the job runs without us: a Ctrl-C, even one that lands while this line
    # is printed (a user who reacts to it does), only stops following.
    try:
        terminal.error(said)
        state, status = _follow(jobs, submission_id, status_uri, spec.name, address, poll=poll)
    except KeyboardInterrupt:
        terminal.error(
            f"\nstopped following; {submission_id} keeps running on the Ray cluster "
            "(run the same command again to follow it)\n" + _commands(submission_id, address)
        )
        return 130
    progress = status.get("progress") or {}
    if state == "SUCCEEDED":
        wall = max(time.monotonic() - started, float(progress.get("elapsed_seconds") or 0))
        terminal.say(
            f"wrote {progress.get('rows_done', 0)} rows ({progress.get('rows_failed', 0)} "
            f"with errors) to {spec.output_path} in {wall:.1f}s"
        )
        return 0
    if state == "STOPPED":
        terminal.error(
            f"llm-batch: error: {submission_id} was stopped on the cluster; "
            f"{progress.get('rows_done', 0)} rows are in {spec.output_path} (running the job "
            "again resumes from them)"
        )
        return 1
    terminal.error(f"llm-batch: error: {driver_error(jobs, submission_id, status)}")
    return 1


def _quiet_ray_client() -> None:
    # Ray's Jobs API client logs each package upload (and a ray:// address's connection)
    # at INFO, on the progress view's stream; its modules set their own levels when
    # imported: import them first.
    import ray.client_builder
    import ray.dashboard.modules.dashboard_sdk
    import ray.dashboard.modules.job.sdk  # noqa: F401

    for name in (
        "ray.client_builder",
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


def _commands(submission_id: str, address: str) -> str:
    sid, at = shlex.quote(submission_id), shlex.quote(address)
    return (
        f"  its log:  ray job logs {sid} --follow --address {at}\n"
        f"  stop it:  ray job stop {sid} --address {at}"
    )


def _already_running(jobs: Any, spec: JobSpec, address: str) -> str | None:
    """A Ray job still running this very job (an earlier ``run`` stopped following it):
    its submission id, to follow instead of starting a second driver on the same output.
    Another job still writing the output, a service's job included, is refused."""
    digest = spec.digest()
    for submission_id, metadata in output_writers(jobs, spec.output_path).items():
        if metadata.get(SPEC_KEY) == digest:
            return str(submission_id)
        raise LLMBatchError(
            f"{busy_output(spec.output_path, submission_id)}\n{_commands(submission_id, address)}"
        )
    return None


def _follow(
    jobs: Any, submission_id: str, status_uri: str, label: str, address: str, *, poll: float
) -> tuple[str, dict[str, Any]]:
    """Show the job's progress until Ray reports it ended: (Ray's state, last status)."""
    unreachable_since: float | None = None
    status: dict[str, Any] = {}
    with ProgressView(label) as view:
        while True:
            try:
                state = jobs.status(submission_id)
                unreachable_since = None
            except ServiceUnavailable as e:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > UNREACHABLE_GRACE:
                    raise LLMBatchError(
                        f"stopped following {submission_id}, which may still run on the "
                        f"cluster: {e}\n{_commands(submission_id, address)}"
                    ) from None
                time.sleep(poll)
                continue
            status = read_status(status_uri) or status
            if status.get("progress"):
                view.update(status["progress"])
            if state is None:
                raise LLMBatchError(
                    f"the Ray cluster no longer knows {submission_id} (was its head "
                    "restarted?); run the job again: it resumes from the rows already written"
                )
            if state not in _ACTIVE:
                return str(state), status
            time.sleep(poll)
