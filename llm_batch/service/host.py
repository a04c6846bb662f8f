"""The service's engine host: one long-lived driver on the Ray cluster.

    python -m llm_batch.service.host HOST_FOLDER

The service launches it through Ray's Jobs API (``pools.EnginePools``) and talks to
it through files in ``HOST_FOLDER`` (``<data_dir>/host``, shared with the cluster's
nodes in cluster mode), so the service itself never becomes a Ray driver and
survives a Ray restart:

    desired.json   written by the service: the pools it wants (model block, warm,
                   the jobs attached to each), the idle time after which an unused
                   pool is released
    inbox/         messages from the service: ``run`` a small job here, ``cancel``
                   one, ``release`` a pool
    state.json     written here every second: the pools (Serve's status, replicas,
                   requests in their engines, jobs seen, idle since) and the jobs
                   running here

It owns the engine pools (Ray Serve applications, ``pipeline/pool.py``): it deploys
the pools desired, releases those idle for ``idle_seconds`` with no job attached,
releases idle pools of other models when a new pool needs GPUs they hold, and
idle pools when work (a job's tasks, a pool's replicas) waits for what they hold, and
finds its pools again after a restart (Serve keeps them; a pool nobody wants is
released once idle). It also runs small jobs in threads of its own: a fresh
driver process costs seconds (process start, imports, Ray Data planning, an actor
per stage) that a ten-row job should not pay. Each such job keeps a status file as
a job driver does (``pipeline/driver.py``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["Host", "Mailbox", "main", "read_json", "write_json"]

logger = logging.getLogger("llm_batch.host")

# What a small job's read, render and write tasks ask Ray for (see run.Engines.task_cpus).
SMALL_JOB_TASK_CPUS = 0.0
DESIRED = "desired.json"
ORPHANED = 300.0
RECONCILE_EVERY = 2.0  # seconds between two looks at the pools
# Seconds work waits for resources idle pools hold before they give way: longer than Ray
# takes to place what it can place, shorter than anyone would wait for nothing.
GIVE_WAY_AFTER = 5.0
# Resources that say where, not how much: never what a pool is released for.
_PLACE_KEYS = ("node:", "memory", "object_store_memory")
STATE = "state.json"
INBOX = "inbox"


def write_json(path: Path, body: Any) -> None:
    """Atomically: a temporary name, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(body, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class Mailbox:
    """Messages as files, one each, read in the order they were sent."""

    def __init__(self, folder: Path):
        self.folder = folder

    def send(self, kind: str, body: dict[str, Any]) -> None:
        name = f"{time.time_ns():020d}-{kind}-{uuid.uuid4().hex[:8]}.json"
        write_json(self.folder / name, {"kind": kind, **body})

    def receive(self) -> list[tuple[Path, dict[str, Any]]]:
        if not self.folder.is_dir():
            return []
        out = []
        for path in sorted(self.folder.glob("*.json")):
            message = read_json(path)
            if isinstance(message, dict):
                out.append((path, message))
        return out


class Host:
    def __init__(self, folder: Path, *, poll: float = 0.1, max_jobs: int = 16):
        self.folder = folder
        self.mailbox = Mailbox(folder / INBOX)
        self.poll = poll
        self.max_jobs = max_jobs
        self.jobs: dict[str, threading.Event] = {}  # running here: job id -> its cancel
        self.pools: dict[str, dict[str, Any]] = {}  # Serve app name -> what is known
        self.detached_at: dict[str, float] = {}
        self.released: list[dict[str, Any]] = []  # the last pools released, and why
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_jobs, thread_name_prefix="llm-batch-job"
        )
        self._lock = threading.Lock()
        self._releases: queue.SimpleQueue[str] = queue.SimpleQueue()  # asked for by the service
        self._last_refresh = 0.0
        self._desired_mtime = 0.0
        self._waiting_since: float | None = None  # since when work waits for resources
        self._stopping = threading.Event()
        # Warm progress trackers, one taken per job. No more than the jobs run at once: each
        # is a worker process, and an idle one costs about 1 % of a core on its own.
        self._trackers: list[Any] = []

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        from ray import serve

        serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy on the nodes
        logger.info("engine host up; pools found: %s", ", ".join(self._deployed()) or "none")
        self._warm_up()
        looker = threading.Thread(target=self._look_at_pools, name="llm-batch-pools", daemon=True)
        looker.start()
        while not self._stopping.is_set():
            try:
                self.read_inbox()
            except Exception:  # noqa: BLE001 - one bad pass must not end the host
                logger.exception("reading the inbox failed")
                self._stopping.wait(1.0)
            self._stopping.wait(self.poll)

    def read_inbox(self) -> None:
        for path, message in self.mailbox.receive():
            try:
                self._handle(message)
            except Exception:  # noqa: BLE001
                logger.exception("message %s failed", message.get("kind"))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _look_at_pools(self) -> None:
        """The pools, in a thread of their own: a look asks Serve's controller and each
        pool's replicas, seconds on a loaded machine, which a small job's ``run`` message
        must not wait behind."""
        while not self._stopping.is_set():
            try:
                now = time.monotonic()
                released = False
                while not self._releases.empty():
                    self._release(self._releases.get(), why="released on request")
                    released = True
                # At once when the service wants something new (a job waits for its pool).
                changed = released or _mtime(self.folder / DESIRED) != self._desired_mtime
                if changed or now - self._last_refresh >= RECONCILE_EVERY:
                    self._last_refresh = now
                    self._desired_mtime = _mtime(self.folder / DESIRED)
                    self.reconcile(read_json(self.folder / DESIRED) or {})
                    took = time.monotonic() - now
                    if took > 0.5:
                        logger.info("a look at the pools took %.1fs", took)
            except Exception:  # noqa: BLE001 - one bad look must not end the host
                logger.exception("looking at the pools failed")
                self._stopping.wait(1.0)
            self._stopping.wait(self.poll)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["kind"]
        if kind == "run":
            self._run_job(message)
        elif kind == "cancel":
            cancel = self.jobs.get(message["job_id"])
            if cancel is not None:
                cancel.set()
        elif kind == "release":
            self._releases.put(message["pool"])  # by the thread that looks at the pools
        else:
            logger.warning("unknown message %r", kind)

    # -- pools ---------------------------------------------------------------------------

    @staticmethod
    def _applications() -> dict[str, Any]:
        """Serve's applications of this service's pools. One call per pass: building the
        answer costs Serve's client real CPU (it pickles each app's router config)."""
        from ray import serve

        from llm_batch.pipeline.pool import POOL_PREFIX

        return {
            name: app
            for name, app in serve.status().applications.items()
            if name.startswith(POOL_PREFIX)
        }

    def _deployed(self, apps: dict[str, Any] | None = None) -> dict[str, str]:
        apps = self._applications() if apps is None else apps
        return {name: str(getattr(app.status, "value", app.status)) for name, app in apps.items()}

    def reconcile(self, desired: dict[str, Any]) -> None:
        """Deploy the pools desired, release the idle ones, write ``state.json``. A service
        that has not said what it wants for ORPHANED seconds is gone: its pools are kept
        for nobody, and go once idle."""
        from llm_batch.pipeline.pool import failure_reason

        wanted: dict[str, dict[str, Any]] = desired.get("pools") or {}
        if time.time() - float(desired.get("updated_at") or 0) > ORPHANED:
            wanted = {}
        idle_seconds = float(desired.get("idle_seconds") or 600)
        apps = self._applications()
        deployed = self._deployed(apps)
        for name, want in wanted.items():
            if (want.get("jobs") or want.get("warm")) and name not in deployed:
                self._ensure(name, want["model"], deployed, wanted)
        now = time.time()
        states = {}
        for name, status in deployed.items():
            want = wanted.get(name) or {}
            attached = list(want.get("jobs") or [])
            stats = self._stats(name) if status == "RUNNING" else {}
            if attached:
                self.detached_at.pop(name, None)
            else:
                self.detached_at.setdefault(name, now)
            last = max(
                float(stats.get("last_request_at") or 0),
                self.detached_at.get(name, now) if not attached else now,
            )
            idle = not attached and not stats.get("requests")
            state = {
                "status": status,
                "model": want.get("model") or self.pools.get(name, {}).get("model"),
                "warm": bool(want.get("warm")),
                "jobs_attached": attached,
                "jobs_in_engine": stats.get("jobs") or {},
                "requests": stats.get("requests", 0),
                "running": stats.get("running"),
                "waiting": stats.get("waiting"),
                "replicas": _replicas(apps.get(name)),
                "idle_since": last if idle else None,
                "started_at": stats.get("started_at"),
            }
            states[name] = state
            if status == "DEPLOY_FAILED":
                state["error"] = failure_reason(apps[name])
                if not attached:  # its jobs have failed with the reason; the next try anew
                    self._release(name, why=f"it failed to start: {state['error']}")
                    state["status"] = "RELEASING"
                    continue
            if idle and not want.get("warm") and now - last >= idle_seconds:
                # Also a pool that never started (failed, or waiting for resources the
                # cluster lacks) once nobody wants it: it must not hold what it got.
                self._release(name, why=f"unused for {now - last:.0f}s")
                state["status"] = "RELEASING"
        self.pools = states
        self._give_way(wanted)
        write_json(
            self.folder / STATE,
            {
                "updated_at": now,
                "pools": states,
                "jobs": sorted(self.jobs),
                "released": self.released,
            },
        )

    def _ensure(
        self, name: str, model: dict[str, Any], deployed: dict[str, str], wanted: dict[str, Any]
    ) -> None:
        import ray
        from ray import serve

        from llm_batch.pipeline.placement import gpus_of, pool_options
        from llm_batch.pipeline.pool import pool_app

        options = pool_options(model, cluster_gpus=ray.cluster_resources().get("GPU", 0))
        needed = gpus_of(options)
        if needed:
            self._make_room(needed, keep=name, deployed=deployed, wanted=wanted)
        logger.info("starting pool %s for %s", name, model.get("path"))
        # Not waiting here: a pool takes tens of seconds to start, while jobs go on. Its
        # state is Serve's (DEPLOYING, RUNNING, DEPLOY_FAILED), read on every pass; the
        # jobs waiting for it read it too (pool.wait_for_pool).
        serve._run(pool_app(model, options), name=name, route_prefix=None, _blocking=False)
        deployed[name] = "DEPLOYING"

    def _make_room(
        self, needed: float, *, keep: str, deployed: dict[str, str], wanted: dict[str, Any]
    ) -> None:
        """Release idle pools of other models until the cluster has ``needed`` GPUs free:
        a job waiting for GPUs an unused pool holds would wait for nothing."""
        import ray

        free = ray.available_resources().get("GPU", 0)
        if free >= needed:
            return
        idle = [
            (since, name)
            for since, name in self._idle_pools(wanted, warm_too=True)
            if name != keep and name in deployed
        ]
        for _, name in idle:
            logger.info("releasing idle pool %s: pool %s needs %.0f GPU(s)", name, keep, needed)
            self._release(name, why=f"its GPUs are needed by {keep}", blocking=True)
            free = ray.available_resources().get("GPU", 0)
            if free >= needed:
                return

    def _give_way(self, wanted: dict[str, Any]) -> None:
        """Release idle pools while work waits for resources they hold. Each replica holds
        a CPU, or GPUs: with a few unused pools up, a job's read task or a new pool's
        replica would wait until their idle time ran out, for nothing. Work that has waited
        ``GIVE_WAY_AFTER`` seconds counts; pools kept ``warm`` and pools with jobs attached
        stay. ``_make_room`` does the same for a new pool's GPUs before it is deployed."""
        try:
            demands, free, total = _cluster_demands()
        except Exception:  # noqa: BLE001 - the look goes on; the pools go once idle
            logger.warning("could not read what work waits for", exc_info=True)
            return
        missing = waiting_for(demands, free, total)
        now = time.monotonic()
        if not missing:
            self._waiting_since = None
            return
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < GIVE_WAY_AFTER:
            return
        wants = ", ".join(f"{value:g} {key}" for key, value in sorted(missing.items()))
        for _, name in self._idle_pools(wanted, warm_too=False):
            held = self._holds(name, cluster_gpus=total.get("GPU", 0))
            if not any(held.get(key, 0) > 0 for key in missing):
                continue
            logger.info("releasing idle pool %s: work waits for %s", name, wants)
            self._release(name, why=f"work waited for {wants} it held", blocking=True)
            missing = {k: v - held.get(k, 0) for k, v in missing.items() if v > held.get(k, 0)}
            if not missing:
                break
        self._waiting_since = None  # what was released is Ray's to place before a next look

    def _idle_pools(self, wanted: dict[str, Any], *, warm_too: bool) -> list[tuple[float, str]]:
        """Pools with no job attached and no request in their engines, idle longest first."""
        return sorted(
            (state.get("idle_since") or 0, name)
            for name, state in self.pools.items()
            if not (wanted.get(name) or {}).get("jobs")
            and not state.get("requests")
            and state.get("status") != "RELEASING"
            and (warm_too or not (wanted.get(name) or {}).get("warm"))
        )

    def _holds(self, name: str, *, cluster_gpus: float) -> dict[str, float]:
        """What a pool's replicas hold at its smallest, from its model block."""
        from llm_batch.pipeline.placement import pool_options, resources_of

        model = self.pools.get(name, {}).get("model")
        if not model:
            return {}
        return resources_of(pool_options(model, cluster_gpus=cluster_gpus))

    def _release(self, name: str, *, why: str, blocking: bool = False) -> None:
        from ray import serve

        logger.info("releasing pool %s: %s", name, why)
        self.released.append({"pool": name, "why": why, "at": time.time()})
        del self.released[:-20]
        self.detached_at.pop(name, None)
        serve.delete(name, _blocking=blocking)
        if blocking:
            deadline = time.monotonic() + 60
            while name in self._deployed() and time.monotonic() < deadline:
                time.sleep(0.5)

    @staticmethod
    def _stats(name: str) -> dict[str, Any]:
        from ray import serve

        from llm_batch.pipeline.pool import DEPLOYMENT

        try:
            handle = serve.get_deployment_handle(DEPLOYMENT, app_name=name)
            return dict(handle.stats.remote().result(timeout_s=5))
        except Exception:  # noqa: BLE001 - a replica starting or being replaced
            return {}

    # -- jobs ----------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Start what every small job needs before the first one comes: progress trackers
        (an actor each, a worker process to start) and workers that have run a read, a
        render and a write (their imports done)."""
        import shutil
        import tempfile

        import pyarrow as pa
        import ray
        import ray.data

        from llm_batch.pipeline.run import new_tracker

        started = time.monotonic()
        self._trackers = [new_tracker() for _ in range(self.max_jobs)]
        ray.get([t.snapshot.remote() for t in self._trackers])
        folder = tempfile.mkdtemp(prefix="llm-batch-warm-")
        try:
            table = pa.table({"row_id": list(range(4)), "text": ["warm"] * 4})
            ds = ray.data.from_arrow(table).map_batches(
                lambda b: b, batch_format="pyarrow", num_cpus=SMALL_JOB_TASK_CPUS
            )
            ds.write_parquet(folder, ray_remote_args={"num_cpus": SMALL_JOB_TASK_CPUS})
        except Exception:  # noqa: BLE001 - warming is an optimization
            logger.exception("warming the host up failed")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        logger.info("host warm in %.1fs", time.monotonic() - started)

    def _take_tracker(self) -> Any:
        with self._lock:
            if self._trackers:
                return self._trackers.pop()
        from llm_batch.pipeline.run import new_tracker

        return new_tracker()

    def _give_tracker(self, tracker: Any, *, healthy: bool) -> None:
        import ray

        with self._lock:
            if healthy and len(self._trackers) < self.max_jobs:
                self._trackers.append(tracker)
                return
        with contextlib.suppress(Exception):
            ray.kill(tracker)

    def _run_job(self, message: dict[str, Any]) -> None:
        job_id = message["job_id"]

        with self._lock:
            if job_id in self.jobs:
                return  # already running here (a message sent twice)
            cancel = self.jobs[job_id] = threading.Event()
        self._executor.submit(self._job, job_id, message, cancel)

    def _job(self, job_id: str, message: dict[str, Any], cancel: threading.Event) -> None:
        from llm_batch.errors import LLMBatchError
        from llm_batch.job.spec import JobSpec
        from llm_batch.pipeline.driver import StatusFile
        from llm_batch.pipeline.pool import JobCancelled
        from llm_batch.pipeline.run import Engines, one_batch, plan_job, run_job

        status = StatusFile(message["status"])
        last: dict[str, Any] | None = None

        def on_progress(snap: dict[str, Any]) -> None:
            nonlocal last
            first = last is None
            last = snap
            status.write("running", snap, force=first)

        pools = {None if k == "" else k: v for k, v in (message.get("pools") or {}).items()}
        tracker = self._take_tracker()
        healthy = False
        try:
            status.write("running", None, force=True)
            spec = JobSpec.from_file(message["spec"])
            plan = plan_job(spec)
            # A job of one batch is one task asking a sliver of CPU (run.Engines.task_cpus);
            # a larger one (LLM_BATCH_SMALL_JOB_ROWS set higher) the pipeline a driver of its
            # own runs, its batches cut and kept in flight, on this driver's warm workers.
            task_cpus = SMALL_JOB_TASK_CPUS if one_batch(spec, plan) else None
            result = run_job(
                spec,
                plan=plan,
                on_progress=on_progress,
                engines=Engines(pools=pools, job=job_id, task_cpus=task_cpus),
                tracker=tracker,
                cancel=cancel,
                retry_errors=bool(message.get("retry_errors")),
            )
            status.write("succeeded", result.progress, force=True)
            healthy = True
        except JobCancelled as e:
            status.write("cancelled", last, str(e), force=True)
        except LLMBatchError as e:
            status.write("cancelled" if cancel.is_set() else "failed", last, str(e), force=True)
        except Exception as e:  # noqa: BLE001 - the job's failure, not the host's
            logger.exception("job %s failed", job_id)
            state = "cancelled" if cancel.is_set() else "failed"
            status.write(state, last, f"{type(e).__name__}: {e}", force=True)
        finally:
            # A tracker of a job that failed may be in any state: not kept.
            self._give_tracker(tracker, healthy=healthy)
            with self._lock:
                self.jobs.pop(job_id, None)


def skip_ray_data_cluster_queries() -> None:
    """Ray Data (2.60) asks the whole cluster things that only its own warnings and stats
    use, on every job: whether CPUs are free (when it plans a read, and before it runs a
    write, to warn that none is) and how many bytes the object stores spilled (after each
    write, for its stats summary). Each goes through the GCS, the last through every
    raylet; beside a large job on two cores each took 1.5-6.6 s, for a ten-row job that
    takes 1.5 s alone. The engine host, which runs small jobs one after another, skips
    them: the CPU checks see a free CPU, the spill query fails at once (Ray Data then
    leaves the spill counts out, as it does whenever that query fails)."""
    import types

    import ray
    import ray.data._internal.logical.rules.set_read_parallelism as read_rule
    import ray.data._internal.util as data_util
    import ray.data.dataset as dataset_module

    def a_cpu_free() -> dict[str, float]:
        return {"CPU": 1.0}

    class _Ray(types.ModuleType):  # ``ray`` as these modules see it
        available_resources = staticmethod(a_cpu_free)

        def __getattr__(self, name: str) -> Any:
            return getattr(ray, name)

    def no_spill_query(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the engine host does not ask the cluster for spill statistics")

    shim = _Ray("ray")
    for module in (dataset_module, data_util):
        if getattr(module, "ray", None) is ray:
            module.ray = shim  # type: ignore[attr-defined]
    if hasattr(dataset_module, "get_memory_info_reply"):
        dataset_module.get_memory_info_reply = no_spill_query  # type: ignore[attr-defined]
    if hasattr(read_rule, "ray_available_resources"):
        read_rule.ray_available_resources = a_cpu_free  # type: ignore[attr-defined]


def waiting_for(
    demands: list[dict[str, float]], free: dict[str, float], total: dict[str, float]
) -> dict[str, float]:
    """What work waiting to be placed (a task's, an actor's or a placement group bundle's
    resources, ``demands``) lacks: per resource, the most one of them needs beyond what
    is ``free``. Work that would not fit the whole cluster (``total``) even empty is left
    out: releasing pools cannot place it."""
    missing: dict[str, float] = {}
    for shape in demands:
        wanted = {k: v for k, v in shape.items() if v > 0 and not k.startswith(_PLACE_KEYS)}
        if not wanted or any(v > total.get(k, 0) for k, v in wanted.items()):
            continue
        for key, value in wanted.items():
            short = value - free.get(key, 0)
            if short > 1e-9:
                missing[key] = max(missing.get(key, 0), short)
    return missing


def _cluster_demands() -> tuple[list[dict[str, float]], dict[str, float], dict[str, float]]:
    """The shapes of the work waiting to be placed, and the cluster's free and total
    resources, as Ray's autoscaler state has them (what ``ray status`` shows)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    found = status.resource_demands
    demands = [
        dict(request.bundle)
        for demand in (*found.ray_task_actor_demand, *found.placement_group_demand)
        for request in demand.bundles_by_count
    ]
    return demands, status.available_resources(), status.total_resources()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _replicas(app: Any) -> int:
    """Replicas running of a pool's Serve application (its status)."""
    from llm_batch.pipeline.pool import DEPLOYMENT

    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    states = app.deployments[DEPLOYMENT].replica_states or {}
    return int(sum(v for k, v in states.items() if str(k).endswith("RUNNING")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_batch.service.host")
    parser.add_argument("folder", type=Path, help="the service's host folder (<data_dir>/host)")
    parser.add_argument("--max-jobs", type=int, default=16, help="small jobs run at once")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from llm_batch.pipeline.run import ensure_ray

    ensure_ray()
    skip_ray_data_cluster_queries()
    Host(args.folder, max_jobs=args.max_jobs).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
