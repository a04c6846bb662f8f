"""``llm-batch run --address``: what the command does around the Ray job it submits.

Ray's Jobs API is replaced at its seam (``RayJobs``) by an in-memory cluster whose
"driver" is a script of Ray states and status files written with the driver's own
``StatusFile``; what is under test is the command (what it submits, what it shows
and prints, its exit codes, Ctrl-C). The real thing, on a real Ray head with the
real engine, is ``tests/cli/test_cluster_run.py``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_batch.cli import main
from llm_batch.cli.cluster import on_this_machine
from llm_batch.drivers import submission_metadata
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.driver import StatusFile
from llm_batch.pipeline.manifest import Manifest
from llm_batch.service.errors import ServiceUnavailable
from llm_batch.service.process import free_port

REMOTE = "http://10.255.0.1:8265"  # never contacted: the cluster is in memory


def progress(done: int, failed: int = 0) -> dict[str, Any]:
    return {"rows_total": 4, "rows_done": done, "rows_failed": failed, "output_tokens": 3 * done}


class InMemoryCluster:
    """Ray's Jobs API for one scripted driver: each ``status`` call takes the next step,
    ``(ray_state, driver_state, progress, error)``; the last step repeats."""

    def __init__(self, out: Path, steps: list[Any]):
        self.status_file = StatusFile(str(out / "_status.json"), every=0)
        self.steps = list(steps)
        self.submitted: list[dict[str, Any]] = []
        self.unfinished: dict[str, dict[str, str]] = {}
        self.state: dict[str, str] = {}
        self.logs = ""

    def submit(self, submission_id, entrypoint, *, runtime_env=None, metadata=None) -> bool:
        folder = Path(runtime_env["working_dir"])
        self.submitted.append(
            {
                "id": submission_id,
                "entrypoint": entrypoint,
                "runtime_env": runtime_env,
                "metadata": metadata,
                "spec": json.loads((folder / "spec.json").read_text()),
                "stale_status": self.status_file._uri and Path(self.status_file._uri).exists(),
            }
        )
        self.unfinished[submission_id] = dict(metadata or {})
        self.state[submission_id] = "PENDING"
        return True

    def status(self, submission_id):
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, BaseException):
            raise step
        ray_state, driver_state, snap, error = step
        if driver_state is not None:
            # As the real driver does: the output folder is claimed before its status.
            out = str(Path(self.status_file._uri).parent)
            if Manifest.read(out) is None:
                Manifest("job", files=["_status.json"]).write(out)
            self.status_file.write(driver_state, snap, error, force=True)
        if ray_state not in ("PENDING", "RUNNING"):
            self.unfinished.pop(submission_id, None)
        return ray_state

    def unfinished_metadata(self) -> dict[str, dict[str, str]]:
        return dict(self.unfinished)

    def failure(self, submission_id, *, lines=20) -> str:
        return self.logs


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    # main() sets RAY_ADDRESS from --address: set-then-delete makes monkeypatch remove it
    # afterwards even when it was not set before.
    monkeypatch.setenv("RAY_ADDRESS", "unset")
    monkeypatch.delenv("RAY_ADDRESS")
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": list("abcd")}), tmp_path / "in.parquet")
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: on-cluster\n"
        "input: {path: in.parquet}\n"
        'prompt: {template: "{{ text }}"}\n'
        "model: {path: org/hub-model}\n"
        "carryover: [id]\n"
        "output: {path: out}\n"
    )
    return path


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``cluster(steps)``: the in-memory cluster every ``RayJobs(address)`` is."""
    made: list[InMemoryCluster] = []

    def make(steps: list[Any]) -> InMemoryCluster:
        made.append(InMemoryCluster(tmp_path / "out", steps))
        return made[-1]

    monkeypatch.setattr("llm_batch.cli.cluster.RayJobs", lambda address: made[-1])
    monkeypatch.setattr("llm_batch.cli.cluster.time.sleep", lambda s: None)
    return make


SUCCESS = [
    ("PENDING", None, None, None),
    ("RUNNING", "running", progress(2), None),
    ("SUCCEEDED", "succeeded", progress(4, failed=1), None),
]


def run(job: Path, address: str = REMOTE) -> int:
    return main(["run", str(job), "--address", address])


def test_submits_the_driver_and_prints_the_local_runs_final_line(job, cluster, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    # An earlier run's status file, in a folder llm-batch wrote (its manifest says so).
    Manifest("job", files=["_status.json"]).write(str(tmp_path / "out"))
    StatusFile(str(tmp_path / "out" / "_status.json")).write("succeeded", progress(4), force=True)
    ray = cluster(SUCCESS)
    assert run(job) == 0
    out, err = capsys.readouterr()
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith(f"wrote 4 rows (1 with errors) to {tmp_path / 'out'} in ")
    )
    (sub,) = ray.submitted
    assert f"submitted on-cluster to the Ray cluster at {REMOTE} as {sub['id']}" in err
    assert sub["id"].startswith("llm-batch-on-cluster-")
    assert sub["entrypoint"] == "python -m llm_batch.pipeline.driver spec.json"
    assert sub["runtime_env"]["env_vars"]["VLLM_LOGGING_LEVEL"]
    # The service's scheduler tags its drivers the same way: each refuses the other's output.
    assert sub["metadata"] == submission_metadata(JobSpec.from_dict(sub["spec"]))
    assert sub["metadata"]["llm_batch_output"] == str(tmp_path / "out")
    assert not sub["stale_status"], "an earlier run's status file would show as progress"
    # The driver runs in the Ray job's working directory: the spec's paths are absolute.
    assert sub["spec"]["input"]["path"] == str(tmp_path / "in.parquet")
    assert sub["spec"]["output"]["path"] == str(tmp_path / "out")
    assert sub["spec"]["model"]["path"] == "org/hub-model"


