"""The tracker's batch ledger and the engine stage's gate: the bookkeeping behind retries."""

from __future__ import annotations

import asyncio

from llm_batch.pipeline.engine import BatchGate
from llm_batch.pipeline.progress import BatchLedger, ProgressTracker

KEY, OTHER = "00" * 12, "11" * 12


def begin(ledger: BatchLedger, key: str = KEY, *, retries: int = 2, limit: int = 100) -> dict:
    return ledger.begin(key, model=None, max_retries=retries, restart_limit=limit)


def test_a_first_attempt_runs_shared_and_a_retry_alone():
    ledger = BatchLedger()
    assert begin(ledger) == {"alone": False}
    ledger.enter(KEY, alone=False)
    # The engine died with the batch in it: the retry runs alone.
    assert begin(ledger) == {"alone": True}


def test_only_deaths_alone_count_toward_giving_up():
    ledger = BatchLedger()
    for _ in range(5):  # killed beside other batches, five times: never its fault alone
        assert "give_up" not in begin(ledger, retries=0)
        ledger.enter(KEY, alone=False)
    assert begin(ledger, retries=0) == {"alone": True}
    ledger.enter(KEY, alone=True)
    decision = begin(ledger, retries=0)
    assert (
        "6 times" in decision["give_up"] and "1 of them with the batch alone" in decision["give_up"]
    )


def test_giving_up_is_sticky_and_counted_once():
    ledger = BatchLedger()
    ledger.enter(KEY, alone=False)
    for _ in range(2):
        assert begin(ledger, retries=2)["alone"]
        ledger.enter(KEY, alone=True)
    assert "give_up" in begin(ledger, retries=2)
    assert ledger.finish(KEY, model=None, given_up=True)
    # A re-run of its task (another batch's engine died) gives it up again at once ...
    assert "give_up" in begin(ledger, retries=2)
    # ... and its second report is not counted.
    assert not ledger.finish(KEY, model=None, given_up=True)


def test_a_batch_generated_before_is_never_given_up_when_its_task_runs_again():
    ledger = BatchLedger()
    ledger.enter(KEY, alone=False)  # in an engine a poison batch killed
    assert begin(ledger, retries=1) == {"alone": True}
    ledger.enter(KEY, alone=True)
    ledger.generated(KEY)  # its results are out; its report dies with the actor
    # The next batch killed the engine before this batch's task ended, twice: the re-runs
    # of its task keep running it.
    for _ in range(2):
        decision = begin(ledger, retries=1)
        assert "give_up" not in decision
        ledger.enter(KEY, alone=True)
    assert "give_up" not in begin(ledger, retries=1)
    assert ledger.finish(KEY, model=None, given_up=False)  # counted once
    assert not ledger.finish(KEY, model=None, given_up=False)


def test_a_lost_replica_counts_one_engine_start_however_many_batches_saw_it_go():
    ledger = BatchLedger()
    for _ in range(4):  # four batches were in the replica
        ledger.engine_started(None, replacing="replica-a")
    ledger.engine_started(None, replacing="replica-b")
    ledger.engine_started(None)  # a job-local engine: each start is its own
    assert ledger.starts == 3
    assert begin(ledger, limit=3) == {"alone": False}
    ledger.engine_started(None, replacing="replica-c")
    assert "broken" in begin(ledger, limit=3)


def test_a_batch_reported_twice_counts_once_in_progress():
    tracker = ProgressTracker(10)
    report = dict(model=None, rows=10, failed=0, input_tokens=5, output_tokens=7, seconds=0.1)
    tracker.report(**report, batch_key=KEY)
    tracker.report(**report, batch_key=KEY)  # its task was re-run after an engine died
    tracker.report(**report, batch_key=OTHER)
    snap = tracker.snapshot()
    assert snap["rows_done"] == 20
    assert snap["output_tokens"] == 14


