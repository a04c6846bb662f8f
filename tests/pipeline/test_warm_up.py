"""The CPU engine's warm-up step (``Generator._ready`` and ``_warm_up``) with a stand-in
engine: the gate's logic only. The real engine's side, a fresh engine given one-word
prompts first: ``test_engine_start_e2e.py`` (decision 0018)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from llm_batch.pipeline.generation import WARM_UP_TOKENS, EngineLoad, Generator

TOKENS = [11, 12, 13, 14, 15, 16, 17]  # what the stand-in tokenizer gives any text


class StandInEngine:
    """Records each request; answers once ``release`` is set, recording a time to first
    token as vLLM's stat logger would."""

    def __init__(self, load: EngineLoad, *, max_model_len: int = 512, fails: bool = False):
        self.model_config = SimpleNamespace(max_model_len=max_model_len)
        self.load = load
        self.fails = fails
        self.calls: list[tuple[str, dict[str, Any], Any, str]] = []
        self.release = asyncio.Event()

    async def _answer(self) -> AsyncIterator[str]:
        await self.release.wait()
        if self.fails:
            raise RuntimeError("EngineCore encountered an issue")
        self.load._ttft.append(0.25)
        yield "output"

    def generate(self, prompt: dict[str, Any], params: Any, request_id: str) -> Any:
        self.calls.append(("generate", prompt, params, request_id))
        return self._answer()

    def encode(self, prompt: dict[str, Any], params: Any, request_id: str) -> Any:
        self.calls.append(("encode", prompt, params, request_id))
        return self._answer()


def stand_in(*, pooling: Any = None, **engine: Any) -> tuple[Generator, StandInEngine]:
    gen = Generator.__new__(Generator)  # no vLLM engine: the gate's attributes only
    gen.load = EngineLoad()
    gen.engine = StandInEngine(gen.load, **engine)
    gen._tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: list(TOKENS))
    gen._engine_prompt = lambda ids, text, messages: {"prompt_token_ids": list(ids)}  # type: ignore[method-assign]
    gen._pooling = pooling
    gen._warm, gen._warming = False, None
    return gen, gen.engine  # type: ignore[return-value]


def test_first_callers_share_one_step_and_a_cancelled_one_stops_nothing():
    async def scenario() -> None:
        gen, engine = stand_in()
        callers = [asyncio.create_task(gen._ready()) for _ in range(4)]
        while not engine.calls:
            await asyncio.sleep(0)
        callers[0].cancel()
        await asyncio.sleep(0)
        assert not any(c.done() for c in callers[1:])  # all wait for the one step
        engine.release.set()
        results = await asyncio.gather(*callers, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert results[1:] == [None, None, None]
        ((kind, prompt, params, request_id),) = engine.calls
        assert kind == "generate" and params.max_tokens == 1
        assert prompt["prompt_token_ids"] == (TOKENS * WARM_UP_TOKENS)[:WARM_UP_TOKENS]
        assert request_id.startswith("llm-batch-warm-up-")
        # Once warm, no step again; the step's time to first token is no job's.
        await gen._ready()
        assert len(engine.calls) == 1
        assert gen.load.take()["ttft_count"] == 0

    asyncio.run(scenario())


def test_a_failed_step_is_logged_and_the_rows_go_on(caplog):
    async def scenario() -> None:
        gen, engine = stand_in(fails=True)
        engine.release.set()
        await gen._ready()
        assert gen._warm and len(engine.calls) == 1

    asyncio.run(scenario())
    assert "warm-up step failed" in caplog.text


def test_a_short_context_gets_a_shorter_step_and_a_pooling_engine_encodes():
    async def scenario() -> None:
        pooling = object()
        gen, engine = stand_in(pooling=pooling, max_model_len=9)
        engine.release.set()
        await gen._ready()
        ((kind, prompt, params, _),) = engine.calls
        assert kind == "encode" and params is pooling
        assert prompt["prompt_token_ids"] == TOKENS + TOKENS[:1]  # max_model_len - 1

    asyncio.run(scenario())
