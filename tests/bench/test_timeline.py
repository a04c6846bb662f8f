"""The steady-state window: the same rule for per-request and per-batch timelines."""

from __future__ import annotations

import pytest

from llm_batch.bench.timeline import cumulative, steady_state


def test_cumulative_sorts_and_merges_equal_times():
    assert cumulative([(2.0, 5), (1.0, 3), (2.0, 1)]) == [(1.0, 3), (2.0, 9)]


def test_uniform_completions_give_the_rate():
    # 100 requests of 10 tokens, one every 0.1 s: 100 tokens/s.
    events = [(i * 0.1, 10) for i in range(1, 101)]
    s = steady_state(events)
    assert s is not None
    assert s.tokens_per_second == pytest.approx(100.0)
    assert (s.start, s.end) == pytest.approx((1.0, 9.0))
    assert s.total_tokens == 1000
    assert s.events == 100


def test_slow_start_and_tail_are_outside_the_window():
    # Engine warm-up (first batch late) and a slow tail do not count.
    events = [(30.0, 100)] + [(30.0 + i, 100) for i in range(1, 9)] + [(60.0, 100)]
    s = steady_state(events)
    assert s is not None
    # Window: from the 10% event (t=30) to the first event at >= 90% (t=38).
    assert (s.start, s.end) == (30.0, 38.0)
    assert s.tokens_per_second == pytest.approx(800 / 8)


def test_coarse_batches_count_from_event_to_event():
    # Four batches of 256 rows × 64 tokens; the first batch is 25% > 10%.
    events = [(10.0, 16384), (14.0, 16384), (18.0, 16384), (22.0, 16384)]
    s = steady_state(events)
    assert s is not None
    assert (s.start, s.end) == (10.0, 22.0)
    assert s.tokens_per_second == pytest.approx(3 * 16384 / 12.0)


def test_unordered_events_are_fine():
    events = [(i * 0.1, 10) for i in range(1, 101)]
    assert steady_state(reversed(events)) == steady_state(events)


@pytest.mark.parametrize(
    "events",
    [
        [],
        [(1.0, 100)],
        [(1.0, 0), (2.0, 0)],
        [(1.0, 95), (2.0, 5)],  # one event carries the run past 90%
    ],
)
def test_no_rate_without_a_window(events):
    assert steady_state(events) is None


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="low"):
        steady_state([(1.0, 1), (2.0, 1)], low=0.9, high=0.1)


def test_raw_vllm_stamps_finished_requests_with_the_engine_steps_time():
    from types import SimpleNamespace as NS

    from llm_batch.bench.systems.raw_vllm import CompletionStamps

    def out(finish_reason):
        return NS(finish_reason=finish_reason)

    steps = iter(
        [
            NS(timestamp=5.0, outputs=[out(None), out(None)]),
            NS(timestamp=6.0, outputs=[out("length"), out(None), out("length")]),
            NS(timestamp=7.0, outputs=[]),
            NS(timestamp=8.0, outputs=[out("stop")]),
        ]
    )
    client = NS(get_output=lambda: next(steps))
    stamps = CompletionStamps(client)
    returned = [client.get_output() for _ in range(4)]
    # What LLM.generate reads is untouched; only steps that finished requests are noted,
    # at the engine's time for the step, not when the caller got round to reading it.
    assert [r.timestamp for r in returned] == [5.0, 6.0, 7.0, 8.0]
    assert stamps.times == [(6.0, 2), (8.0, 1)]
