"""A pool's fair share (``EnginePool.priority``): what a job has had counts from when its
batch enters the engine. The engine is a stand-in that records each batch's vLLM priority
and answers when told: the ranking is pure logic; the real engine's priority scheduling is
exercised by ``tests/service/test_pools_e2e.py``."""

from __future__ import annotations

import asyncio
from typing import Any

from llm_batch.job.spec import SamplingSpec
from llm_batch.pipeline.generation import BatchInputs, RowResult
from llm_batch.pipeline.pool import EnginePool

SAMPLING = SamplingSpec(max_tokens=64).model_dump()


class HeldEngine:
    """Records (job, priority) per batch; a batch is answered when its event is set, with
    ``tokens`` output tokens per row."""

    def __init__(self, model: dict[str, Any], shared: bool = False):
        self.errored = False
        self.entered: list[tuple[str, int]] = []
        self.release: dict[tuple[str, int], asyncio.Event] = {}
        self.tokens = 64
        self.jobs: dict[str, int] = {}
        self.load = type("Load", (), {"take": staticmethod(dict), "running": 0, "waiting": 0})()
        self.dim = self.labels = None

    async def generate(self, inputs: BatchInputs, params: Any, *, job: str, priority: int,
                       on_dead: Any) -> list[RowResult]:  # fmt: skip
        key = (job, len([1 for j, _ in self.entered if j == job]))
        self.entered.append((job, priority))
        event = self.release.setdefault(key, asyncio.Event())
        await event.wait()
        return [RowResult(text="x", output_tokens=self.tokens)] * len(inputs)

    async def abort(self, job: str) -> int:
        return 0


def batch(rows: int) -> BatchInputs:
    return BatchInputs(
        prompts=["p"] * rows,
        messages=[None] * rows,
        render_errors=[None] * rows,
        samples=[0] * rows,
        overrides=[None] * rows,
    )


def pool() -> tuple[EnginePool, HeldEngine]:
    cls = type("HeldPool", (EnginePool,), {"generator_class": HeldEngine})
    p = cls({"task": "generate"})
    return p, p.generator  # type: ignore[return-value]


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_jobs_queued_batches_rank_behind_a_job_that_arrives_after_them() -> None:
    async def scenario() -> None:
        p, engine = pool()
        big = {"key": "big", "name": "big", "priority": 0}
        small = {"key": "small", "name": "small", "priority": 0}
        calls = [asyncio.ensure_future(p.generate(None, batch(256), SAMPLING, big, False))
                 for _ in range(3)]  # fmt: skip
        await settle()
        # 256 rows × 64 tokens = 16 steps of 1024 tokens each, charged on entry: the big
        # job's batches rank in the order they entered, its first at 0.
        assert [pr for _, pr in engine.entered] == [0, 16, 32]
        calls.append(asyncio.ensure_future(p.generate(None, batch(10), SAMPLING, small, False)))
        await settle()
        assert engine.entered[-1] == ("small", 0)  # before the big job's queued batches
        # Answered with fewer tokens than charged (rows that ended early): the job has had
        # what was generated, not what was charged.
        engine.tokens = 8
        for event in engine.release.values():
            event.set()
        await asyncio.gather(*calls)
        assert p.served == {"big": 3 * 256 * 8, "small": 10 * 8}
        # A job's priority still comes first.
        urgent = {"key": "urgent", "name": "urgent", "priority": 1}
        engine.release[("urgent", 0)] = asyncio.Event()
        engine.release[("urgent", 0)].set()
        await p.generate(None, batch(256), SAMPLING, urgent, False)
        assert engine.entered[-1] == ("urgent", -(1 << 20))

    asyncio.run(scenario())


def test_a_failed_batch_leaves_no_charge() -> None:
    async def scenario() -> None:
        p, engine = pool()

        async def fail(*args: Any, **kwargs: Any) -> list[RowResult]:
            raise RuntimeError("engine gone")

        engine.generate = fail  # type: ignore[method-assign]
        job = {"key": "j", "name": "j", "priority": 0}
        try:
            await p.generate(None, batch(256), SAMPLING, job, False)
        except RuntimeError:
            pass
        else:
            raise AssertionError("the engine's failure was swallowed")
        assert p.served == {"j": 0}

    asyncio.run(scenario())


def test_jobs_done_here_are_forgotten_with_what_they_had() -> None:
    async def scenario() -> None:
        p, engine = pool()
        for key in ("done", "running"):
            engine.release[(key, 0)] = asyncio.Event()
            engine.release[(key, 0)].set()
            await p.generate(None, batch(4), SAMPLING, {"key": key, "priority": 0}, False)
        engine.jobs = {"running": 4}  # requests of its next batch in the engine
        p._forget_jobs()
        assert set(p.served) == {"done", "running"}  # not idle for long yet
        for job in p.jobs.values():
            job["seen"] -= 61
        p._forget_jobs()
        assert set(p.served) == set(p.jobs) == {"running"}

    asyncio.run(scenario())
