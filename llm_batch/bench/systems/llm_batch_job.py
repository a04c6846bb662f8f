"""(c) This project's pipeline: a ``JobSpec`` of the same workload through ``run_job``.

Two probes, neither on the data path, handed to ``run_job`` as its engine stage and
its tracker class. ``TimedEngineStage`` is the pipeline's engine stage, noting when
its engine started and was ready. The timeline comes from the job's progress
tracker, which every engine batch reports to; its own series merges reports closer than
0.1 s, and coarsens as a run grows, so the runner uses ``StampingTracker``:
the same tracker, which also appends ``(time.monotonic(), output tokens, rows)`` for
each report to a file (the timeline counts tokens, or rows when embedding). Reports
are fire-and-forget calls to a separate actor; the stamp is when a batch's report
arrives, about when the batch is handed on.

Without stamps (none arrived), the runner falls back to the tracker's series, placed
on this process's clock through each snapshot's ``elapsed_seconds``: the tracker's
start is (receipt time - elapsed), at its smallest over all snapshots.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from llm_batch.bench.systems.common import ENGINE_STARTS_ENV, first_engine, record_engine_start
from llm_batch.pipeline.engine import EngineStage
from llm_batch.pipeline.progress import ProgressTracker

__all__ = ["EVENTS_ENV", "StampingTracker", "TimedEngineStage", "run"]

EVENTS_ENV = "LLM_BATCH_BENCH_EVENTS"


class StampingTracker(ProgressTracker):
    """``ProgressTracker`` that also writes one ``<monotonic> <output tokens> <rows>`` line
    per report."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        path = os.environ.get(EVENTS_ENV)
        self._events = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115

    def report(self, **kwargs: Any) -> None:
        super().report(**kwargs)
        if self._events is not None:
            self._events.write(f"{time.monotonic()!r} {kwargs['output_tokens']} {kwargs['rows']}\n")


class TimedEngineStage(EngineStage):
    """``EngineStage`` that notes when its engine started and was ready; nothing else changes."""

    def __init__(self, *args: Any, **kwargs: Any):
        # vLLM imported before the clock starts, as the other two runners have it imported
        # by then (raw: `from vllm import LLM`; ray.data.llm: its stage's module): engine
        # start is the engine's construction alone, the same for all three.
        import vllm.v1.engine.async_llm  # noqa: F401

        started = time.monotonic()
        super().__init__(*args, **kwargs)
        record_engine_start(started, time.monotonic())


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    from llm_batch.job.spec import JobSpec
    from llm_batch.pipeline.run import Engines, run_job

    spec = JobSpec.model_validate(cfg["job"])
    events_file = Path(cfg["result"]).with_name("events.txt")
    engines_file = events_file.with_name("engines.txt")
    for f in (events_file, engines_file):
        f.unlink(missing_ok=True)
    # The local Ray that run_job starts, and so its actors, inherit these.
    os.environ[EVENTS_ENV] = str(events_file)
    os.environ[ENGINE_STARTS_ENV] = str(engines_file)
    received: list[tuple[float, float]] = []

    def on_progress(snap: dict[str, Any]) -> None:
        received.append((time.monotonic(), snap["elapsed_seconds"]))

    result = run_job(
        spec,
        on_progress=on_progress,
        engines=Engines(stage=TimedEngineStage),
        tracker_class=StampingTracker,
    )
    written = time.monotonic()

    import ray

    ray.shutdown()
    final = result.progress
    rows = cfg["task"] == "embed"  # count rows, not output tokens
    events = _read_events(events_file, rows=rows)
    source = "tracker reports (stamped)"
    if not events:
        events = _series_events(final["series"], received, rows=rows)
        source = "tracker series"
    notes = [f"timeline: {source}"]
    if final["rows_failed"]:
        notes.append(f"{final['rows_failed']} rows failed")
    engine_started, engine_ready = first_engine(engines_file)
    return {
        "engine_started_at": engine_started,
        "engine_ready_at": engine_ready,
        "first_output_at": min((t for t, n in events if n), default=None),
        "output_written_at": written,
        "events": events,
        "notes": notes,
        "progress": {k: v for k, v in final.items() if k not in ("series", "metrics")},
    }


def _read_events(path: Path, *, rows: bool = False) -> list[tuple[float, int]]:
    """``StampingTracker``'s lines as ``(time, output tokens)``, or ``(time, rows)``."""
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        at, tokens, done = line.split()
        events.append((float(at), int(done if rows else tokens)))
    return events


def _series_events(
    series: list[dict[str, Any]], received: list[tuple[float, float]], *, rows: bool = False
) -> list[tuple[float, int]]:
    if not received:
        return []
    key = "rows_done" if rows else "output_tokens"
    tracker_start = min(at - elapsed for at, elapsed in received)
    events, done = [], 0
    for point in series:
        new = point[key] - done
        if new > 0:
            events.append((tracker_start + point["t"], new))
            done = point[key]
    return events
