"""The service's engine pools, as the scheduler and ``/v1/engines`` see them.

Engine pools belong to the service, not to a job: one per model (keyed by everything
that changes the engine, ``pipeline.pool.pool_key``), kept warm between jobs on the
Ray cluster as Ray Serve applications by the service's engine host (``host.py``).
This module is the service's side of the host:

- it launches the host through Ray's Jobs API, under one submission id per data
  directory, and launches it again when Ray no longer runs it;
- it tells the host which pools are wanted (``desired.json``: the pools of running
  jobs, and the catalog's ``warm: true`` models), which small jobs to run, which to
  cancel and which pool to release;
- it reads what the host reports of the pools (``state.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from llm_batch.drivers import JobsAPI, driver_env
from llm_batch.errors import ServiceUnavailable
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.pool import POOL_PREFIX, pool_key, pool_name
from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.errors import JobConflict
from llm_batch.service.host import DESIRED, INBOX, STATE, Mailbox, read_json, write_json
from llm_batch.service.settings import Settings

__all__ = ["HOST_PREFIX", "EnginePools", "PoolNotFound"]

logger = logging.getLogger(__name__)

_RAY_ACTIVE = ("PENDING", "RUNNING")
HOST_PREFIX = "llm-batch-host-"
HEARTBEAT = 10.0
# How old the host's state may be before the host counts as gone (it writes every second).
_STALE_STATE = 30.0


class PoolNotFound(LookupError):
    def __init__(self, pool_id: str):
        super().__init__(f"no engine pool with id {pool_id!r}")


class EnginePools:
    def __init__(self, *, settings: Settings, catalog: ModelCatalog, jobs: JobsAPI):
        self.settings = settings
        self.catalog = catalog
        self.jobs = jobs
        self.folder = settings.data_dir / "host"
        self.mailbox = Mailbox(self.folder / INBOX)
        digest = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:10]
        self.host_id = f"{HOST_PREFIX}{digest}"
        self._desired: dict[str, Any] | None = None
        self._desired_at = 0.0
        self._host_launches = 0
        self._unwarmed: set[str] = set()  # warm pools released on request: not again

    # -- the host ------------------------------------------------------------------------

    def host_state(self) -> str | None:
        """Ray's state of the host (None: Ray does not know it)."""
        return self.jobs.status(self.host_id)

    def host_running(self) -> bool:
        return self.host_state() in _RAY_ACTIVE

    def ensure_host(self) -> None:
        """Launch the host when Ray does not run it (first start, a cluster restarted, the
        host ended); raises ``ServiceUnavailable`` when Ray cannot be reached. A host that
        wrote its state lately runs: Ray's dashboard, seconds to answer on a loaded machine,
        is asked only when it has not."""
        if self.host_alive():
            return
        state = self.host_state()
        if state in _RAY_ACTIVE:
            return
        if self._host_launches == 0:
            self.find_host()  # launched again by an earlier run of the service, maybe
            state = self.host_state()
            if state in _RAY_ACTIVE:
                return
        submission = self.host_id if state is None else f"{self.host_id}-{time.time_ns()}"
        if state is not None:
            # Ray keeps an ended job's id: the new host runs under a new one, found by its
            # metadata the next time (see _find_host).
            logger.warning("the engine host ended (%s); launching it again", state)
        command = (
            f"{_python()} -m llm_batch.service.host {self.folder}"
            f" --max-jobs {self.settings.host_parallel_jobs}"
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jobs.submit(
            submission,
            command,
            runtime_env={"env_vars": driver_env()},
            metadata={"name": "llm-batch engine host", "llm_batch_host": str(self.folder)},
        )
        self.host_id = submission
        self._host_launches += 1
        logger.info("engine host launched on Ray as %s", submission)

    def find_host(self) -> None:
        """After a restart: the host an earlier run of the service launched again under a
        new submission id, if Ray still runs it."""
        with contextlib.suppress(ServiceUnavailable):
            for submission, metadata in self.jobs.unfinished_metadata().items():
                if metadata.get("llm_batch_host") == str(self.folder):
                    self.host_id = submission
                    return

    def stop_host(self) -> None:
        with contextlib.suppress(Exception):
            self.jobs.stop(self.host_id)

    # -- pools -----------------------------------------------------------------------------

    def pools_for(self, spec: JobSpec) -> dict[str | None, str]:
        """The pool of each of a job's models: model name (None: the only model) → pool."""
        self._unwarmed -= {pool_name(m.model_dump()) for _, m in spec.named_models()}
        return {
            name: pool_name(model.model_dump())
            for name, (_, model) in zip(spec.model_names, spec.named_models(), strict=True)
        }

    def write_desired(self, running: list[tuple[str, JobSpec]]) -> None:
        """The pools wanted now: those of the running jobs (with the jobs attached), and the
        catalog's warm models. Written only when it changed."""
        pools: dict[str, dict[str, Any]] = {}
        for name in self.catalog.warm:
            block = self._model_dict(self.catalog.block(name, field="model"))
            if pool_name(block) not in self._unwarmed:
                pools[pool_name(block)] = {"model": block, "warm": True, "jobs": []}
        for job_id, spec in running:
            for _, model in spec.named_models():
                block = model.model_dump()
                entry = pools.setdefault(
                    pool_name(block), {"model": block, "warm": False, "jobs": []}
                )
                entry["jobs"].append(job_id)
        desired = {"pools": pools, "idle_seconds": self.settings.engine_idle_seconds}
        # Rewritten when it changes, and every HEARTBEAT seconds: a host whose service is
        # gone (its desired.json stale) stops keeping pools for it.
        if desired != self._desired or time.time() - self._desired_at > HEARTBEAT:
            write_json(self.folder / DESIRED, {**desired, "updated_at": time.time()})
            self._desired = desired
            self._desired_at = time.time()

    @staticmethod
    def _model_dict(block: dict[str, Any]) -> dict[str, Any]:
        from llm_batch.job.spec import ModelSpec

        return ModelSpec.model_validate(block).model_dump()

    def run(
        self,
        job_id: str,
        *,
        spec_path: Path,
        status: str,
        pools: dict[str | None, str],
        retry_errors: bool = False,
    ) -> None:
        """Run a small job in the host (``retry_errors``: only its rows with errors)."""
        self.mailbox.send(
            "run",
            {
                "job_id": job_id,
                "retry_errors": retry_errors,
                "spec": str(spec_path),
                "status": status,
                "pools": {"" if k is None else k: v for k, v in pools.items()},
            },
        )

    def cancel(self, job_id: str) -> None:
        self.mailbox.send("cancel", {"job_id": job_id})

    def host_alive(self) -> bool:
        """The host wrote its state lately (it does every second or two while it runs)."""
        return bool(self.state())

    def state(self) -> dict[str, Any]:
        """What the host last reported (``{}`` when it has not, or not lately)."""
        state = read_json(self.folder / STATE) or {}
        if time.time() - float(state.get("updated_at") or 0) > _STALE_STATE:
            return {}
        return state

    def list(self) -> list[dict[str, Any]]:
        """Every pool the host reports or the service wants, for ``GET /v1/engines``."""
        reported = self.state().get("pools") or {}
        wanted = (self._desired or read_json(self.folder / DESIRED) or {}).get("pools") or {}
        out = []
        for name in sorted(set(reported) | set(wanted)):
            state = reported.get(name) or {"status": "STARTING"}
            want = wanted.get(name) or {}
            model = state.get("model") or want.get("model") or {}
            out.append(
                {
                    "id": name,
                    "model": self._model_label(model),
                    "path": model.get("path"),
                    "state": str(state.get("status", "STARTING")).lower(),
                    "replicas": state.get("replicas", 0),
                    "warm": bool(want.get("warm") or state.get("warm")),
                    "jobs": sorted(
                        set(want.get("jobs") or []) | set(state.get("jobs_attached") or [])
                    ),
                    "requests": state.get("requests", 0),
                    "requests_by_job": state.get("jobs_in_engine") or {},
                    "running": state.get("running"),
                    "waiting": state.get("waiting"),
                    "idle_since": state.get("idle_since"),
                    "error": state.get("error"),
                }
            )
        return out

    def _model_label(self, model: dict[str, Any]) -> str | None:
        """The catalog's name of a pool's model, else its path (a pool of LoRA adapters:
        its base model's, marked)."""
        if not model:
            return None
        if model.get("lora"):
            base = self._model_label({**model, "lora": None})
            return f"{base} (LoRA adapters)"
        key = pool_key(model)
        for name in self.catalog.names:
            with contextlib.suppress(Exception):
                if pool_key(self._model_dict(self.catalog.block(name, field="model"))) == key:
                    return name
        return model.get("path")

    def get(self, pool_id: str) -> dict[str, Any]:
        for pool in self.list():
            if pool["id"] == pool_id:
                return pool
        raise PoolNotFound(pool_id)

    def release(self, pool_id: str) -> dict[str, Any]:
        """Release a pool now; ``JobConflict`` while jobs use it."""
        if not pool_id.startswith(POOL_PREFIX):
            raise PoolNotFound(pool_id)
        pool = self.get(pool_id)
        if pool["jobs"]:
            raise JobConflict(
                f"engine pool {pool_id} serves running jobs ({', '.join(pool['jobs'])}); "
                "cancel them first"
            )
        self._unwarmed.add(pool_id)
        self.mailbox.send("release", {"pool": pool_id})
        return {**pool, "state": "releasing"}


def _python() -> str:
    import sys

    return sys.executable
