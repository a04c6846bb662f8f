"""Faults mid-job: every input row ends up in the output exactly once.

- an engine actor's process is killed: Ray restarts the actor, its in-flight
  batches are retried, the job finishes;
- the driver (``llm-batch run``) is killed with its whole process group: a
  second ``llm-batch run`` of the same job resumes from Ray Data's checkpoint,
  keeping the rows already written and redoing only the rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.generation import Generator
from llm_batch.pipeline.progress import ProgressTracker

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

ROWS = 1200


def write_input(root: Path) -> Path:
    table = pa.table(
        {
            "id": [f"r{i:05d}" for i in range(ROWS)],
            "text": [f"row {i} says something about item {i % 17}" for i in range(ROWS)],
        }
    )
    path = root / "in.parquet"
    pq.write_table(table, path, row_group_size=300)  # several read tasks
    return path


def job_dict(root: Path, model: Path) -> dict:
    return {
        "name": "faults",
        "input": {"path": str(write_input(root))},
        "prompt": {"template": "{{ text }}:"},
        "model": {
            "path": str(model),
            "engine": {"max_model_len": 256, "dtype": "bfloat16", "enforce_eager": True},
            "batch_size": 32,
        },
        "sampling": {"max_tokens": 24, "ignore_eos": True},
        "carryover": ["id"],
        "output": {"path": str(root / "out"), "rows_per_file": 64},
    }


def assert_exactly_once(out: Path) -> pa.Table:
    table = pads.dataset(str(out), format="parquet").to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicated rows"
    assert sorted(ids) == [f"r{i:05d}" for i in range(ROWS)]
    assert table.column("error").null_count == table.num_rows
    assert set(table.column("num_output_tokens").to_pylist()) == {24}
    return table


def engine_core_pids() -> set[int]:
    return {
        p.pid
        for p in psutil.process_iter(["cmdline", "name"])
        if "EngineCore" in (p.info["name"] or "")
        or "EngineCore" in " ".join(p.info["cmdline"] or [])
    }


def test_engine_actor_killed_mid_job(tmp_path, tiny_model, ray_local):
    from llm_batch.pipeline.run import run_job

    spec = JobSpec.from_dict(job_dict(tmp_path, tiny_model))
    before = engine_core_pids()
    killed: list[int] = []

    def kill_engine_once(snap: dict) -> None:
        if killed or snap["rows_done"] < 200:
            return
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "MapWorker" in cmd and "EngineStage" in cmd:
                p.kill()
                killed.append(p.pid)

    result = run_job(spec, on_progress=kill_engine_once, progress_interval=0.5)
    assert killed, "the engine actor was never found to kill"
    assert_exactly_once(tmp_path / "out")
    assert result.progress["rows_done"] >= ROWS
    # The killed actor's engine core must not linger.
    deadline = time.time() + 30
    while time.time() < deadline and (engine_core_pids() - before):
        time.sleep(1)
    assert not (engine_core_pids() - before), "orphaned VLLM::EngineCore processes"


def _run_cli(job: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llm_batch.cli", "run", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: Ray and engines die with it
    )


def test_driver_killed_then_resumed(tmp_path, tiny_model):
    import json

    job = tmp_path / "job.json"
    job.write_text(json.dumps(job_dict(tmp_path, tiny_model)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray
    out = tmp_path / "out"

    first = _run_cli(job, env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            parts = list(out.glob("part-*.parquet")) if out.exists() else []
            if len(parts) >= 3:
                break
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("the first run wrote nothing in 300 s")
    finally:
        group = first.pid  # the session leader's pid is the group id
        os.killpg(group, signal.SIGKILL)
        first.wait()
    _kill_leftovers(group)
    written_before = pads.dataset(str(out), format="parquet").count_rows()
    assert 0 < written_before < ROWS

    second = _run_cli(job, env)
    text, _ = second.communicate(timeout=600)
    assert second.returncode == 0, text[-3000:]
    table = assert_exactly_once(out)
    assert table.num_rows == ROWS
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["resumed_rows"] > 0
    assert metrics["rows_done"] == ROWS
    assert not (out / "_checkpoint").exists()


def _kill_leftovers(group: int) -> None:
    """Processes of the killed run that left its process group (Ray daemons)."""
    threading.Event().wait(1)
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == group:
                p.kill()
        except (ProcessLookupError, psutil.Error):
            continue


POISON = "POISON"


class PoisonedGenerator(Generator):
    """The real engine stage's generator: a row whose prompt holds POISON SIGKILLs the
    engine's core process each time it reaches the engine, as the kernel's OOM killer
    would. Everything else (the engine, its death, Ray's restart and retries) is real.

    The core process is the one vLLM started for this engine (its own handle on it), not
    one found by name among the actor's children. Each kill is noted in ``kill_log``, so
    that a failure can say which engines the poison rows reached."""

    kill_log: str | None = None

    async def _generate_one(self, prompt, params, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        text = prompt.get("prompt") or ""
        if POISON in text:
            manager = self.engine.engine_core.resources.engine_manager
            killed = [p.pid for p in manager.processes if p.is_alive()]
            for pid in killed:
                # The process may have died between is_alive() and the kill (another
                # poison row of the same engine got there first): dead is what we want.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if self.kill_log:
                with open(self.kill_log, "a", encoding="utf-8") as log:
                    log.write(f"{time.time():.2f} actor {os.getpid()} {text!r} killed {killed}\n")
        return await super()._generate_one(prompt, params, *args, **kwargs)


class TrailedTracker(ProgressTracker):
    """The job's real tracker, which also writes each ledger call to ``trail``: which batch
    began (and what it was told), entered an engine, or reported, in the order the tracker
    took them. The stage below names each batch's key by its first row."""

    trail: str | None = None

    def _note(self, line: str) -> None:
        if self.trail:
            with open(self.trail, "a", encoding="utf-8") as log:
                log.write(f"{time.time():.2f} tracker {line}\n")

    def begin_batch(self, key: str, **kwargs):  # noqa: ANN003, ANN201
        decision = super().begin_batch(key, **kwargs)
        self._note(f"begin {key[:8]} -> {decision}")
        return decision

    def enter_batch(self, key: str, *, alone: bool) -> None:
        self._note(f"enter {key[:8]} alone={alone}")
        super().enter_batch(key, alone=alone)

    def batch_generated(self, key: str) -> None:
        self._note(f"generated {key[:8]}")
        super().batch_generated(key)

    def engine_started(self, model, **kwargs) -> None:  # noqa: ANN001, ANN003
        self._note(f"engine started {kwargs}")
        super().engine_started(model, **kwargs)

    def report(self, **kwargs) -> None:  # noqa: ANN003
        self._note(f"report {(kwargs.get('batch_key') or '')[:8]} given_up={kwargs['given_up']}")
        super().report(**kwargs)


def _trailed_stage(trail: str) -> type:
    from llm_batch.pipeline.engine import EngineStage
    from llm_batch.pipeline.rows import batch_key

    async def _run(self, member, batch):  # noqa: ANN001, ANN202
        first, key = batch.column("id")[0].as_py(), batch_key(batch, member.name)[:8]
        with open(trail, "a", encoding="utf-8") as log:
            log.write(f"{time.time():.2f} actor {os.getpid()} {first} is {key}\n")
        return await EngineStage._run(self, member, batch)

    return type("PoisonedStage", (EngineStage,), {"_run": _run})


def _spans(rows: set[int]) -> str:
    """``{32, 33, ..., 63, 70}`` as ``32-63, 70``."""
    spans: list[list[int]] = []
    for i in sorted(rows):
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans) or "none"


