"""The terminal's progress line: tokens per second for a generator, rows per second for a
job that generates none (a pooling model's)."""

from __future__ import annotations

import io

from llm_batch.cli.terminal import ProgressView


def line(snap: dict) -> str:
    out = io.StringIO()
    with ProgressView("job", plain_every=0, stream=out) as view:
        view.update(snap)
    return out.getvalue().strip()


def test_a_generators_line_says_tokens_and_an_embedders_rows():
    base = {"rows_done": 10, "rows_total": 20}
    generating = {**base, "output_tokens": 80, "output_tokens_per_second": 41.5,
                  "rows_per_second": 5.0, "rows_failed": 1}  # fmt: skip
    assert line(generating) == "job: 10/20 rows, 41.5 tok/s, 1 failed"
    embedding = {**base, "output_tokens": 0, "output_tokens_per_second": 0.0,
                 "rows_per_second": 1250.0, "rows_failed": 0}  # fmt: skip
    assert line(embedding) == "job: 10/20 rows, 1250.0 rows/s, 0 failed"
