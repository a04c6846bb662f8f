"""The service's side of its engine pools, without Ray: what it asks the engine host for
(``desired.json``, messages in ``inbox/``), how it reads what the host reports
(``state.json``), and ``/v1/engines`` on top. The host and Serve themselves are tested
end to end (``test_pools_e2e.py``, ``test_pool_lifecycle_e2e.py``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.pool import POOL_PREFIX, pool_key, pool_name
from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.errors import JobConflict
from llm_batch.service.host import DESIRED, STATE, Host, Mailbox, read_json, waiting_for, write_json
from llm_batch.service.pools import EnginePools, PoolNotFound
from llm_batch.service.process import free_port
from llm_batch.service.settings import Settings

MODEL = {"path": "/models/a", "engine": {"max_model_len": 256}}


class NoRay:
    """The Jobs API of a cluster where the host already runs."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, str]] = []

    def status(self, submission_id: str) -> str | None:
        return "RUNNING" if self.submitted else None

    def submit(self, submission_id, entrypoint, *, runtime_env=None, metadata=None) -> bool:
        self.submitted.append((submission_id, entrypoint))
        return True

    def unfinished_metadata(self) -> dict[str, dict[str, str]]:
        return {}

    def stop(self, submission_id: str) -> bool:
        return True


def spec(**model: Any) -> JobSpec:
    return JobSpec.from_dict(
        {
            "input": {"path": "/in.parquet"},
            "prompt": {"template": "{{ x }}"},
            "model": {**MODEL, **model},
            "output": {"path": "/out"},
        }
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", engine_idle_seconds=42)


@pytest.fixture
def pools(settings: Settings) -> EnginePools:
    catalog = ModelCatalog({"warm-one": {"path": "/models/w"}}, warm=["warm-one"])
    return EnginePools(settings=settings, catalog=catalog, jobs=NoRay())


def test_a_pool_is_keyed_by_what_changes_the_engine_only():
    base = spec().model_dump()["model"]
    assert pool_key(base) == pool_key(spec(batch_size=64, replicas=3).model_dump()["model"])
    assert pool_key(base) != pool_key(spec(engine={"max_model_len": 512}).model_dump()["model"])
    assert pool_name(base).startswith(POOL_PREFIX)


def test_the_host_is_launched_once_and_told_what_is_wanted(pools, settings):
    pools.ensure_host()
    pools.ensure_host()  # Ray runs it now
    (submission, command), *rest = pools.jobs.submitted
    assert not rest and submission.startswith("llm-batch-host-")
    assert "-m llm_batch.service.host" in command and str(settings.data_dir / "host") in command

    job = spec()
    assert pools.pools_for(job) == {None: pool_name(job.model_dump()["model"])}
    pools.write_desired([("job_1", job), ("job_2", job)])
    desired = read_json(settings.data_dir / "host" / DESIRED)
    assert desired["idle_seconds"] == 42
    mine = desired["pools"][pool_name(job.model_dump()["model"])]
    assert mine["jobs"] == ["job_1", "job_2"] and not mine["warm"]
    warm = [p for p in desired["pools"].values() if p["warm"]]
    assert [p["model"]["path"] for p in warm] == ["/models/w"]


def test_engines_are_what_the_host_reports_and_release_goes_to_its_inbox(pools, settings):
    job = spec()
    name = pool_name(job.model_dump()["model"])
    pools.write_desired([("job_1", job)])
    write_json(
        settings.data_dir / "host" / STATE,
        {
            "updated_at": time.time(),
            "pools": {name: {"status": "RUNNING", "model": job.model_dump()["model"],
                             "replicas": 1, "requests": 3, "jobs_attached": ["job_1"]}},
            "released": [{"pool": POOL_PREFIX + "old", "why": "unused for 600s", "at": 1.0}],
        },
    )  # fmt: skip
    (pool,) = [p for p in pools.list() if p["id"] == name]
    assert pool["state"] == "running" and pool["jobs"] == ["job_1"] and pool["requests"] == 3
    with pytest.raises(JobConflict, match="serves running jobs"):
        pools.release(name)
    pools.write_desired([])
    write_json(
        settings.data_dir / "host" / STATE,
        {"updated_at": time.time(), "pools": {name: {"status": "RUNNING", "replicas": 1}}},
    )
    assert pools.release(name)["state"] == "releasing"
    ((_, message),) = Mailbox(settings.data_dir / "host" / "inbox").receive()
    assert message == {"kind": "release", "pool": name}
    with pytest.raises(PoolNotFound):
        pools.release("llm-batch-pool-nope")


def test_a_host_that_stopped_reporting_shows_no_pools(pools, settings):
    write_json(
        settings.data_dir / "host" / STATE,
        {"updated_at": time.time() - 3600, "pools": {POOL_PREFIX + "x": {"status": "RUNNING"}}},
    )
    assert pools.state() == {}


def test_engines_routes_without_shared_engines(tmp_path: Path):
    from llm_batch.service.app import create_app

    settings = Settings(
        data_dir=tmp_path / "data",
        ray_dashboard_port=free_port(),
        api_keys="k1",
        admin_api_keys="root",
    )
    with TestClient(create_app(settings, run_scheduler=False)) as client:
        user, admin = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer root"}
        assert client.get("/v1/engines").status_code == 401
        r = client.get("/v1/engines", headers=user)
        assert r.status_code == 200 and r.json() == {"object": "list", "data": [], "released": []}
        assert client.delete("/v1/engines/x", headers=user).status_code == 403
        assert client.delete("/v1/engines/x", headers=admin).status_code == 404


def test_the_engine_host_skips_ray_datas_cluster_queries_and_nothing_else():
    """The engine host's patch hits the pinned Ray Data's names (were they renamed, this
    fails rather than the host silently asking the cluster again), and leaves the rest of
    ``ray`` as it is. In a process of its own: the patch is for the whole process."""
    import subprocess
    import sys

    script = """
import ray, pytest
import ray.data.dataset as d
import ray.data._internal.util as u
import ray.data._internal.logical.rules.set_read_parallelism as r
from llm_batch.service.host import skip_ray_data_cluster_queries
skip_ray_data_cluster_queries()
assert d.ray.available_resources() == {"CPU": 1.0} == u.ray.available_resources()
assert r.ray_available_resources() == {"CPU": 1.0}
assert d.ray.get is ray.get and d.ray.put is ray.put and u.ray.remote is ray.remote
with pytest.raises(RuntimeError, match="spill statistics"):
    d.get_memory_info_reply(None)
assert ray.available_resources is not d.ray.available_resources
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- idle pools give way to work that waits for what they hold --------------------------


def test_what_waiting_work_lacks_is_counted_per_resource():
    free = {"CPU": 0.0, "GPU": 1.0, "memory": 0.0}
    total = {"CPU": 4.0, "GPU": 2.0, "memory": 1e9}
    demands = [
        {"CPU": 1.0},  # a read task: one CPU short
        {"CPU": 0.5, "GPU": 2.0},  # a two-GPU replica: one GPU short, and half a CPU
        {"GPU": 8.0},  # more GPUs than the cluster has: no release places it
        {"node:10.0.0.1": 0.001, "memory": 5.0},  # where, not how much
        {"CPU": 0.0},  # asks for nothing
    ]
    assert waiting_for(demands, free, total) == {"CPU": 1.0, "GPU": 1.0}
    assert waiting_for([{"CPU": 1.0}], {"CPU": 1.0}, total) == {}
    assert waiting_for([], free, total) == {}


def test_a_pools_resources_are_its_smallest_size():
    from llm_batch.job.spec import JobSpec as Spec
    from llm_batch.pipeline.placement import gpus_of, pool_options, resources_of

    def options(**model: Any) -> dict[str, Any]:
        block = Spec.from_dict(
            {
                "input": {"path": "/in.parquet"},
                "prompt": {"template": "{{ x }}"},
                "model": {**MODEL, **model},
                "output": {"path": "/out"},
            }
        ).model.model_dump()
        return pool_options(block, cluster_gpus=8)

    assert resources_of(options(device="cpu")) == {"CPU": 1.0}
    assert resources_of(options(device="cpu", replicas={"min": 2, "max": 4})) == {"CPU": 2.0}
    one_gpu = options(replicas=3)
    assert resources_of(one_gpu) == {"CPU": 3.0, "GPU": 3.0}
    assert gpus_of(one_gpu) == 3.0
    tensor = options(engine={"max_model_len": 256, "tensor_parallel_size": 2})
    assert resources_of(tensor) == {"CPU": 2.0, "GPU": 2.0}


class GivingWay(Host):
    """The engine host's choice of pools to release, on the cluster state it is given."""

    def __init__(self, folder: Path, pools: dict[str, dict[str, Any]], holds: dict[str, Any]):
        super().__init__(folder)
        self.pools = pools
        self.held = holds
        self.gone: list[str] = []

    def _holds(self, name: str, *, cluster_gpus: float) -> dict[str, float]:
        return dict(self.held[name])

    def _release(self, name: str, *, why: str, blocking: bool = False) -> None:
        assert blocking, "the next look must see the resources freed"
        self.gone.append(name)
        self.pools[name]["status"] = "RELEASING"


def test_idle_pools_give_way_to_work_that_waited_for_what_they_hold(tmp_path, monkeypatch):
    import llm_batch.service.host as host_module

    pools = {
        "busy": {"status": "RUNNING", "requests": 3, "idle_since": None},
        "attached": {"status": "RUNNING", "requests": 0, "idle_since": 5.0},
        "warm": {"status": "RUNNING", "requests": 0, "idle_since": 1.0},
        "gpu": {"status": "RUNNING", "requests": 0, "idle_since": 2.0},
        "older": {"status": "RUNNING", "requests": 0, "idle_since": 3.0},
        "newer": {"status": "RUNNING", "requests": 0, "idle_since": 4.0},
    }
    holds = {name: {"CPU": 1.0} for name in pools}
    holds["gpu"] = {"GPU": 1.0, "CPU": 0.0}
    wanted = {"attached": {"jobs": ["job_1"]}, "warm": {"warm": True}}
    host = GivingWay(tmp_path, pools, holds)
    waiting = {"demands": [{"CPU": 1.0}]}
    monkeypatch.setattr(
        host_module,
        "_cluster_demands",
        lambda: (waiting["demands"], {"CPU": 0.0, "GPU": 0.0}, {"CPU": 4.0, "GPU": 1.0}),
    )
    clock = {"now": 100.0}
    monkeypatch.setattr(host_module.time, "monotonic", lambda: clock["now"])

    host._give_way(wanted)  # work has just started waiting: Ray may still place it
    assert host.gone == []
    clock["now"] += host_module.GIVE_WAY_AFTER
    host._give_way(wanted)
    # The longest idle pool that holds a CPU; not the busy, attached or warm ones, nor
    # the idle one that holds only a GPU; one pool is enough for one CPU.
    assert host.gone == ["older"]

    waiting["demands"] = []  # placed: the wait starts over
    host._give_way(wanted)
    waiting["demands"] = [{"CPU": 1.0}]
    clock["now"] += 1
    host._give_way(wanted)
    assert host.gone == ["older"]
    clock["now"] += host_module.GIVE_WAY_AFTER
    host._give_way(wanted)
    assert host.gone == ["older", "newer"]
