"""The job-local engine stage: a Ray Data actor that owns one vLLM engine.

Each actor holds one ``Generator`` (``generation.py``); it takes several batches at a
time (``max_batches_in_flight``), so the engine is never idle while the next batch
travels, and appends the model's columns to each batch (``rows.BatchFinisher``).

An engine that dies ends its actor: Ray Data restarts the actor and re-runs its
batches, and the job's tracker keeps a ledger of deaths per batch (``progress.py``):
a batch that was in an engine when it died runs alone next, and one that keeps
killing it becomes error rows. In the service, the engine stage is a client of a
shared pool instead (``pool.py``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa

from llm_batch import columns
from llm_batch.errors import EngineUnavailable
from llm_batch.pipeline.cache import CacheConfig, ResponseCache
from llm_batch.pipeline.engine_args import SamplingParamsCache
from llm_batch.pipeline.generation import (
    BatchInputs,
    Generator,
    RowResult,
    whereabouts,
    with_skipped,
)
from llm_batch.pipeline.progress import BatchLedger
from llm_batch.pipeline.prompts import stopped_rows
from llm_batch.pipeline.rows import BatchFinisher, BatchReport, batch_key

__all__ = ["BatchGate", "EngineStage", "report_batch"]

logger = logging.getLogger(__name__)


def report_batch(
    tracker: Any,
    report: BatchReport,
    *,
    model_name: str | None,
    engine: dict[str, Any],
    seconds: float,
    key: str | None,
    given_up: bool = False,
) -> None:
    """Tell the job's tracker a batch is done (fire and forget)."""
    tracker.report.remote(
        model=model_name,
        engine=engine,
        rows=report.rows,
        failed=report.failed,
        input_tokens=report.input_tokens,
        output_tokens=report.output_tokens,
        deduplicated=report.deduplicated,
        cached=report.cached,
        skipped=report.skipped,
        seconds=seconds,
        metrics=report.metrics,
        batch_key=key,
        given_up=given_up,
    )


def given_up_results(batch: pa.Table, reason: str) -> list[RowResult]:
    """Error rows for a batch given up; rows that never reached the engine keep their own,
    and rows stopped at an earlier stage stay skipped."""
    stopped = stopped_rows(batch) or [False] * batch.num_rows
    return [
        RowResult(skipped=True) if s else RowResult.failed(e or reason)
        for e, s in zip(batch.column(columns.RENDER_ERROR).to_pylist(), stopped, strict=True)
    ]


@dataclasses.dataclass
class _Member:
    """One model an engine stage serves: its column prefix, its LoRA adapter and what
    appends its columns. Several share the engine when they are adapters of one base."""

    name: str | None
    lora: dict[str, str] | None
    finisher: BatchFinisher
    cache: ResponseCache | None


