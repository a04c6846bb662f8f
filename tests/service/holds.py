"""Holding what must not move while a test acts: a job's driver or a pool's engine
processes, frozen with SIGSTOP and released after (never a race against the machine)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator

import psutil


def driver_process(service, job_id: str, *, timeout: float = 60.0) -> psutil.Process:  # noqa: ANN001
    """The process of a job's driver on the service's local Ray head."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in service.ray_head.processes():
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(proc.cmdline())
                if "llm_batch.pipeline.driver" in cmd and f"/{job_id}/" in cmd:
                    return proc
        time.sleep(0.1)
    raise AssertionError(f"no driver process for {job_id}")


def pool_processes(service, pool_id: str) -> tuple[psutil.Process, list[psutil.Process]]:  # noqa: ANN001
    """A pool's replica actor and its engine processes (core and workers)."""
    for proc in service.ray_head.processes():
        with contextlib.suppress(psutil.Error):
            if f"ServeReplica:{pool_id}" in " ".join(proc.cmdline()) + proc.name():
                engine = proc.children(recursive=True)
                assert engine, f"the replica of {pool_id} has no engine process to hold"
                return proc, engine
    raise AssertionError(f"no replica of {pool_id}")


@contextlib.contextmanager
def frozen(procs: list[psutil.Process]) -> Iterator[None]:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)
