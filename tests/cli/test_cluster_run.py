"""``llm-batch run --address``: the job's driver runs as a Ray job on a real Ray head.

A ``ray start --head`` on loopback (its own session, stopped with everything that
worked for it), the tiny model, one small job. The first ``llm-batch run`` is
interrupted (SIGINT) right after submitting: it stops following and says how to
follow or stop the job, which goes on. The same command again (with the head's GCS
address this time, which Ray turns into the dashboard's URL) follows that same Ray
job to its end with the usual final line. The output holds every row once, and
the Jobs API shows one Ray job that ran the driver.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_batch.service.process import free_port
from llm_batch.service.raycluster import LocalRayHead

pytestmark = [pytest.mark.e2e]

ROWS = 12


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRayHead]:
    head = LocalRayHead(
        port=free_port(),
        dashboard_port=free_port(),
        client_server_port=free_port(),
        dashboard_agent_port=free_port(),
        num_cpus=4,
    )
    try:
        head.start()
        yield head
    finally:
        head.stop(remove_temp_dir=True)


def cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "llm_batch.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: the SIGINT below reaches only it
    )


def driver_process(head: LocalRayHead, timeout: float = 60.0):  # noqa: ANN201
    """The job driver's process on the head (it appears once Ray has started it)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in head.processes():
            with contextlib.suppress(psutil.Error):
                if "llm_batch.pipeline.driver" in " ".join(proc.cmdline()):
                    return proc
        time.sleep(0.1)
    raise AssertionError("the job's driver never started")


def test_run_with_an_address_runs_the_driver_as_a_ray_job(
    ray_head: LocalRayHead, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pq.write_table(
        pa.table({"id": list(range(ROWS)), "text": [f"item {i}" for i in range(ROWS)]}),
        tmp_path / "in.parquet",
    )
    (tmp_path / "job.yaml").write_text(
        f"""
name: cluster-run
input: {{path: in.parquet}}          # relative: made absolute before it travels
prompt: {{template: "{{{{ text }}}}:"}}
model:
  path: {tiny_model}
  engine: {{max_model_len: 256, dtype: bfloat16, enforce_eager: true}}
sampling: {{max_tokens: 4}}
carryover: [id]
output: {{path: out}}
"""
    )
    run = ("run", "job.yaml", "--address")

    first = cli(*run, ray_head.dashboard_url, cwd=tmp_path)
    try:
        assert first.stderr is not None
        said: list[str] = []
        while not said or not (said[-1].startswith("submitted ") or said[-1] == ""):
            said.append(first.stderr.readline())  # "" at EOF
        assert said[-1].startswith("submitted cluster-run to the Ray cluster at "), said
        submission_id = said[-1].strip().rsplit(" as ", 1)[1]
        # The job's driver held (SIGSTOP) until the Ctrl-C has been handled: the job is
        # provably still running when the command stops following it.
        driver = driver_process(ray_head)
        driver.send_signal(signal.SIGSTOP)
        try:
            first.send_signal(signal.SIGINT)
            _, err = first.communicate(timeout=60)
        finally:
            driver.send_signal(signal.SIGCONT)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    assert f"{submission_id} keeps running on the Ray cluster" in err
    assert f"ray job stop {submission_id} --address {ray_head.dashboard_url}" in err

    second = cli(*run, ray_head.address, cwd=tmp_path)
    try:
        out, err = second.communicate(timeout=600)
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 0, err[-4000:]
    assert f"following {submission_id}" in err
    final = out.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"wrote {ROWS} rows \(0 with errors\) to {re.escape(str(tmp_path / 'out'))} in [\d.]+s",
        final,
    ), out

    table = pq.read_table(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == list(range(ROWS))
    assert table.column("error").null_count == ROWS

    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the client would take it over ours
    jobs = JobSubmissionClient(ray_head.dashboard_url).list_jobs()
    assert [j.submission_id for j in jobs] == [submission_id]
    (job,) = jobs
    assert job.status == JobStatus.SUCCEEDED
    assert "-m llm_batch.pipeline.driver spec.json" in job.entrypoint
    assert job.metadata["llm_batch_output"] == str(tmp_path / "out")


def test_run_without_an_address_starts_its_own_ray_despite_a_stale_ray_start():
    """Ray's own ``ray.init()`` joins whatever cluster ``ray start`` last recorded under
    the Ray temp dir, even one long dead, and then refuses ``num_cpus``. Without an
    address, llm-batch starts a private local Ray instead."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # nobody there
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TMPDIR")} | {
            "RAY_TMPDIR": str(ray_tmp)
        }
        code = (
            "import ray\n"
            "from llm_batch.pipeline.run import ensure_ray\n"
            "ensure_ray()\n"
            "print('GCS', ray.get_runtime_context().gcs_address)\n"
            "ray.shutdown()\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr[-3000:]
        gcs = re.search(r"^GCS (\S+)$", done.stdout, re.M)
        assert gcs and not gcs.group(1).endswith(":1"), done.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
