"""Live progress of one job: engine actors report per batch, the driver reads snapshots.

A small Ray actor (no CPU reserved) is the meeting point; reports are
fire-and-forget so they never slow the engines. The calls a job-local engine stage
waits on are ``begin_batch`` and ``batch_generated``, once per batch each: the tracker
also keeps what engine retries must agree on across actor restarts (``BatchLedger``).
"""

from __future__ import annotations

import time
from typing import Any

from llm_batch.pipeline.accumulators import AccumulatorSet, JobContext

__all__ = ["BatchDecision", "BatchLedger", "ProgressTracker", "Snapshot"]

Snapshot = dict[str, Any]

_SERIES_POINTS = 120
# The series starts with a point per report (no closer than this): a job of a few seconds
# keeps its shape (the first and last batches apart from the steady ones), and a long one
# coarsens as it grows (``_record``).
_SERIES_FIRST_INTERVAL_S = 0.1
# The live rate (and ETA): over the series' last ten seconds, two points at least.
_RATE_WINDOW_S = 10.0


BatchDecision = dict[str, Any]


class BatchLedger:
    """Engine deaths per batch, kept where they survive the engines that die.

    Ray re-runs a dead engine actor's tasks on its restarted actor; a task may
    hold several batches. For each batch the ledger counts how many times it
    entered an engine without reporting back (each such entry is an engine
    death it was in), and whether it ran there alone:

    - a batch with a death behind it runs alone, so a further death is its own;
    - after ``max_retries`` deaths alone (at least one), it is given up: its rows are
      written as error rows, and a re-run of its task gives it up again at once;
    - a batch the engine has generated is never given up, even when its task runs
      again because the actor died before the task ended (the next batch killed the
      engine): it is marked generated before the next batch may enter alone, since
      its report would be lost with the actor;
    - a batch that reported is counted once, even when a re-run of its task
      generates it again (the output is written once either way: Ray Data
      keeps one attempt's output);
    - a pool whose engines keep starting with no batch completing in between
      (``restart_limit``) is broken: the job fails instead of running every
      batch into its retries.
    """

    @staticmethod
    def restart_limit(replicas: int, max_retries: int, in_flight: int = 2) -> int:
        """Engine starts a pool may take with no batch completing before it counts as broken.

        A poison batch costs at most ``max(max_retries, 1) + 1`` deaths: one beside other
        batches, then its runs alone. Batches that would complete may wait behind as many
        of them as an engine holds at once (``in_flight``, at least two: Ray hands a
        restarted actor its retried tasks in no set order), so every engine of the pool
        may work through that many poison batches back to back.
        """
        per_poison_batch = max(max_retries, 1) + 1
        return replicas * (max(in_flight, 2) * per_poison_batch + 1)

    def __init__(self) -> None:
        self._entered: dict[str, list[int]] = {}  # key -> [entries shared, entries alone]
        self._given_up: set[str] = set()
        self._done: set[bytes] = set()
        self._generated: set[bytes] = set()
        self._starts: dict[str | None, int] = {}  # engine starts since a batch completed
        self.starts = 0  # every engine started for the job, all models
        self._replaced: set[str] = set()  # lost engines whose replacement was counted

    def engine_started(
        self, model: str | None, *, count: bool = True, replacing: str | None = None
    ) -> None:
        """An engine started for ``model``; ``count``: a new engine (not one more model
        of an engine several share, each of which is told). ``replacing``: the lost engine
        (a pool's replica) this one replaces, which every batch that was in it tells: one
        start, however many batches saw it go."""
        if replacing is not None:
            if replacing in self._replaced:
                return
            self._replaced.add(replacing)
        self._starts[model] = self._starts.get(model, 0) + 1
        self.starts += int(count)

    def begin(
        self, key: str, *, model: str | None, max_retries: int, restart_limit: int
    ) -> BatchDecision:
        """What an engine stage does with a batch: ``broken`` (fail the job), ``give_up``
        (error rows), else run it, ``alone`` when it has a death behind it."""
        starts = self._starts.get(model, 0)
        if starts > restart_limit:
            return {
                "broken": f"the engine started {starts} times without completing a batch "
                f"(model.max_batch_retries={max_retries}); it cannot run this job"
            }
        shared, alone = self._entered.get(key, (0, 0))
        # At least one run alone, so that the batches beside a poison row are not given up
        # with it even when max_retries is 0.
        generated = bytes.fromhex(key) in self._generated
        if key in self._given_up or (alone >= max(max_retries, 1) and not generated):
            self._given_up.add(key)
            return {
                "give_up": f"the engine died {shared + alone} times while generating this "
                f"batch, {alone} of them with the batch alone in it "
                f"(model.max_batch_retries={max_retries}); its rows were given up"
            }
        return {"alone": shared + alone > 0}

    def enter(self, key: str, *, alone: bool) -> None:
        counts = self._entered.setdefault(key, [0, 0])
        counts[1 if alone else 0] += 1

    def generated(self, key: str) -> None:
        """The batch left the engine with its results: a death from now on is not its."""
        self._entered.pop(key, None)
        self._generated.add(bytes.fromhex(key))

    def finish(
        self, key: str, *, model: str | None, given_up: bool, engine_used: bool = True
    ) -> bool:
        """A batch reported; False when it had reported before (count it once). Only a
        batch the engine generated shows the engine works: one given up, or answered wholly
        by the response cache, leaves the count of starts as it was."""
        self._entered.pop(key, None)
        digest = bytes.fromhex(key)
        if digest in self._done:
            return False
        self._done.add(digest)
        if not given_up and engine_used:
            self._starts[model] = 0
        return True


