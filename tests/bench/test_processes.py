"""A run's processes: memory summed over the tree, and only marked processes ended."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import psutil

from llm_batch.bench.processes import MARKER_ENV, MemorySampler, find_marked, stop_marked

MIB = 1 << 20

# A parent holding 64 MiB that starts a child holding 64 MiB; both then wait.
_TREE = f"""
import subprocess, sys, time
held = b"x" * (64 * {MIB})
child = subprocess.Popen([sys.executable, "-c",
    "import time; held = b'y' * (64 * {MIB}); print('up', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE)
child.stdout.readline()
print("up", flush=True)
time.sleep(600)
"""


def _start_tree(marker: str) -> subprocess.Popen:
    env = {**os.environ, MARKER_ENV: marker}
    proc = subprocess.Popen(
        [sys.executable, "-c", _TREE], env=env, stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"up"
    return proc


def test_memory_is_summed_over_the_tree_and_the_tree_is_ended():
    marker = uuid.uuid4().hex
    proc = _start_tree(marker)
    try:
        sampler = MemorySampler(proc.pid, marker, interval=0.05)
        total = sampler.sample()
        assert total >= 128 * MIB
        assert len(sampler.peak.processes) == 2
        assert sampler.metric in ("pss", "pss+rss")
        sampler.start()
        time.sleep(0.3)
        sampler.stop()
        assert len(sampler.series) >= 3
        # Quick samples carry their CPU total, which only grows.
        cpus = [cpu for _, _, _, cpu in sampler.series]
        assert None not in cpus and cpus == sorted(cpus)

        assert {p.pid for p in find_marked(marker)} >= {proc.pid}
        ended = stop_marked(marker, grace=5)
        assert len(ended) == 2
        assert find_marked(marker) == []
        assert proc.wait(timeout=5) is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


def test_unmarked_processes_are_left_alone():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert stop_marked(uuid.uuid4().hex, grace=1) == []
        assert psutil.pid_exists(other.pid) and other.poll() is None
    finally:
        other.kill()
        other.wait()