class EngineStage:
    """``map_batches`` callable class: one vLLM engine per actor.

    Arguments are plain dicts (the job spec's ``model``, ``sampling`` and
    ``metrics`` blocks), so they pickle cheaply into the actor. In a
    multi-model job each model's stage appends its own prefixed columns; the
    last one drops the internal columns (``drop``) before the rows are written.
    ``members``: the models this one engine serves, when several LoRA adapters of one
    base share it (``{name, lora, cache}`` each, in column order); by default the one
    model ``model_name``.
    """

    generator_class: type[Generator] = Generator

    def __init__(
        self,
        model: dict[str, Any],
        sampling: dict[str, Any],
        *,
        model_name: str | None = None,
        progress: Any = None,
        metrics: dict[str, Any] | None = None,
        drop: list[str] | tuple[str, ...] = (),
        cache: CacheConfig | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        members: list[dict[str, Any]] | None = None,
    ):
        self._chat_template_kwargs = chat_template_kwargs
        self._model = model
        self._progress = progress
        self._max_retries = int(model["max_batch_retries"])
        replicas = model["replicas"]
        most = replicas["max"] if isinstance(replicas, dict) else replicas
        self._restart_limit = BatchLedger.restart_limit(
            most, self._max_retries, model["max_batches_in_flight"]
        )
        self._gate = BatchGate()
        self._watchdog: asyncio.Future[None] | None = None
        self._overrides_column = sampling.get("overrides_column")
        self._sampling = sampling
        self._params: SamplingParamsCache | None = None  # vLLM's, made with the engine
        given = members or [{"name": model_name, "lora": model.get("lora"), "cache": cache}]
        self._members = [
            _Member(
                name=m["name"],
                lora=None if not m["lora"] else {"name": str(m["name"]), "path": m["lora"]},
                finisher=BatchFinisher(
                    sampling,
                    model_name=m["name"],
                    metrics=metrics,
                    drop=drop if i == len(given) - 1 else (),
                    task=model["task"],
                    reasoning=bool(model.get("reasoning_parser")),
                ),
                cache=ResponseCache(m["cache"], sampling) if m["cache"] is not None else None,
            )
            for i, m in enumerate(given)
        ]
        self._model_name = self._members[0].name  # in the engine's error messages
        self._generator: Generator | None = None
        self._where = whereabouts()
        # A warm cache may answer every row: the engine then starts at the first miss, and
        # a job served wholly from the cache starts none. Otherwise it starts now, while
        # the first batches are read. Ray wraps a failure here in an ActorDiedError;
        # run_job digs the message back out.
        caches = [m["cache"] for m in given]
        if not all(c is not None and c.warm and c.reads for c in caches):
            self._start_engine()

    def _start_engine(self) -> Generator:
        if self._generator is None:
            # vLLM is imported here, not before: seconds a job the cache answers never pays.
            self._params = SamplingParamsCache(self._sampling)
            self._generator = self.generator_class(self._model)
            atexit.register(_closing)  # after vLLM's own exit handlers: runs before them
            if self._progress is not None:
                for i, member in enumerate(self._members):
                    self._progress.engine_started.remote(member.name, count=i == 0)
        return self._generator

    def __del__(self) -> None:
        # End the engine's core process with the actor instead of orphaning it.
        _closing()
        generator = getattr(self, "_generator", None)
        if generator is not None:
            generator.shutdown()

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        started = time.monotonic()
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(_watch_engine(weakref.ref(self)))
        # Each model served here runs the batch at once, on the one engine.
        done = await asyncio.gather(*(self._run(m, batch) for m in self._members))
        out = batch
        for member, (results, key, given_up) in zip(self._members, done, strict=True):
            out = self._finish(member, batch, out, results, started, key, given_up=given_up)
        yield out

    async def _run(
        self, member: _Member, batch: pa.Table
    ) -> tuple[list[RowResult], str | None, bool]:
        """One model's results for a batch, its ledger key, and whether it was given up."""
        key = batch_key(batch, member.name) if self._progress is not None else None
        decision: dict[str, Any] = {}
        if key is not None:
            decision = await self._progress.begin_batch.remote(
                key,
                model=member.name,
                max_retries=self._max_retries,
                restart_limit=self._restart_limit,
            )
        if decision.get("broken"):
            raise EngineUnavailable(f"model {member.name or 'default'}: {decision['broken']}")
        if decision.get("give_up"):
            logger.warning("%s: %d rows", decision["give_up"], batch.num_rows)
            return given_up_results(batch, decision["give_up"]), key, True
        # A batch that was in the engine when it died may be what killed it: its retry runs
        # with nothing beside it, so another death is charged to it alone.
        alone = bool(decision.get("alone"))
        async with self._gate.hold(exclusive=alone):
            if key is not None:
                self._progress.enter_batch.remote(key, alone=alone)
            inputs = BatchInputs.from_table(
                batch,
                overrides_column=self._overrides_column,
                chat_template_kwargs=self._chat_template_kwargs,
                lora=member.lora,
            )
            live = inputs.live()
            if live is None:
                results = await self._generate(member, inputs)
            else:  # rows stopped at an earlier stage are not sent
                generated = await self._generate(member, inputs.take(live)) if live else []
                results = with_skipped(len(inputs), live, generated)
            if key is not None:
                # Before the next batch may enter alone: if that one kills the engine, this
                # actor ends before this batch's task does, and its report may die with it.
                await self._progress.batch_generated.remote(key)
        return results, key, False

    async def _generate(self, member: _Member, inputs: BatchInputs) -> list[RowResult]:
        """The batch's results: the cache's where it has them, the engine's for the rest."""
        cache = member.cache
        if cache is None:
            generator = self._start_engine()
            assert self._params is not None
            return await generator.generate(inputs, self._params, on_dead=_engine_died)
        lookup = cache.lookup(inputs)
        generated: list[RowResult] = []
        if lookup.misses:
            generator = self._start_engine()
            assert self._params is not None
            generated = await generator.generate(
                inputs.take(lookup.misses), self._params, on_dead=_engine_died
            )
        results = lookup.merge(generated)
        cache.store(lookup, results)
        return results

    def _finish(
        self,
        member: _Member,
        batch: pa.Table,
        out: pa.Table,
        results: list[RowResult],
        started: float,
        key: str | None,
        *,
        given_up: bool = False,
    ) -> pa.Table:
        """``out`` (``batch`` with the columns of the models before ``member``) with
        ``member``'s columns appended, and the batch reported to the tracker."""
        generator = self._generator
        appended, report = member.finisher.finish(
            out,
            results,
            dim=generator.dim if generator else None,
            labels=generator.labels if generator else None,
        )
        if self._progress is not None:
            report_batch(
                self._progress,
                report,
                model_name=member.name,
                engine={**self._where, **(generator.load.take() if generator else {})},
                seconds=time.monotonic() - started,
                key=key,
                given_up=given_up,
            )
        return appended


