"""Regression guard (issue 6, item 3): the pipeline's steady throughput against raw vLLM.

A quick variant of ``llm-batch bench``: raw vLLM and llm-batch, one after the
other in one invocation on the same machine, so machine noise mostly cancels
in the ratio. It fails only on a gross regression (below half of raw vLLM's
steady output tokens/s); the full benchmark is not a timed test.

It runs the pipeline as users get it (its default batch size, vLLM's default
``max_num_seqs``) on the shape of the README's workload (64 prompt and 64
output tokens a row), on input files of exactly one batch each: sixteen full
batches, about twenty seconds of generation, so that one stall on a shared
machine does not decide the ratio. Fewer rows (a few hundred) would leave two
batches and no steady window. Shorter rows (32 and 32) put per-batch costs
ahead of generation: there the ratio sat at 0.55-0.66x, too close to the floor
for a guard that should fail only on a gross regression. Engine start-up, not
generation, is most of each attempt's minute and a half.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_batch.bench.harness import BenchConfig, failures, run_bench
from llm_batch.bench.workload import WorkloadSpec
from llm_batch.pipeline.placement import CPU_BATCH_SIZE

pytestmark = pytest.mark.e2e

BATCH_SIZE = CPU_BATCH_SIZE  # the pipeline's default on these machines
ROWS = 16 * BATCH_SIZE
PROMPT_TOKENS = OUTPUT_TOKENS = 64  # the shape of the README's workload
FLOOR = 0.5
# The machine is shared: a stall of a few seconds in one system's window can
# halve its rate, and raw vLLM alone swings from 22k to 30k tok/s between two
# runs minutes apart (0.82x and 0.56x here). A real regression fails every
# attempt; noise rarely three times.
ATTEMPTS = 3


def _summary(report: dict) -> str:
    keys = ("wall_s", "engine_start_s", "steady_tokens_per_s")
    return json.dumps(
        {
            name: {**{k: s.get(k) for k in keys}, "load": s["load_average"]["after"][0]}
            for name, s in report["systems"].items()
        }
    )


@pytest.mark.timeout(900)
def test_steady_throughput_is_at_least_half_of_raw_vllm(tmp_path: Path, tiny_model: Path):
    seen = []
    for attempt in range(1, ATTEMPTS + 1):
        config = BenchConfig(
            workload=WorkloadSpec(
                rows=ROWS,
                prompt_tokens=PROMPT_TOKENS,
                output_tokens=OUTPUT_TOKENS,
                rows_per_file=BATCH_SIZE,
            ),
            systems=["raw", "llm-batch"],
            model=str(tiny_model),
            out=str(tmp_path / f"bench-{attempt}"),
            batch_size=BATCH_SIZE,
            timeout=400,
        )
        report = run_bench(config)
        assert not failures(report), failures(report)
        raw, ours = report["systems"]["raw"], report["systems"]["llm-batch"]
        assert raw["steady_tokens_per_s"] and ours["steady_tokens_per_s"], _summary(report)
        ratio = report["ratios"]["llm-batch/raw"]["steady_tokens_per_s"]
        seen.append(f"attempt {attempt}: {ratio:.2f}× {_summary(report)}")
        print(seen[-1])  # shown with -rA: the margin, even when it passes
        if ratio >= FLOOR:
            return
    pytest.fail(
        f"llm-batch's steady throughput is below {FLOOR}× raw vLLM's in {ATTEMPTS} attempts: "
        + "; ".join(seen)
        + f"; reports in {tmp_path}"
    )
