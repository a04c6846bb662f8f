"""The response cache end to end on the real CPU engine: a rerun into a new folder is served
from the cache with the same texts and metrics and starts no engine; random sampling is
never served from it; a changed engine argument misses it; ``cache.mode: off`` neither
reads nor writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch.job.spec import JobSpec

pytestmark = pytest.mark.e2e

RANDOM = json.dumps({"temperature": 1.0})
SEEDED = json.dumps({"temperature": 1.0, "seed": 11})


def write_input(path: Path, *, random_rows: bool) -> None:
    """24 greedy rows (12 prompts twice), 6 seeded rows, and 6 unseeded ones if asked."""
    texts = [f"Describe item {i % 12}:" for i in range(24)] + [f"Name {i}:" for i in range(6)]
    overrides = [None] * 24 + [SEEDED] * 6
    if random_rows:
        texts += [f"Invent {i}:" for i in range(6)]
        overrides += [RANDOM] * 6
    pq.write_table(
        pa.table({"id": list(range(len(texts))), "text": texts, "overrides": overrides}), path
    )


def job(tmp_path: Path, tiny_model: Path, source: Path, out: str, **changes) -> JobSpec:
    body = {
        "name": "cached",
        "input": {"path": str(source)},
        "prompt": {"template": "{{ text }}"},
        "model": {
            "path": str(tiny_model),
            "engine": {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True},
            "batch_size": 8,
        },
        "sampling": {"max_tokens": 8, "overrides_column": "overrides", "logprobs": 2},
        "carryover": ["id"],
        "output": {"path": str(tmp_path / out)},
    }
    if "engine" in changes:
        body["model"]["engine"].update(changes.pop("engine"))  # type: ignore[index]
    body.update(changes)
    return JobSpec.from_dict(body)


def rows(folder: Path) -> list[dict]:
    table = pads.dataset(str(folder), format="parquet").to_table().sort_by("id")
    return table.drop_columns(["row_id"]).to_pylist()


def test_a_rerun_is_served_from_the_cache(tmp_path, tiny_model, ray_local, reference_engines):
    from vllm import SamplingParams

    from llm_batch.pipeline.run import run_job

    source = tmp_path / "in.parquet"
    write_input(source, random_rows=True)
    first = run_job(job(tmp_path, tiny_model, source, "first"))
    assert first.progress["rows_cached"] == 0
    assert first.progress["engine_starts"] == 1

    # The same rows again, into a new folder: every deterministic row from the cache, the
    # random ones generated (their engine starts at the first of them).
    second = run_job(job(tmp_path, tiny_model, source, "second"))
    assert second.progress["rows_cached"] == 30
    assert second.progress["engine_starts"] == 1
    a, b = rows(tmp_path / "first"), rows(tmp_path / "second")
    assert a[:30] == b[:30]  # texts, token counts, finish reasons and logprobs

    # Only the cached rows: no engine at all, and the same output and metrics.
    only = tmp_path / "only.parquet"
    write_input(only, random_rows=False)
    third = run_job(job(tmp_path, tiny_model, only, "third"))
    assert third.progress["rows_cached"] == 30
    assert third.progress["engine_starts"] == 0
    assert rows(tmp_path / "third") == a[:30]
    # The accumulators saw the same rows as generated ones (the random rows aside).
    usage = json.loads((tmp_path / "third" / "_metrics.json").read_text())["metrics"]["default"]
    assert usage["token_usage"]["rows"] == 30
    assert usage["token_usage"]["output_tokens"] == sum(r["num_output_tokens"] for r in a[:30])

    # Stored texts are the engine's: each equals raw vLLM's for its prompt.
    llm = reference_engines(tiny_model)
    for row in b[:30:5]:
        prompt = f"Describe item {row['id'] % 12}:" if row["id"] < 24 else f"Name {row['id'] - 24}:"
        params = SamplingParams(
            max_tokens=8,
            **({"temperature": 0.0} if row["id"] < 24 else {"temperature": 1.0, "seed": 11}),
        )
        expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
        assert row["generated_text"] == expected, row


def test_a_changed_engine_argument_or_cache_off_generates_again(
    tmp_path, tiny_model, ray_local, response_cache_of_its_own
):
    from llm_batch.pipeline import cache
    from llm_batch.pipeline.run import run_job

    source = tmp_path / "in.parquet"
    write_input(source, random_rows=False)
    run_job(job(tmp_path, tiny_model, source, "first"))
    stored = cache.info(str(response_cache_of_its_own))
    assert [s["entries"] for s in stored] == [18]  # 12 greedy prompts (twice each), 6 seeded

    # cache.mode off: generated again though the cache holds every row, and nothing stored.
    result = run_job(job(tmp_path, tiny_model, source, "off", cache={"mode": "off"}))
    assert result.progress["rows_cached"] == 0 and result.progress["engine_starts"] == 1
    assert cache.info(str(response_cache_of_its_own)) == stored

    # Another max_model_len: another namespace, nothing from the cache.
    result = run_job(job(tmp_path, tiny_model, source, "longer", engine={"max_model_len": 384}))
    assert result.progress["rows_cached"] == 0 and result.progress["engine_starts"] == 1
    assert len(cache.info(str(response_cache_of_its_own))) == 2
