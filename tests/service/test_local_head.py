"""``LocalRayHead.stop`` ends every process the head started, the Ray Client proxy too.

That proxy is started by ``ray start --head``, which exits: it is nobody's child and
names neither the head's temp folder nor a raylet, so it was left running after each
stop. A real head on loopback, started and stopped.
"""

from __future__ import annotations

import contextlib
import time

import psutil
import pytest

from llm_batch.service.process import free_port
from llm_batch.service.raycluster import LocalRayHead

pytestmark = [pytest.mark.e2e]


def _client_proxies(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info.get("cmdline") or []
        if "ray.util.client.server" in args and f"--port={port}" in args:
            found.append(proc)
    return found


def test_stop_ends_the_heads_ray_client_proxy() -> None:
    head = LocalRayHead(
        port=free_port(),
        dashboard_port=free_port(),
        client_server_port=free_port(),
        dashboard_agent_port=free_port(),
        num_cpus=1,
    )
    try:
        head.start()
        deadline = time.monotonic() + 30
        while not _client_proxies(head.client_server_port) and time.monotonic() < deadline:
            time.sleep(0.2)
        proxies = _client_proxies(head.client_server_port)
        assert proxies, "the head started no Ray Client proxy on its port"
        assert {p.pid for p in proxies} <= {p.pid for p in head.processes()}
        head.stop(remove_temp_dir=True)
        gone, alive = psutil.wait_procs(proxies, timeout=10)
        assert not alive, f"still running after stop: {[p.pid for p in alive]}"
    finally:
        for proc in head.processes():  # whatever a failed assertion left
            with contextlib.suppress(psutil.Error):
                proc.kill()
        head.stop(remove_temp_dir=True)
