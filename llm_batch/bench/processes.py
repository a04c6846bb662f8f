"""The processes of one benchmark run: their memory while it runs, and their end after.

A run's runner is started with a marker in its environment
(``LLM_BATCH_BENCH_RUN=<id>``). Every process it starts inherits it: Ray's GCS,
raylet and workers when ``ray.init`` starts a local Ray, vLLM's engine-core and
worker processes. Membership by marker, rather than by parent links, still
finds a process that was re-parented (a daemonized helper, an orphaned engine
core), and it is what makes the clean-up after a run exact: only processes that
run started are ever signalled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any

import psutil

__all__ = ["MARKER_ENV", "MemorySampler", "find_marked", "stop_marked"]

logger = logging.getLogger(__name__)

MARKER_ENV = "LLM_BATCH_BENCH_RUN"
SAMPLER_NICENESS = 19


def _has_marker(proc: psutil.Process, marker: str) -> bool:
    try:
        return proc.environ().get(MARKER_ENV) == marker
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return False


def find_marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``marker``."""
    me = os.getpid()
    return [p for p in psutil.process_iter() if p.pid != me and _has_marker(p, marker)]


def stop_marked(marker: str, *, grace: float = 5.0) -> list[str]:
    """SIGTERM, then SIGKILL after ``grace`` s, every process carrying ``marker``; their names."""
    procs = find_marked(marker)
    names = []
    for p in procs:
        try:
            names.append(f"{p.pid} {_label(p)}")
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    return names


def _label(proc: psutil.Process) -> str:
    """A short, readable name: Ray and vLLM set their process titles in argv."""
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    return cmd if len(cmd) <= 90 else cmd[:89] + "…"


@dataclasses.dataclass
class _Peak:
    bytes: int = 0
    at: float = 0.0
    processes: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class MemorySampler:
    """Samples the summed memory and CPU time of a run's processes every ``interval`` seconds.

    The measure is PSS (proportional set size): shared pages are counted once
    across the group, where RSS would count them in every process that maps
    them (torch and Ray libraries, shared memory of Ray's object store). Reading
    a process's PSS makes the kernel walk its pages, 10-60 ms for an engine
    process here, too much for every tick on a 2-core machine that is also
    running the system under test. So each tick reads RSS (cheap) and scales it
    by the process's PSS/RSS ratio, which is read when the process is first
    seen and again every ``pss_every`` seconds. A process whose PSS cannot be
    read counts by its RSS, and ``metric`` says so.

    CPU time (user + system) is summed over every process seen, a process that
    has ended counting with its last reading. CPU seconds per output token hold
    steadier than tokens per second on a shared machine: other work there slows
    a run down, but barely changes what the run itself spends per token.
    """

    def __init__(
        self, root_pid: int, marker: str, *, interval: float = 0.25, pss_every: float = 3.0
    ):
        self._root = root_pid
        self._marker = marker
        self._interval = interval
        self._pss_every = pss_every
        self._last_pss = 0.0
        self._members: dict[tuple[int, float], psutil.Process] = {}
        self._ratio: dict[tuple[int, float], float] = {}
        self._checked: set[tuple[int, float]] = set()
        self._cpu: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-memory")
        # (monotonic, bytes, processes, CPU seconds so far)
        self.series: list[tuple[float, int, int, float | None]] = []
        self.peak = _Peak()
        self.rss_fallbacks = 0

    @property
    def metric(self) -> str:
        return "pss" if self.rss_fallbacks == 0 else "pss+rss"

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        # The measuring thread yields to what it measures: on a 2-core machine a sample at
        # normal priority takes a core from the engine mid-step, and more so for the
        # systems with more processes to read. At this priority, beside an engine whose two
        # processes spin, a sample can take seconds (one took 10 s): see sample().
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SAMPLER_NICENESS)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - sampling is best effort, never the run's end
                logger.debug("memory sample failed", exc_info=True)
            self._stop.wait(max(self._interval - (time.monotonic() - started), 0.01))

    def _refresh(self) -> None:
        for proc in psutil.process_iter(["create_time"]):
            key = (proc.pid, proc.info["create_time"])
            if key in self._checked:
                continue
            self._checked.add(key)
            if proc.pid == self._root or _has_marker(proc, self._marker):
                self._members[key] = proc

    def _read_ratio(self, key: tuple[int, float], proc: psutil.Process, rss: int) -> None:
        try:
            pss = proc.memory_full_info().pss
        except (psutil.AccessDenied, AttributeError):
            self.rss_fallbacks += 1
            pss = rss
        self._ratio[key] = pss / rss if rss else 1.0

    def sample(self) -> int:
        """One sample: the summed memory now, in bytes (also recorded)."""
        self._refresh()
        now = time.monotonic()
        full = now - self._last_pss >= self._pss_every
        if full:
            self._last_pss = now
        total = 0
        sizes: list[tuple[int, psutil.Process]] = []
        for key, proc in list(self._members.items()):
            try:
                rss = proc.memory_info().rss
                if full or key not in self._ratio:
                    self._read_ratio(key, proc, rss)
                cpu = proc.cpu_times()
                self._cpu[key] = cpu.user + cpu.system
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                del self._members[key]
                self._ratio.pop(key, None)
                continue
            size = int(rss * self._ratio[key])
            total += size
            sizes.append((size, proc))
        took = time.monotonic() - now
        # Readings spread over a long sample have no one time: its CPU total is left out
        # (None), and the CPU series is read between the samples around it.
        cpu = sum(self._cpu.values()) if took <= max(2 * self._interval, 0.5) else None
        self.series.append((now + took / 2, total, len(sizes), cpu))
        if total > self.peak.bytes:
            sizes.sort(key=lambda s: -s[0])
            self.peak = _Peak(
                total, now, [{"pid": p.pid, "bytes": s, "name": _label(p)} for s, p in sizes]
            )
        return total
