"""Scale-out on a real multi-node Ray cluster (several raylets on this machine).

Engines land only on nodes with the accelerator they ask for, two replicas run
on two different nodes, and after one node is removed mid-job the output still
holds every input row exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline.multinode import ROWS

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

ROOT = Path(__file__).resolve().parents[2]


def engine_cores() -> set[int]:
    """vLLM engine processes whose owner is gone (orphans, adopted by init): what a removed
    node or a shut-down cluster must not leave. Engines of other work running on this
    machine still have their owner, and are not counted."""
    import psutil

    found = set()
    for p in psutil.process_iter(["name", "cmdline", "ppid"]):
        text = (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])
        if ("EngineCore" in text or "VLLM::Worker" in text) and p.info["ppid"] in (0, 1):
            found.add(p.pid)
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model):
    before = engine_cores()
    out = tmp_path_factory.mktemp("multinode")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.pipeline.multinode", str(tiny_model), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"},
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MULTINODE-REPORT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(line.removeprefix("MULTINODE-REPORT "))
    # Engines of the removed node and of the shut-down cluster must not linger.
    import time

    deadline = time.time() + 30
    while engine_cores() - before and time.time() < deadline:
        time.sleep(1)
    result["leftover_engines"] = sorted(engine_cores() - before)
    return result


def test_engines_only_on_nodes_with_the_accelerator(report):
    h100 = {report["node_ids"][n] for n in ("h100-1", "h100-2", "h100-3")}
    used = {e["node_id"] for e in report["engines"]}
    assert used <= h100, "an engine ran on a node without an H100"
    assert report["node_ids"]["a10"] not in used


def test_two_replicas_on_two_nodes(report):
    assert len(report["concurrent_nodes"]) >= 2


def test_node_removed_mid_job_output_exactly_once(report):
    assert report["removed"], "no node was removed"
    assert report["ids"] == list(range(ROWS))
    assert report["rows"] == ROWS
    assert report["errors"] == 0


def test_no_engine_process_outlives_its_node(report):
    assert report["leftover_engines"] == [], "orphaned vLLM engine processes"