def test_engines_restarting_without_progress_break_the_job():
    ledger = BatchLedger()
    for _ in range(4):
        ledger.engine_started(None)
    assert "broken" not in begin(ledger, limit=4)
    ledger.engine_started(None)
    assert "5 times without completing a batch" in begin(ledger, limit=4)["broken"]
    # A completed batch resets the count; a given-up one does not.
    ledger.finish(OTHER, model=None, given_up=False)
    assert "broken" not in begin(ledger, limit=4)
    for _ in range(5):
        ledger.engine_started(None)
    ledger.finish("22" * 12, model=None, given_up=True)
    assert "broken" in begin(ledger, limit=4)
    # Nor one the response cache answered wholly: it shows nothing of the engine.
    ledger.finish("33" * 12, model=None, given_up=False, engine_used=False)
    assert "broken" in begin(ledger, limit=4)


def test_two_poison_batches_back_to_back_do_not_break_the_job():
    # What a CI run met: with max_batch_retries=1 two poison batches each died beside
    # another batch and then alone, while the sound batches were not yet handed to the
    # restarted actors. Four deaths, five starts, nothing completed: not a broken pool.
    ledger, retries = BatchLedger(), 1
    limit = BatchLedger.restart_limit(1, retries)
    first, second, sound = "22" * 12, "33" * 12, "44" * 12

    def run(key: str, *, dies: bool) -> dict:
        decision = ledger.begin(key, model=None, max_retries=retries, restart_limit=limit)
        if "alone" in decision:
            ledger.enter(key, alone=decision["alone"])
            if dies:
                ledger.engine_started(None)
            else:
                ledger.finish(key, model=None, given_up=False)
        return decision

    ledger.engine_started(None)
    for poison in (first, second):
        assert run(poison, dies=True) == {"alone": False}
        assert run(poison, dies=True) == {"alone": True}
    assert "give_up" in run(first, dies=False)
    assert "give_up" in run(second, dies=False)
    assert run(sound, dies=False) == {"alone": False}


def test_the_restart_limit_covers_as_many_poison_batches_as_an_engine_holds():
    # Four batches in flight, all poison, max_batch_retries=1: one death beside each
    # other, then each alone; the sound batches behind them are not yet handed out.
    ledger, retries = BatchLedger(), 1
    limit = BatchLedger.restart_limit(1, retries, 4)
    poison = [f"{n:024x}" for n in range(1, 5)]
    ledger.engine_started(None)
    for key in poison:
        assert begin(ledger, key, retries=retries, limit=limit) == {"alone": False}
        ledger.enter(key, alone=False)
    ledger.engine_started(None)  # the one death they shared
    for key in poison:
        assert begin(ledger, key, retries=retries, limit=limit) == {"alone": True}
        ledger.enter(key, alone=True)
        ledger.engine_started(None)  # it died alone
    for key in poison:
        assert "give_up" in begin(ledger, key, retries=retries, limit=limit)
        ledger.finish(key, model=None, given_up=True)
    assert begin(ledger, "55" * 12, retries=retries, limit=limit) == {"alone": False}
    # With room for two only, the same run would have been called broken.
    assert "broken" in begin(
        ledger, "66" * 12, retries=retries, limit=BatchLedger.restart_limit(1, retries)
    )


def test_an_engine_that_dies_on_every_batch_breaks_the_job_within_the_limit():
    ledger, retries = BatchLedger(), 1
    limit = BatchLedger.restart_limit(1, retries)
    ledger.engine_started(None)
    broken_after = None
    for n in range(1, 50):
        key = f"{n:024x}"
        while True:
            decision = ledger.begin(key, model=None, max_retries=retries, restart_limit=limit)
            if "broken" in decision:
                broken_after = ledger._starts[None]
                break
            if "give_up" in decision:
                ledger.finish(key, model=None, given_up=True)
                break
            ledger.enter(key, alone=decision["alone"])
            ledger.engine_started(None)  # it died
        if broken_after:
            break
    assert broken_after == limit + 1