_CLOSING = False


def _closing() -> None:
    """The actor is ending on purpose: an engine that stops now is not a death."""
    global _CLOSING
    _CLOSING = True


async def _watch_engine(stage: weakref.ref[EngineStage]) -> None:
    """End the actor once its engine is dead. A request sent to an engine that has just
    died can wait forever instead of failing, so its failure alone cannot be relied on.
    Holds the stage weakly, so that releasing the stage still shuts its engine down."""
    while True:
        await asyncio.sleep(1.0)
        current = stage()
        if current is None or _CLOSING:
            return
        dead = current._generator is not None and current._generator.errored
        del current
        if dead and not _CLOSING:
            _engine_died(RuntimeError("the engine core process is gone"))


def _engine_died(cause: BaseException) -> None:
    """End this actor when its engine is dead: Ray restarts it with a new engine and retries
    its in-flight batches. Raising instead would fail the batch as an application error,
    which Ray does not retry, and leave an actor with no engine taking more batches."""
    logger.error(
        "the engine died (%s: %s); ending the actor for Ray to restart it",
        type(cause).__name__,
        cause,
    )
    logging.shutdown()
    os._exit(1)


class BatchGate:
    """Batches share the engine; an exclusive holder (a retried batch) runs alone."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._cond: asyncio.Condition | None = None  # made in the actor's event loop

    @contextlib.asynccontextmanager
    async def hold(self, *, exclusive: bool) -> AsyncIterator[None]:
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        async with cond:
            if exclusive:
                self._waiting_exclusive += 1
                try:
                    await cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                finally:
                    self._waiting_exclusive -= 1
                    cond.notify_all()  # shared waiters may go on if this one was cancelled
                self._exclusive = True
            else:
                await cond.wait_for(lambda: not self._exclusive and self._waiting_exclusive == 0)
                self._shared += 1
        try:
            yield
        finally:
            async with cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                cond.notify_all()
