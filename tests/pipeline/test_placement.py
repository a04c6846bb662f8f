"""Engine placement: GPUs per replica, placement groups, accelerator types, pool sizes."""

from __future__ import annotations

import functools

from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.placement import engine_batch_size, engine_map_kwargs, pg_scheduling


def model(**changes):
    base = {
        "input": {"path": "x.parquet"},
        "prompt": {"template": "{{ a }}"},
        "model": {"path": "m", **changes},
    }
    return JobSpec.from_dict(base).model.model_dump()


def test_cpu_cluster_runs_cpu_engines_on_one_logical_cpu():
    kw = engine_map_kwargs(model(), cluster_gpus=0)
    assert kw["num_gpus"] == 0 and kw["num_cpus"] == 1
    assert "resources" not in kw
    assert kw["compute"].min_size == kw["compute"].max_size == 1


def test_accelerator_type_means_gpus_even_before_gpu_nodes_are_up():
    kw = engine_map_kwargs(model(accelerator_type="H100"), cluster_gpus=0)
    assert kw["num_gpus"] == 1
    assert kw["resources"] == {"accelerator_type:H100": 0.001}
    cpu = engine_map_kwargs(model(accelerator_type="H100", device="cpu"), cluster_gpus=8)
    assert cpu["num_gpus"] == 0 and cpu["resources"] == {"accelerator_type:H100": 0.001}


def test_single_gpu_replica_holds_its_gpu():
    kw = engine_map_kwargs(model(replicas=4), cluster_gpus=8)
    assert kw["num_gpus"] == 1
    assert kw["compute"].min_size == kw["compute"].max_size == 4
    assert "ray_remote_args_fn" not in kw


def test_multi_gpu_replica_gets_a_strict_pack_placement_group():
    kw = engine_map_kwargs(
        model(
            engine={"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, accelerator_type="A100"
        ),
        cluster_gpus=8,
    )
    assert kw["num_gpus"] == 0  # the placement group holds the GPUs
    fn = kw["ray_remote_args_fn"]
    assert isinstance(fn, functools.partial) and fn.func is pg_scheduling
    bundles, strategy = fn.args
    assert strategy == "STRICT_PACK"
    assert bundles == [{"GPU": 1.0, "CPU": 1.0, "accelerator_type:A100": 0.001}] * 4
    assert kw["engine_overrides"] == {"distributed_executor_backend": "ray"}


def test_autoscaling_pool_and_strategy():
    kw = engine_map_kwargs(
        model(
            replicas={"min": 1, "max": 3},
            placement_strategy="SPREAD",
            engine={"tensor_parallel_size": 2},
        ),
        cluster_gpus=8,
    )
    assert (kw["compute"].min_size, kw["compute"].max_size) == (1, 3)
    assert kw["ray_remote_args_fn"].args[1] == "SPREAD"


def test_replica_range_must_be_ordered():
    import pytest

    from llm_batch.errors import JobSpecError

    with pytest.raises(JobSpecError, match="replicas.max=1 must be at least replicas.min=2"):
        model(replicas={"min": 2, "max": 1})


def test_batch_size_defaults_to_what_the_device_runs_at_once():
    # vLLM's offline max_num_seqs: 256 on the CPU engine, up to 1024 on a GPU.
    assert engine_batch_size(model(), cluster_gpus=0) == 256
    assert engine_batch_size(model(), cluster_gpus=8) == 1024
    assert engine_batch_size(model(accelerator_type="H100"), cluster_gpus=0) == 1024
    assert engine_batch_size(model(device="cpu"), cluster_gpus=8) == 256
    assert engine_batch_size(model(device="gpu"), cluster_gpus=0) == 1024
    # A batch size the job names is kept, on either device.
    assert engine_batch_size(model(batch_size=64), cluster_gpus=8) == 64
    assert engine_batch_size(model(batch_size=4096), cluster_gpus=0) == 4096


def test_one_batch_is_a_job_whose_rows_fit_in_every_models_batch(tmp_path, monkeypatch):
    """The engine host runs such a job as one task; a larger one as a driver would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm_batch.pipeline import run

    monkeypatch.setattr(run, "_cluster_gpus", lambda: 0.0)  # the CPU engine's batches
    pq.write_table(pa.table({"t": ["x"] * 40}), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text('{"t": "x"}\n' * 40)

    def job(path: str, **extra) -> JobSpec:
        return JobSpec.from_dict(
            {
                "input": {"path": str(tmp_path / path)},
                "prompt": {"template": "{{ t }}"},
                "model": {"path": "m", "batch_size": 64},
                "output": {"path": str(tmp_path / "out")},
                **extra,
            }
        )

    def one(spec: JobSpec) -> bool:
        return run.one_batch(spec, run.plan_job(spec))

    assert one(job("in.parquet"))
    assert not one(job("in.parquet", sampling={"n": 2}))  # 80 rows
    two_models = {
        "models": [{"name": "a", "path": "m"}, {"name": "b", "path": "m", "batch_size": 32}]
    }
    assert not one(job("in.parquet", **{"model": None, **two_models}))
    assert one(job("in.jsonl", sampling={"n": 4}))  # rows unknown: admitted by size
