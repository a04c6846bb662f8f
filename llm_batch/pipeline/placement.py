"""Where engine replicas run: GPUs per replica, placement groups, accelerator types, pool size.

- A replica asks for ``tensor_parallel_size × pipeline_parallel_size`` GPUs.
  One GPU: the actor itself holds it. More: each actor gets its own placement
  group, one bundle per GPU (``STRICT_PACK`` by default, so one node), and vLLM's
  Ray executor places its workers in those bundles.
- ``accelerator_type: H100`` adds Ray's ``accelerator_type:H100`` resource to the
  request, so engines land only on nodes that declare it.
- On a cluster without GPUs (these CPU machines) a replica runs the CPU engine
  and holds one logical CPU.
- ``replicas`` is a fixed pool size or ``{min, max}`` for an autoscaling pool.
- A ``batch_size`` left unset follows the device: 256 rows on the CPU engine,
  1024 on GPUs (``engine_batch_size``).

Reading, rendering and writing are plain Ray Data tasks that ask for no GPU,
so they never take an engine's slot.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "CPU_BATCH_SIZE",
    "GPU_BATCH_SIZE",
    "default_batch_size",
    "engine_batch_size",
    "engine_map_kwargs",
    "on_gpu",
    "pg_scheduling",
    "gpus_of",
    "resources_of",
    "pool_options",
]

# Ray's convention: a tiny amount of the accelerator resource pins the actor to
# nodes that have it without counting against it.
_ACCELERATOR_SHARE = 0.001

# Rows per engine batch when the job leaves batch_size unset. With two batches in flight
# the engine's queue holds two batches, which must cover the sequences it runs at once:
# vLLM's offline default max_num_seqs is 256 on the CPU engine and up to 1024 on a GPU.
# On 2 CPU cores, 1024 measured no better than 256 (README, Performance); on a large GPU,
# 2 x 256 would leave half its sequences idle.
CPU_BATCH_SIZE = 256
GPU_BATCH_SIZE = 1024


def on_gpu(model: dict[str, Any], *, cluster_gpus: float) -> bool:
    """Whether a model's engines run on GPUs (else the CPU engine)."""
    device = model.get("device", "auto")
    # An accelerator type means GPUs, even while an autoscaling group has none up yet.
    return device == "gpu" or (
        device == "auto" and (cluster_gpus >= 1 or model.get("accelerator_type") is not None)
    )


def default_batch_size(*, gpu: bool) -> int:
    """Rows per engine batch when the job names none."""
    return GPU_BATCH_SIZE if gpu else CPU_BATCH_SIZE


def engine_batch_size(model: dict[str, Any], *, cluster_gpus: float) -> int:
    """Rows per engine batch: the job's ``batch_size``, or the default for its device."""
    if model.get("batch_size") is not None:
        return int(model["batch_size"])
    return default_batch_size(gpu=on_gpu(model, cluster_gpus=cluster_gpus))


