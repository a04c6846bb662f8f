"""``llm-batch serve`` as a child process on loopback, for the demo and the end-to-end tests.

It gets free ports for itself and for its local Ray head (so it never meets
another Ray on the machine), its own session (a signal to the caller's
process group does not reach it), and a log file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llm_batch.service.client import JobsClient
from llm_batch.service.errors import ServiceUnavailable
from llm_batch.service.raycluster import LocalRayHead

__all__ = ["ServiceProcess", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        ray_ports: dict[str, int] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        api_key: str | None = None,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        # The same Ray ports across a restart, so the restarted service finds its head.
        self.ray_ports = ray_ports or {
            "ray_port": free_port(),
            "ray_dashboard_port": free_port(),
            "ray_client_server_port": free_port(),
            "ray_dashboard_agent_port": free_port(),
        }
        self.extra_env = dict(env or {})
        self.api_key = api_key  # for the readiness probe of a service with keys
        self.log_path = Path(log_path) if log_path else self.data_dir / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ray_head(self) -> LocalRayHead:
        return LocalRayHead(
            port=self.ray_ports["ray_port"],
            dashboard_port=self.ray_ports["ray_dashboard_port"],
            client_server_port=self.ray_ports["ray_client_server_port"],
            dashboard_agent_port=self.ray_ports["ray_dashboard_agent_port"],
            num_cpus=1,
        )

    def start(self, *, timeout: float = 180.0) -> ServiceProcess:
        """Start the service and wait until ``/readyz`` says the database and Ray are up."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Not the caller's service settings (LLM_BATCH_DB would share its database) nor
        # its cluster: this service is self-contained.
        env = {
            k: v
            for k, v in os.environ.items()
            if k != "RAY_ADDRESS" and not k.startswith("LLM_BATCH_")
        }
        env.update({f"LLM_BATCH_{k.upper()}": str(v) for k, v in self.ray_ports.items()})
        env.update(self.extra_env)
        cmd = [
            sys.executable, "-m", "llm_batch.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        try:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        with JobsClient(self.url, timeout=5, api_key=self.api_key) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServiceUnavailable(
                        f"the service exited with code {self.proc.returncode}; its log "
                        f"({self.log_path}) ends with:\n{self.log_tail()}"
                    )
                if client.ready():
                    return self
                time.sleep(0.5)
        raise ServiceUnavailable(
            f"the service at {self.url} was not ready after {timeout:.0f}s; its log "
            f"({self.log_path}) ends with:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the service process alone, as a crash would (its Ray head lives on)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, *, timeout: float = 60.0) -> None:
        """A clean shutdown (SIGTERM), then SIGKILL if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def stop_ray(self, *, remove_temp_dir: bool = True) -> int:
        """Stop the local Ray head of this service (whoever started it) and, by default,
        delete its temp folder: its ports were picked for this run only."""
        return self.ray_head.stop(remove_temp_dir=remove_temp_dir)