def test_a_cluster_on_this_machine_runs_the_driver_with_this_python(job, cluster):
    ray = cluster(SUCCESS)
    assert run(job, "http://127.0.0.1:8265") == 0
    assert ray.submitted[0]["entrypoint"].startswith(shlex.quote(sys.executable) + " -m ")


@pytest.mark.parametrize(
    ("steps", "logs", "code", "needle"),
    [
        (
            [("RUNNING", "running", progress(1), None),
             ("FAILED", "failed", progress(1), "input.path: 'x' cannot be read")],
            "", 1, "llm-batch: error: input.path: 'x' cannot be read",
        ),
        (
            [("RUNNING", None, None, None), ("FAILED", None, None, None)],
            "Traceback...\nModuleNotFoundError: No module named 'llm_batch'", 1,
            "llm-batch: error: the job driver ended with an error:\nTraceback...\n"
            "ModuleNotFoundError: No module named 'llm_batch'",
        ),
        (
            [("RUNNING", "running", progress(3), None), ("STOPPED", None, None, None)],
            "", 1, "was stopped on the cluster; 3 rows are in",
        ),
        (
            [("RUNNING", None, None, None), (None, None, None, None)],
            "", 2, "the Ray cluster no longer knows llm-batch-on-cluster-",
        ),
    ],
    ids=["driver-error", "log-tail", "stopped", "forgotten"],
)  # fmt: skip
def test_a_job_that_does_not_succeed_exits_non_zero_saying_why(
    job, cluster, capsys, steps, logs, code, needle
):
    cluster(steps).logs = logs
    assert run(job) == code
    out, err = capsys.readouterr()
    assert needle in err, err
    assert "wrote" not in out


def test_ctrl_c_stops_following_and_says_how_to_follow_or_stop(job, cluster, capsys):
    ray = cluster([("RUNNING", "running", progress(1), None), KeyboardInterrupt()])
    assert run(job) == 130
    err = capsys.readouterr().err
    sid = ray.submitted[0]["id"]
    assert f"stopped following; {sid} keeps running on the Ray cluster" in err
    assert "run the same command again to follow it" in err
    assert f"ray job logs {sid} --follow --address {REMOTE}" in err
    assert f"ray job stop {sid} --address {REMOTE}" in err

    # The same command again follows that job; no second driver writes the same output.
    ray.steps = list(SUCCESS)
    assert run(job) == 0
    out, err = capsys.readouterr()
    assert len(ray.submitted) == 1
    assert f"following {sid}, which already runs this job on the cluster" in err
    assert out.strip().splitlines()[-1].startswith("wrote 4 rows (1 with errors) to ")


def test_another_job_still_writing_the_output_is_refused(job, cluster, tmp_path, capsys):
    ray = cluster(SUCCESS)
    ray.unfinished["llm-batch-other-1234"] = {
        "llm_batch_output": str(tmp_path / "out"),
        "llm_batch_spec": "another spec",
    }
    assert run(job) == 2
    err = capsys.readouterr().err
    assert f"output.path: '{tmp_path / 'out'}' is being written by llm-batch-other-1234" in err
    assert "ray job stop llm-batch-other-1234" in err
    assert not ray.submitted


def test_a_dashboard_that_stays_unreachable_ends_following(job, cluster, monkeypatch, capsys):
    monkeypatch.setattr("llm_batch.cli.cluster.UNREACHABLE_GRACE", -1.0)
    cluster([("RUNNING", None, None, None), ServiceUnavailable("Ray at x is not reachable")])
    assert run(job) == 2
    err = capsys.readouterr().err
    assert "stopped following llm-batch-on-cluster-" in err and "ray job stop" in err


def test_an_unreachable_cluster_fails_in_one_line(job, capsys):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens
    assert run(job, address) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llm-batch: error: Ray at {address} is not reachable"), err


@pytest.mark.parametrize(
    ("address", "here"),
    [
        ("auto", True),
        ("localhost:6379", True),
        ("127.0.0.1:6379", True),
        ("ray://127.0.0.1:10001", True),
        ("http://[::1]:8265", True),
        ("http://127.0.0.1:8265", True),
        (REMOTE, False),
        ("ray://head.invalid:10001", False),
        ("head.invalid:6379", False),
    ],
)
def test_on_this_machine(address, here):
    assert on_this_machine(address) is here