def pg_scheduling(bundles: list[dict[str, float]], strategy: str) -> dict[str, Any]:
    """``ray_remote_args_fn`` body: a new placement group for each engine actor."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = ray.util.placement_group(bundles, strategy=strategy)
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True
        )
    }


def engine_map_kwargs(model: dict[str, Any], *, cluster_gpus: float) -> dict[str, Any]:
    """``map_batches`` keyword arguments placing one model's engine pool.

    ``model`` is the job spec's plain ``model`` block; ``cluster_gpus`` is what
    the cluster has (0 on a CPU machine). Returns ``compute``, resources and,
    for multi-GPU replicas, ``ray_remote_args_fn`` plus the engine-argument
    overrides the engine needs (``engine_overrides``, applied by the caller).
    """
    from ray.data import ActorPoolStrategy

    engine = model["engine"]
    gpus = engine["tensor_parallel_size"] * engine["pipeline_parallel_size"]
    accel = model.get("accelerator_type")

    replicas = model["replicas"]
    if isinstance(replicas, dict):
        size = {"min_size": replicas["min"], "max_size": replicas["max"]}
    else:
        size = {"size": replicas}
    compute = ActorPoolStrategy(
        **size, max_concurrent_calls_per_actor=model["max_batches_in_flight"]
    )
    out: dict[str, Any] = {"compute": compute, "engine_overrides": {}}
    resources = {f"accelerator_type:{accel}": _ACCELERATOR_SHARE} if accel else {}

    if not on_gpu(model, cluster_gpus=cluster_gpus):
        out.update(num_cpus=1, num_gpus=0)
        if resources:
            out["resources"] = resources
        return out
    if gpus == 1:
        out.update(num_cpus=1, num_gpus=1)
        if resources:
            out["resources"] = resources
        return out
    # Several GPUs per replica: the actor reserves nothing itself; its placement
    # group holds the GPUs and vLLM's Ray executor puts one worker per bundle.
    bundle = {"GPU": 1.0, "CPU": 1.0, **resources}
    out.update(
        num_cpus=0,
        num_gpus=0,
        ray_remote_args_fn=functools.partial(
            pg_scheduling, [dict(bundle) for _ in range(gpus)], model["placement_strategy"]
        ),
    )
    out["engine_overrides"] = {"distributed_executor_backend": "ray"}
    return out


def pool_options(model: dict[str, Any], *, cluster_gpus: float) -> dict[str, Any]:
    """Ray Serve deployment options placing a shared engine pool's replicas the way
    ``engine_map_kwargs`` places a job's own engines: one GPU (or CPU) per replica held by
    the replica itself, or a placement group of ``tensor × pipeline`` GPU bundles for
    vLLM's Ray executor; ``replicas: N`` fixed, ``{min, max}`` autoscaled by Serve on the
    batches in flight per replica. ``engine_overrides`` are engine arguments the caller
    applies."""
    engine = model["engine"]
    gpus = engine["tensor_parallel_size"] * engine["pipeline_parallel_size"]
    accel = model.get("accelerator_type")
    resources = {f"accelerator_type:{accel}": _ACCELERATOR_SHARE} if accel else {}
    replicas = model["replicas"]
    out: dict[str, Any] = {"engine_overrides": {}}
    if isinstance(replicas, dict):
        out["autoscaling_config"] = {
            "min_replicas": replicas["min"],
            "max_replicas": replicas["max"],
            "initial_replicas": replicas["min"],
            # Serve counts handle calls: one call is one batch of one job.
            "target_ongoing_requests": model["max_batches_in_flight"],
        }
    else:
        out["num_replicas"] = replicas
    actor: dict[str, Any] = {"num_cpus": 1, "num_gpus": 0}
    if on_gpu(model, cluster_gpus=cluster_gpus):
        if gpus == 1:
            actor["num_gpus"] = 1
        else:
            actor = {"num_cpus": 0, "num_gpus": 0}
            bundle = {"GPU": 1.0, "CPU": 1.0, **resources}
            out["placement_group_bundles"] = [dict(bundle) for _ in range(gpus)]
            out["placement_group_strategy"] = model["placement_strategy"]
            out["engine_overrides"] = {"distributed_executor_backend": "ray"}
            resources = {}
    if resources:
        actor["resources"] = resources
    out["ray_actor_options"] = actor
    return out


def resources_of(options: dict[str, Any]) -> dict[str, float]:
    """What a pool holds at its smallest (``pool_options``' output): its replicas' own
    ``CPU``, ``GPU`` and custom resources, and their placement groups' bundles."""
    actor = options.get("ray_actor_options", {})
    per_replica = {
        "CPU": float(actor.get("num_cpus", 0)),
        "GPU": float(actor.get("num_gpus", 0)),
        **{k: float(v) for k, v in (actor.get("resources") or {}).items()},
    }
    for bundle in options.get("placement_group_bundles", []):
        for key, value in bundle.items():
            per_replica[key] = per_replica.get(key, 0.0) + float(value)
    scaling = options.get("autoscaling_config")
    replicas = scaling["min_replicas"] if scaling else options.get("num_replicas", 1)
    return {key: value * replicas for key, value in per_replica.items() if value}


def gpus_of(options: dict[str, Any]) -> float:
    """GPUs a pool holds at its smallest (``pool_options``' output)."""
    return resources_of(options).get("GPU", 0.0)