POISON_ROWS, POISONED = 128, {40, 70}


def poisoned_spec(root: Path, model: Path) -> JobSpec:
    """Batches of 32, in one Ray task: poisoned rows in the second and the third batch."""
    table = pa.table(
        {
            "id": [f"r{i:05d}" for i in range(POISON_ROWS)],
            "text": [
                f"row {i}" + (f" {POISON}" if i in POISONED else "") for i in range(POISON_ROWS)
            ],
        }
    )
    job = job_dict(root, model)
    pq.write_table(table, root / "poisoned.parquet")
    job["input"]["path"] = str(root / "poisoned.parquet")
    job["model"]["max_batch_retries"] = 1  # each retry restarts an engine (~25 s)
    # Batches cut in input order, so that the test knows which rows share a batch with a
    # poisoned one (grouped by prompt, "row 100" would sit beside "row 10").
    job["prompt"]["group_by_prefix"] = False
    return JobSpec.from_dict(job)


def assert_poisoned_batches_given_up(out: Path, result, trail: Path) -> None:  # noqa: ANN001
    rows = POISON_ROWS
    table = pads.dataset(str(out), format="parquet").to_table().sort_by("id")
    ids = table.column("id").to_pylist()
    assert ids == [f"r{i:05d}" for i in range(rows)], "a row lost or duplicated"
    errors = table.column("error").to_pylist()
    given_up = {i for i, e in enumerate(errors) if e is not None}
    # The poisoned rows' batches, and only they, were given up after one retry alone each.
    assert given_up == set(range(32, 96)), f"rows given up: {_spans(given_up)}; trail:\n" + (
        trail.read_text() if trail.exists() else "none"
    )
    assert all("with the batch alone in it" in errors[i] for i in given_up), errors[40]
    texts = table.column("generated_text").to_pylist()
    assert all(texts[i] is None for i in given_up)
    assert all(texts[i] for i in range(rows) if i not in given_up)
    # Batches that ran again because a neighbour killed their engine are counted once.
    assert result.progress["rows_failed"] == 64
    assert result.progress["rows_done"] == rows


