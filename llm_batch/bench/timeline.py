"""Steady-state throughput from a timeline of completions, computed one way for every system.

A timeline is a list of ``(time, output tokens completed at that time)`` events:
per request for raw vLLM and ray.data.llm, per batch for llm-batch. An embedding
run counts rows instead of tokens (``UNITS``: a row is done when its vector is),
by the same rule; the fields below say tokens for either. The steady-state rate
is measured on the middle of the run, between the completion of 10% and of 90%
of all output tokens, so neither engine start nor the tail (the last, partly
filled batches) counts:

- the window starts at the last event by which at most 10% of the tokens were
  done (the first event if already more) and ends at the first event by which
  at least 90% were done;
- the rate is the tokens completed after the start event, up to and including
  the end event, divided by the time between the two.

Counting from one event to another (never from an arbitrary instant) makes the
measure fair to coarse timelines: a batch's tokens are only counted over a time
span that contains their whole generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

__all__ = ["UNITS", "SteadyState", "cpu_key", "cumulative", "rate_key", "steady_state"]

# What a timeline counts, per bench task; the report's keys are named after it.
UNITS = {"generate": "tokens", "embed": "rows"}


def rate_key(unit: str) -> str:
    """The report's steady rate: ``steady_tokens_per_s``, ``steady_rows_per_s``."""
    return f"steady_{unit}_per_s"


def cpu_key(unit: str) -> str:
    """The report's CPU seconds per 1,000 of the unit done in the steady window."""
    return f"steady_cpu_s_per_1k_{unit}"


@dataclasses.dataclass(frozen=True)
class SteadyState:
    tokens_per_second: float
    start: float  # event times bounding the window, in the timeline's clock
    end: float
    tokens: int  # completed inside the window
    total_tokens: int
    events: int  # distinct completion times in the whole timeline


def cumulative(events: Iterable[tuple[float, int]]) -> list[tuple[float, int]]:
    """Events sorted by time, equal times merged, as ``(time, tokens done so far)``."""
    out: list[tuple[float, int]] = []
    done = 0
    for t, n in sorted(events):
        done += n
        if out and out[-1][0] == t:
            out[-1] = (t, done)
        else:
            out.append((t, done))
    return out


def steady_state(
    events: Iterable[tuple[float, int]], *, low: float = 0.1, high: float = 0.9
) -> SteadyState | None:
    """The windowed rate (see the module docstring); None when the timeline cannot give one.

    That is the case with fewer than two distinct completion times, or when a
    single event carries the run from below ``low`` to past ``high``.
    """
    if not 0 <= low < high <= 1:
        raise ValueError(f"need 0 <= low < high <= 1, got {low=} {high=}")
    points = cumulative(events)
    if len(points) < 2:
        return None
    total = points[-1][1]
    if total <= 0:
        return None
    start = 0
    for i, (_, done) in enumerate(points):
        if done <= low * total:
            start = i
        else:
            break
    end = next(i for i, (_, done) in enumerate(points) if done >= high * total)
    if end <= start:
        return None
    (t0, d0), (t1, d1) = points[start], points[end]
    if t1 <= t0:
        return None
    return SteadyState(
        tokens_per_second=(d1 - d0) / (t1 - t0),
        start=t0,
        end=t1,
        tokens=d1 - d0,
        total_tokens=total,
        events=len(points),
    )