class ProgressTracker:
    """Counts per model, and a short throughput series (downsampled to ~120 points)."""

    def __init__(
        self,
        rows_total: int | None = None,
        models: list[str | None] | None = None,
        *,
        job: JobContext | None = None,
        accumulators: list[str] | tuple[str, ...] = (),
    ):
        self._started = time.time()
        self._accumulators = AccumulatorSet(job or JobContext(), accumulators)
        self._metrics: dict[str | None, dict[str, Any]] = {}
        self._rows_total = rows_total
        self._models: dict[str | None, dict[str, float]] = {
            m: self._zero() for m in (models or [None])
        }
        self._series: list[tuple[float, int, int]] = []  # (seconds, rows_done, output_tokens)
        self._interval = _SERIES_FIRST_INTERVAL_S
        self._opened = 0.0  # when the series' last point was added (it is updated until then)
        self._resumed_rows = 0
        self._engines: dict[str, dict[str, Any]] = {}
        self._ledger = BatchLedger()
        self._cancelled = False

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """Start over for another job (a warm tracker of the service's engine host)."""
        self.__init__(*args, **kwargs)  # type: ignore[misc]

    @staticmethod
    def _zero() -> dict[str, float]:
        return {
            "rows_done": 0,
            "rows_failed": 0,
            "rows_deduplicated": 0,
            "rows_cached": 0,
            "rows_skipped": 0,
            "input_tokens": 0,
            "output_tokens": 0,
        }

    # The engine stages' side of the BatchLedger (see there).
    def engine_started(self, model: str | None, **kwargs: Any) -> None:
        self._ledger.engine_started(model, **kwargs)

    def batch_generated(self, key: str) -> None:
        self._ledger.generated(key)

    def begin_batch(self, key: str, **kwargs: Any) -> BatchDecision:
        if self._cancelled:
            return {"cancelled": True}
        return self._ledger.begin(key, **kwargs)

    def cancel(self) -> None:
        """Stop the job: no batch begins any more, and a shared engine pool aborts the job's
        requests (``pool.EnginePool`` asks ``cancelled``)."""
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    def enter_batch(self, key: str, *, alone: bool) -> None:
        self._ledger.enter(key, alone=alone)

    def report(
        self,
        *,
        model: str | None,
        rows: int,
        failed: int,
        input_tokens: int,
        output_tokens: int,
        seconds: float,
        deduplicated: int = 0,
        cached: int = 0,
        skipped: int = 0,
        metrics: dict[str, Any] | None = None,
        engine: dict[str, Any] | None = None,
        batch_key: str | None = None,
        given_up: bool = False,
    ) -> None:
        if batch_key is not None and not self._ledger.finish(
            batch_key, model=model, given_up=given_up, engine_used=cached + skipped < rows
        ):
            return  # a re-run of a batch already counted
        if engine is not None:
            # A restarted actor keeps its id but may come back on another node.
            key = f"{engine.get('actor_id')}@{engine.get('node_id')}"
            seen = self._engines.setdefault(
                key, {"model": model, "node_id": engine.get("node_id"), "rows": 0}
            )
            seen["rows"] += rows
            # The engine's load at this report (EngineLoad.take): levels replace, the
            # time-to-first-token sums add up.
            for level in ("running", "waiting", "kv_cache_usage"):
                if level in engine:
                    seen[level] = engine[level]
            for total in ("ttft_sum", "ttft_count"):
                if total in engine:
                    seen[total] = seen.get(total, 0) + engine[total]
        if metrics is not None:
            self._metrics[model] = self._accumulators.merge(self._metrics.get(model), metrics)
        self._add(model, rows, failed, input_tokens, output_tokens)
        self._models[model]["rows_deduplicated"] += deduplicated
        self._models[model]["rows_cached"] += cached
        self._models[model]["rows_skipped"] += skipped
        self._record()

    def preload(
        self,
        *,
        model: str | None,
        rows: int,
        failed: int,
        input_tokens: int,
        output_tokens: int,
        view: Any,
    ) -> None:
        """Count rows an interrupted earlier run already wrote (read back from its files)."""
        self._metrics[model] = self._accumulators.merge(
            self._metrics.get(model), self._accumulators.update(view)
        )
        self._add(model, rows, failed, input_tokens, output_tokens)
        self._resumed_rows = int(min(m["rows_done"] for m in self._models.values()))

    def _add(self, model: str | None, rows: int, failed: int, inp: int, out: int) -> None:
        counts = self._models.setdefault(model, self._zero())
        counts["rows_done"] += rows
        counts["rows_failed"] += failed
        counts["input_tokens"] += inp
        counts["output_tokens"] += out

    def _record(self) -> None:
        now = time.time() - self._started
        last = self._models[min(self._models, key=lambda m: self._models[m]["rows_done"])]
        point = (now, int(last["rows_done"]), int(self._total("output_tokens")))
        # The last point takes every report of its interval, counted from when it was
        # added: counted from its last update, reports coming faster than the interval
        # would all fold into one point, and the series lose the run's shape.
        if self._series and now - self._opened < self._interval:
            self._series[-1] = point
            return
        self._series.append(point)
        self._opened = now
        if len(self._series) > _SERIES_POINTS:  # halve the resolution, keep the span
            self._series = self._series[::2] + ([point] if self._series[-1] != point else [])
            self._interval *= 2

    def _total(self, key: str) -> float:
        return sum(m[key] for m in self._models.values())

    def metrics(self) -> dict[str, Any]:
        """Merged accumulator results per model (``default`` for a single-model job)."""
        return {
            ("default" if m is None else m): self._accumulators.result(state)
            for m, state in self._metrics.items()
        }

    def snapshot(self) -> Snapshot:
        elapsed = time.time() - self._started
        # A row is done when every model has answered it.
        done = int(min(m["rows_done"] for m in self._models.values()))
        failed = int(max(m["rows_failed"] for m in self._models.values()))
        out_tokens = int(self._total("output_tokens"))
        since = self._series[-1][0] - _RATE_WINDOW_S if self._series else 0.0
        recent = [p for p in self._series if p[0] >= since]
        if len(recent) < 2:
            recent = self._series[-2:]
        rate = tok_rate = 0.0
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            span = recent[-1][0] - recent[0][0]
            rate = (recent[-1][1] - recent[0][1]) / span
            tok_rate = (recent[-1][2] - recent[0][2]) / span
        elif elapsed > 0:
            rate, tok_rate = done / elapsed, out_tokens / elapsed
        eta = None
        if self._rows_total is not None and rate > 0:
            eta = max(self._rows_total - done, 0) / rate
        return {
            "rows_total": self._rows_total,
            "rows_done": done,
            "rows_failed": failed,
            # Rows that took the output of an identical row instead of generating it again.
            "rows_deduplicated": int(self._total("rows_deduplicated")),
            # Rows the response cache answered (cache.py): generated by an earlier run.
            "rows_cached": int(self._total("rows_cached")),
            "input_tokens": int(self._total("input_tokens")),
            "output_tokens": out_tokens,
            "rows_per_second": round(rate, 3),
            "output_tokens_per_second": round(tok_rate, 3),
            "eta_seconds": None if eta is None else round(eta, 1),
            "elapsed_seconds": round(elapsed, 3),
            "resumed_rows": self._resumed_rows,
            # Engines the job's stages started (restarts included); a job the response
            # cache answered wholly starts none.
            "engine_starts": self._ledger.starts,
            "engines": [
                {
                    "actor_id": k.split("@")[0],
                    **{**v, "model": "default" if v["model"] is None else v["model"]},
                }
                for k, v in self._engines.items()
            ],
            "models": {
                ("default" if m is None else m): {k: int(v) for k, v in c.items()}
                for m, c in self._models.items()
            },
            "metrics": self.metrics(),
            "series": [
                {"t": round(t, 2), "rows_done": r, "output_tokens": o} for t, r, o in self._series
            ],
        }