def test_gate_runs_an_exclusive_holder_alone():
    async def scenario() -> list[str]:
        gate, log = BatchGate(), []

        async def shared(name: str, hold: float) -> None:
            async with gate.hold(exclusive=False):
                log.append(f"+{name}")
                await asyncio.sleep(hold)
                log.append(f"-{name}")

        async def exclusive() -> None:
            async with gate.hold(exclusive=True):
                log.append("+X")
                await asyncio.sleep(0.02)
                log.append("-X")

        first = asyncio.ensure_future(shared("a", 0.05))
        await asyncio.sleep(0.01)
        alone = asyncio.ensure_future(exclusive())
        await asyncio.sleep(0.01)
        later = asyncio.ensure_future(shared("b", 0.01))  # waits behind the exclusive one
        await asyncio.gather(first, alone, later)
        return log

    assert asyncio.run(scenario()) == ["+a", "-a", "+X", "-X", "+b", "-b"]


def test_gate_lets_shared_holders_on_when_an_exclusive_waiter_is_cancelled():
    async def scenario() -> bool:
        gate = BatchGate()
        release = asyncio.Event()

        async def shared_until_released() -> None:
            async with gate.hold(exclusive=False):
                await release.wait()

        async def exclusive() -> None:
            async with gate.hold(exclusive=True):
                pass

        holder = asyncio.ensure_future(shared_until_released())
        await asyncio.sleep(0.01)
        waiter = asyncio.ensure_future(exclusive())
        await asyncio.sleep(0.01)
        blocked = asyncio.ensure_future(shared_until_released())
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.sleep(0.01)
        entered = gate._shared == 2  # the second shared holder got in
        release.set()
        await asyncio.gather(holder, blocked, return_exceptions=True)
        return entered

    assert asyncio.run(scenario())


def reported(monkeypatch, *, batches: int, every: float, rows: int, tokens: int) -> ProgressTracker:
    """A tracker that got ``batches`` reports of ``rows`` rows and ``tokens`` output tokens,
    one every ``every`` seconds of a stand-in clock."""
    clock = [1000.0]
    monkeypatch.setattr("llm_batch.pipeline.progress.time.time", lambda: clock[0])
    tracker = ProgressTracker(batches * rows)
    for i in range(batches):
        clock[0] += every
        tracker.report(
            model=None,
            rows=rows,
            failed=0,
            input_tokens=rows,
            output_tokens=tokens,
            seconds=every,
            batch_key=f"{i:024x}",
        )
    return tracker


def test_a_short_jobs_series_keeps_a_point_per_batch(monkeypatch):
    """A job of a few seconds: each report its own point, at its time, so the steady rate
    taken from the series (10 % to 90 % of the tokens) leaves out the first and the last
    batch, as it does for raw vLLM's per-step timeline."""
    # A batch every 0.5 s for 6 s.
    snapshot = reported(monkeypatch, batches=12, every=0.5, rows=10, tokens=640).snapshot()
    assert [(p["t"], p["output_tokens"]) for p in snapshot["series"]] == [
        (0.5 * (i + 1), 640 * (i + 1)) for i in range(12)
    ]
    assert snapshot["output_tokens_per_second"] == 1280.0


def test_the_series_merges_reports_closer_than_its_interval_and_coarsens_as_it_grows(
    monkeypatch,
):
    # A batch every 0.04 s for 40 s.
    tracker = reported(monkeypatch, batches=1000, every=0.04, rows=1, tokens=2)
    series = tracker.snapshot()["series"]
    times = [p["t"] for p in series]
    # Points no closer than the first interval (0.1 s), each the count at its time: not
    # one point that every report moved along; at most about 120 of them.
    assert 40 <= len(series) <= 121
    assert all(b - a >= 0.1 - 1e-6 for a, b in zip(times, times[1:], strict=False))
    assert series[-1] == {"t": 40.0, "rows_done": 1000, "output_tokens": 2000}
    assert all(p["output_tokens"] == round(p["t"] / 0.04) * 2 for p in series)
