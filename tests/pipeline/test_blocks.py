"""The blocks the first engine pool is handed, on the real Ray Data.

An engine call ends when the last batch of its block does, so blocks must be one
engine batch each (see ``input_dataset``); and the cut must stay fused into the
read-and-render task, or every carried column is copied once more. A Ray upgrade
that changed either would pass every output check and only show in the benchmark.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_batch import columns
from llm_batch.job.spec import JobSpec

pytestmark = pytest.mark.e2e

BATCH = 64  # rows per engine batch: 32 prompts × 2 samples


def test_blocks_are_one_batch_each_cut_inside_the_read_task(
    tmp_path: Path, tiny_model: Path, ray_local: None
):
    import ray

    from llm_batch.pipeline.run import input_dataset, plan_job

    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {"a.parquet": 300, "b.parquet": 130}
    for name, rows in sizes.items():
        table = pa.table({"text": [f"{name} row {i}" for i in range(rows)]})
        pq.write_table(table, folder / name, row_group_size=100)  # read tasks of ≤100 rows
    spec = JobSpec.from_dict(
        {
            "name": "blocks",
            "input": {"path": str(folder), "format": "parquet"},
            "prompt": {"template": "{{ text }}"},
            "model": {"path": str(tiny_model), "batch_size": BATCH},
            "sampling": {"max_tokens": 1, "n": 2},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    ds = input_dataset(spec, plan_job(spec), rows_per_block=BATCH).materialize()

    blocks = [
        ray.get(ref) for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs
    ]
    # Each read task (a row group: 100 prompts, 200 rows; or the last, 30 and 60) gives
    # full blocks and at most one short one at its end: 64, 64, 64, 8; and 60.
    groups = [100, 100, 100, 100, 30]
    expected = sorted(
        size
        for prompts in groups
        for size in [BATCH] * (2 * prompts // BATCH) + [2 * prompts % BATCH]
        if size
    )
    assert sorted(b.num_rows for b in blocks) == expected
    # Every row, each prompt's two samples side by side in one block.
    ids = [i for b in blocks for i in b.column(columns.ROW_ID).to_pylist()]
    assert len(ids) == 2 * sum(sizes.values()) and len(set(ids)) == sum(sizes.values())
    for b in blocks:
        pairs = b.column(columns.ROW_ID).to_pylist()
        assert pairs[0::2] == pairs[1::2]
        assert b.column(columns.SAMPLE_INDEX).to_pylist() == [0, 1] * (b.num_rows // 2)
    # One fused operator: no task or copy of the cut's own.
    assert "ReadInput->MapBatches(_render_batch)->StreamingRepartition" in ds.stats()


def test_a_small_jobs_read_render_pool_call_and_write_are_one_task(
    tmp_path: Path, tiny_model: Path, ray_local: None
):
    """The engine host's small jobs (``task_cpus`` set): every operator fused into one
    task, so a ten-row job waits for one scheduling round, not one per operator, and
    writes one file. The pool call is stood in for by a pass-through with its resources."""
    from llm_batch.pipeline.run import (
        _pool_stage_resources,
        _write,
        claim_output,
        input_dataset,
        plan_job,
    )

    source = tmp_path / "small.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10)]}), source)
    spec = JobSpec.from_dict(
        {
            "name": "small",
            "input": {"path": str(source), "format": "parquet"},
            "prompt": {"template": "{{ text }}"},
            "model": {"path": str(tiny_model)},
            "output": {"path": str(tmp_path / "out"), "rows_per_file": 4},
        }
    )
    run = claim_output(spec)
    ds = input_dataset(spec, plan_job(spec), rows_per_block=BATCH, task_cpus=0.0)
    ds.context.checkpoint_config = run.checkpoint_config()  # as run_job writes
    ds = ds.map_batches(
        lambda batch: batch,
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        **_pool_stage_resources(4, 0.0),
    )
    _write(ds, spec, run, task_cpus=0.0)

    stats = ds._write_ds.stats()
    assert "ReadInput->MapBatches(_render_batch)->MapBatches(<lambda>)->Write" in stats
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) == 1 and pq.read_table(parts[0]).num_rows == 10