def test_batch_that_keeps_killing_its_engine_becomes_error_rows(tmp_path, tiny_model, ray_local):
    import ray.cloudpickle

    import llm_batch.pipeline.run as pipeline_run

    spec = poisoned_spec(tmp_path, tiny_model)
    # One trail of the poison kills, the batches each actor took, and the ledger's calls.
    kills = tmp_path / "trail.log"
    generator = type("KillingGenerator", (PoisonedGenerator,), {"kill_log": str(kills)})
    generator.__module__ = __name__
    stage = type("PoisonedStage", (_trailed_stage(str(kills)),), {"generator_class": generator})
    stage.__module__ = __name__
    tracker = type("Tracker", (TrailedTracker,), {"trail": str(kills)})
    tracker.__module__ = __name__
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    before = engine_core_pids()
    try:
        result = pipeline_run.run_job(
            spec, engines=pipeline_run.Engines(stage=stage), tracker_class=tracker
        )
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    assert_poisoned_batches_given_up(tmp_path / "out", result, kills)
    deadline = time.time() + 30
    while time.time() < deadline and (engine_core_pids() - before):
        time.sleep(1)
    assert not (engine_core_pids() - before), "orphaned VLLM::EngineCore processes"


def test_batch_that_keeps_killing_a_shared_pool_becomes_error_rows(tmp_path, tiny_model, ray_local):
    """The same job through a service's kind of pool (a Serve application): the replica
    whose engine a poison row killed is replaced, the batches that were in it are retried
    under the same ledger, and the pool serves on."""
    import ray.cloudpickle
    from ray import serve

    import llm_batch.pipeline.run as pipeline_run
    from llm_batch.pipeline.placement import pool_options
    from llm_batch.pipeline.pool import EnginePool, pool_app, pool_name, wait_for_pool

    spec = poisoned_spec(tmp_path, tiny_model)
    assert spec.model is not None
    model = spec.model.model_dump()
    name = pool_name(model)
    kills = tmp_path / "trail.log"
    generator = type("KillingGenerator", (PoisonedGenerator,), {"kill_log": str(kills)})
    generator.__module__ = __name__
    pool_class = type("PoisonedPool", (EnginePool,), {"generator_class": generator})
    pool_class.__module__ = __name__
    tracker = type("Tracker", (TrailedTracker,), {"trail": str(kills)})
    tracker.__module__ = __name__
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        app = pool_app(model, pool_options(model, cluster_gpus=0), pool_class=pool_class)
        serve.start(proxy_location="Disabled")  # handles only, as the engine host's
        serve.run(app, name=name, route_prefix=None)
        result = pipeline_run.run_job(
            spec, engines=pipeline_run.Engines(pools={None: name}), tracker_class=tracker
        )
        assert_poisoned_batches_given_up(tmp_path / "out", result, kills)
        # The pool serves on: the replica the last poison row killed is replaced by one
        # whose engine is alive (Serve notices the death within its health-check period).
        handle, deadline = serve.get_app_handle(name), time.time() + 180
        while True:
            wait_for_pool(name, timeout=180)
            try:
                handle.check_health.remote().result(timeout_s=60)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        serve.shutdown()  # the session's Ray as it was: no Serve controller left behind
