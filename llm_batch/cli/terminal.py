"""What the command shows on the terminal, and what goes to the run's log instead.

A local run starts Ray and vLLM engines in this process's tree; their warnings,
worker tracebacks at shutdown and per-engine banners would bury the progress
bar. ``RunLog`` sends the process's standard output and error (file descriptors
1 and 2, so native code and child processes too) to a log file for the rest of the
process, and ``terminal`` keeps writing to the real terminal: the progress bar,
the summary, and on failure one line with the reason and where the full log is.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["ProgressView", "RunLog", "default_log_path", "terminal"]


class Terminal:
    """The command's own output: the terminal, even while a ``RunLog`` captures the
    process's standard streams (else ``sys.stdout`` / ``sys.stderr`` as they are now)."""

    def __init__(self) -> None:
        self._out: IO[str] | None = None
        self._err: IO[str] | None = None
        self.log_path: Path | None = None

    @property
    def out(self) -> IO[str]:
        return self._out or sys.stdout

    @property
    def err(self) -> IO[str]:
        return self._err or sys.stderr

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def error(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def capture(self, out: IO[str], err: IO[str], log_path: Path) -> None:
        self._out, self._err, self.log_path = out, err, log_path


terminal = Terminal()


def default_log_path(name: str) -> Path:
    """``$XDG_STATE_HOME/llm-batch/logs/<job>-<time>.log`` (``~/.local/state`` by default)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:60] or "job"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(state) / "llm-batch" / "logs" / f"{slug}-{stamp}-{os.getpid()}.log"


class RunLog:
    """Send everything this process and its children print to ``path`` from now on, and
    ``terminal`` to the streams the command started with.

    It stays in place until the process exits: Ray and the engines print while they shut
    down, after the run's summary."""

    def __init__(self, path: Path):
        self.path = path

    def start(self) -> RunLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        terminal.capture(out, err, self.path)
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return self


def _rate(snap: dict[str, Any]) -> str:
    """Tokens generated per second; rows per second for a job that generates none (a
    pooling model's: embeddings, classes, scores)."""
    if snap.get("output_tokens"):
        return f"{snap.get('output_tokens_per_second') or 0:.1f} tok/s"
    return f"{snap.get('rows_per_second') or 0:.1f} rows/s"


class ProgressView:
    """A rich progress bar on a terminal; plain periodic lines otherwise."""

    def __init__(self, label: str, *, plain_every: float = 10.0, stream: Any = None):
        self._stream = stream or terminal.err
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
                TextColumn("rows · {task.fields[rate]:>14} · failed {task.fields[failed]}"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(file=self._stream),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self._label, total=None, rate="", failed=0)
        return self

    def update(self, snap: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=snap["rows_done"],
                total=snap.get("rows_total"),
                rate=_rate(snap),
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
            f"{_rate(snap)}, "
            f"{snap.get('rows_failed', 0)} failed"
            + (f", ~{eta:.0f}s left" if eta is not None else ""),
            file=self._stream,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
