"""Paths in a submitted job become absolute: jobs run in Ray's working directories."""

from __future__ import annotations

from llm_batch.job.paths import absolute_paths


def test_local_paths_become_absolute(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    job = {
        "input": {"path": "data/in.parquet"},
        "output": {"path": "out/x", "rows_per_file": 5},
        "model": {"path": "models/m"},
    }
    got = absolute_paths(job, tmp_path)
    assert got["input"] == {"path": str(tmp_path / "data" / "in.parquet")}
    assert got["output"] == {"path": str(tmp_path / "out" / "x"), "rows_per_file": 5}
    assert got["model"] == {"path": str(tmp_path / "models" / "m")}
    assert job["input"]["path"] == "data/in.parquet"  # the caller's mapping is not changed


def test_uris_hub_ids_and_absolute_paths_are_kept(tmp_path):
    job = {
        "input": {"path": "s3://bucket/in.parquet"},
        "models": [{"name": "a", "path": "org/model"}, {"name": "b", "path": "/abs/m"}],
    }
    assert absolute_paths(job, tmp_path) == job


def test_malformed_blocks_are_left_for_validation(tmp_path):
    job = {"input": "in.parquet", "model": 3}
    assert absolute_paths(job, tmp_path) == job
    assert absolute_paths({}, tmp_path) == {}
