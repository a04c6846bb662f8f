"""The Ray cluster jobs run on: the one named by ``RAY_ADDRESS``, or a local head.

The local head is a separate daemon (``ray start --head``), not a child of the
service: when the service is restarted, or killed, the head and the jobs on it
keep running, and the next service start finds the head on the same ports and
follows those jobs again. Everything of one head (its daemons, their workers,
the vLLM engine processes of those workers) is found through its own temp
directory, so stopping it never touches another Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llm_batch.service.errors import ServiceUnavailable
from llm_batch.service.settings import Settings

__all__ = ["LocalRayHead", "RayCluster"]

logger = logging.getLogger(__name__)

_LOOPBACK = "127.0.0.1"
# Idle workers Ray keeps (by default one per CPU, the rest killed within a second): a
# service runs many jobs, each a Ray job with workers of its own, and a small job that
# starts a worker process pays seconds for it on a busy machine.
SERVICE_RAY_CONFIG = {"num_workers_soft_limit": 16}


def _port_open(port: int, host: str = _LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class LocalRayHead:
    """A single-node Ray head on loopback, with every fixed port chosen by the caller."""

    def __init__(
        self,
        *,
        port: int,
        dashboard_port: int,
        client_server_port: int,
        dashboard_agent_port: int,
        num_cpus: int,
    ):
        self.port = port
        self.dashboard_port = dashboard_port
        self.client_server_port = client_server_port
        self.dashboard_agent_port = dashboard_agent_port
        self.num_cpus = num_cpus
        # Short on purpose: Ray puts unix sockets under it (108-byte path limit).
        self.temp_dir = Path(tempfile.gettempdir()) / f"llm-batch-ray-{port}"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalRayHead:
        return cls(
            port=settings.ray_port,
            dashboard_port=settings.ray_dashboard_port,
            client_server_port=settings.ray_client_server_port,
            dashboard_agent_port=settings.ray_dashboard_agent_port,
            num_cpus=settings.num_cpus,
        )

    @property
    def address(self) -> str:
        return f"{_LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{_LOOPBACK}:{self.dashboard_port}"

    def jobs_api_up(self, timeout: float = 2.0) -> bool:
        """The dashboard answers and its Jobs API is serving."""
        try:
            with httpx.Client(base_url=self.dashboard_url, timeout=timeout, trust_env=False) as c:
                return c.get("/api/version").is_success and c.get("/api/jobs/").is_success
        except httpx.HTTPError:
            return False

    def ensure(self, *, timeout: float = 120.0) -> bool:
        """Reuse the head already up on these ports, or start one; True when started here."""
        if self.jobs_api_up():
            logger.info(
                "reusing the Ray head at %s (dashboard %s)", self.address, self.dashboard_url
            )
            return False
        if _port_open(self.port):
            # A head on this port that is still starting, or something else entirely.
            if self._wait_up(min(timeout, 60.0)):
                logger.info("reusing the Ray head at %s", self.address)
                return False
            raise ServiceUnavailable(
                f"port {self.port} is in use but no Ray dashboard answers at {self.dashboard_url}; "
                "free the port or choose other ones (LLM_BATCH_RAY_PORT, "
                "LLM_BATCH_RAY_DASHBOARD_PORT)"
            )
        self.start(timeout=timeout)
        return True

    def start(self, *, timeout: float = 120.0) -> None:
        from llm_batch.pipeline.run import LOCAL_RAY_SYSTEM_CONFIG

        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
            f"--node-ip-address={_LOOPBACK}",
            f"--port={self.port}",
            f"--dashboard-host={_LOOPBACK}",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={self.client_server_port}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_port}",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            f"--system-config={json.dumps({**LOCAL_RAY_SYSTEM_CONFIG, **SERVICE_RAY_CONFIG})}",
        ]  # fmt: skip
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
        }
        env["RAY_AUTH_MODE"] = "disabled"  # loopback only; no token to hand around
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Serve's controller looks at every deployment ten times a second by default, a
        # few percent of a core on this head's small machine, where the engines need every
        # cycle; twice a second only delays its reactions (a replica replaced, a pool
        # scaled), each already seconds long, by at most 0.4 s.
        env.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
        logger.info(
            "starting a local Ray head at %s (dashboard %s)", self.address, self.dashboard_url
        )
        started = time.monotonic()
        # Its own session: Ctrl-C on the service's terminal, or a signal to the
        # service's process group, must not reach the head and the jobs on it.
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ServiceUnavailable(f"`ray start --head` failed (exit {proc.returncode}):\n{tail}")
        if not self._wait_up(max(timeout - (time.monotonic() - started), 10.0)):
            raise ServiceUnavailable(
                f"the local Ray head started but its Jobs API at {self.dashboard_url} does not "
                f"answer; see the logs under {self.temp_dir}/session_latest/logs"
            )
        logger.info("local Ray head up in %.1fs", time.monotonic() - started)

    def _wait_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.jobs_api_up():
                return True
            time.sleep(0.5)
        return False

    def processes(self) -> list:  # list[psutil.Process]
        """This head's daemons and every process that works for it: its workers and their
        children (vLLM engine cores), found below the daemons or, once orphaned, by the
        ``RAY_RAYLET_PID`` they inherited from a worker."""
        import psutil

        marker = str(self.temp_dir)
        # The head's Ray Client proxy names neither the temp folder nor a raylet, and
        # `ray start` (its parent) has exited: it is known by the port it serves.
        client_server = ("ray.util.client.server", f"--port={self.client_server_port}")
        roots = []
        everyone = list(psutil.process_iter(["cmdline", "name"]))
        for proc in everyone:
            args = proc.info.get("cmdline") or []
            # Ray's daemons are its binaries and Python scripts; not, say, a `tail` of its logs.
            if not args or not ("ray" in args[0] or "python" in args[0]):
                continue
            ours = any(a == marker or a.endswith("=" + marker) or marker + "/" in a for a in args)
            if ours or all(word in args for word in client_server):
                roots.append(proc)
        found = {p.pid: p for p in roots}
        for root in roots:
            try:
                for child in root.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.Error:
                continue
        raylets = {str(p.pid) for p in roots if p.info.get("name") == "raylet"}
        for proc in everyone:
            if proc.pid in found or not raylets:
                continue
            try:
                if proc.environ().get("RAY_RAYLET_PID") in raylets:
                    found[proc.pid] = proc
            except psutil.Error:
                continue
        return list(found.values())

    def engine_processes(self) -> list:  # list[psutil.Process]
        """The vLLM engine processes working for this head."""
        return [p for p in self.processes() if "EngineCore" in _name(p)]

    def stop(self, *, grace: float = 10.0, remove_temp_dir: bool = False) -> int:
        """Stop this head and everything working for it; returns how many processes were
        ended. ``remove_temp_dir`` also deletes its logs (for throwaway heads)."""
        import psutil

        procs = self.processes()  # snapshot first: workers lose their parent once it goes
        if not procs:
            if remove_temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            return 0
        # The raylet first: on SIGTERM it ends its workers, which end their engines.
        raylets = [p for p in procs if _name(p) == "raylet"]
        _signal(raylets, "terminate")
        psutil.wait_procs(raylets, timeout=grace / 2)
        _signal(procs, "terminate")
        _, alive = psutil.wait_procs(procs, timeout=grace / 2)
        # The GCS can linger for a long time flushing metrics; nothing it holds is needed.
        _signal(alive, "kill")
        psutil.wait_procs(alive, timeout=5)
        logger.info("stopped the local Ray head at %s (%d processes)", self.address, len(procs))
        if remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return len(procs)


def _name(proc: object) -> str:
    import psutil

    try:
        return proc.name()  # type: ignore[attr-defined,no-any-return]
    except psutil.Error:
        return ""


def _signal(procs: list, how: str) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            getattr(p, how)()


class RayCluster:
    """Where jobs run: ``settings.ray_address`` when set, else a local head on loopback."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.head = None if settings.ray_address else LocalRayHead.from_settings(settings)

    @property
    def local(self) -> bool:
        return self.head is not None

    @property
    def jobs_address(self) -> str:
        """What ``JobSubmissionClient`` is given: a dashboard URL or a cluster address."""
        return self.head.dashboard_url if self.head is not None else str(self.settings.ray_address)

    def ensure(self) -> None:
        """Make sure the cluster is there (starting the local head if needed)."""
        if self.head is not None:
            self.head.ensure()

    def stop(self) -> int:
        """Stop the local head (a no-op for a cluster named by address)."""
        return self.head.stop() if self.head is not None else 0
