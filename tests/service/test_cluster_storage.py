"""Cluster mode: a job's paths must be on storage every node of the Ray cluster reaches.

With ``RAY_ADDRESS`` set the service runs jobs on that cluster, so a path on the
service's own disk is refused at submission (422, naming the field) unless it lies
under a folder the settings declare shared (``LLM_BATCH_SHARED_ROOTS``); object
storage URIs are always reachable. The service does not start when its own data
directory is not shared. No Ray and no engine: the scheduler is off and the cluster's
address is never contacted.

``SUBMISSION`` is the table: one row per path a job may name, with the status and a
substring of ``detail``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from llm_batch.cli import main
from llm_batch.errors import JobSpecError
from llm_batch.service.app import create_app
from llm_batch.service.errors import SettingsError
from llm_batch.service.settings import Settings
from llm_batch.service.storage import SharedStorage

CLUSTER = "http://ray-head.example:8265"  # never contacted: the scheduler is off


@dataclasses.dataclass(frozen=True)
class World:
    shared: Path  # declared shared; holds the data directory
    local: Path  # a storage root too, but only on the service's machine
    client: TestClient


def write_world(base: Path) -> tuple[Path, Path, Path]:
    shared, local = base / "shared", base / "local"
    reviews = pa.table({"id": [1, 2, 3], "text": ["great", "awful", "fine"]})
    for folder in (shared, local):
        (folder / "models" / "m").mkdir(parents=True)
        (folder / "models" / "m" / "config.json").write_text("{}")  # never loaded here
        pq.write_table(reviews, folder / "reviews.parquet")
    (shared / "link.parquet").symlink_to(local / "reviews.parquet")
    (shared / "mixed").mkdir()
    pq.write_table(reviews, shared / "mixed" / "a.parquet")
    (shared / "mixed" / "b.parquet").symlink_to(local / "reviews.parquet")
    # The catalog's model is the operator's choice: allowed on the service's disk.
    (local / "models" / "catalog").mkdir()
    (local / "models" / "catalog" / "config.json").write_text("{}")
    models = base / "models.yaml"
    models.write_text(
        f"tiny:\n  path: {local / 'models' / 'catalog'}\n  engine: {{max_model_len: 256}}\n"
    )
    return shared, local, models


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("cluster")
    shared, local, models = write_world(base)
    settings = Settings(
        data_dir=shared / "data",
        ray_address=CLUSTER,
        shared_roots=str(shared),
        storage_roots=f"{base},s3://bucket/prefix",
        models=models,
    )
    with TestClient(create_app(settings, run_scheduler=False)) as client:
        yield World(shared, local, client)


def job(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "cluster",
        "input": {"path": "{shared}/reviews.parquet"},
        "prompt": {"template": "Review: {{ text }}\nSentiment:"},
        "model": {"path": "org/hub-model"},
        "sampling": {"max_tokens": 4},
        "carryover": ["id"],
    }
    body.update(changes)
    return body


def fill(value: Any, world: World) -> Any:
    if isinstance(value, str):
        return value.replace("{shared}", str(world.shared)).replace("{local}", str(world.local))
    if isinstance(value, dict):
        return {k: fill(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, world) for v in value]
    return value


# fmt: off
SUBMISSION: list[tuple[str, dict[str, Any], int, str]] = [
    # id, job, status, substring of detail
    ("input-under-a-shared-folder", job(), 201, ""),
    ("input-on-the-service-disk", job(input={"path": "{local}/reviews.parquet"}), 422,
     "input.path: '{local}/reviews.parquet' is on the service's machine only"),
    ("input-file-uri-on-the-service-disk", job(input={"path": "file://{local}/reviews.parquet"}),
     422, "input.path: "),
    ("input-symlink-out-of-the-shared-folder", job(input={"path": "{shared}/link.parquet"}), 422,
     "input.path: '{local}/reviews.parquet'"),
    ("input-folder-with-a-file-linked-out",
     job(input={"path": "{shared}/mixed", "format": "parquet"}), 422,
     "input.path: '{shared}/mixed/b.parquet' links to '{local}/reviews.parquet', which is on"),
    ("input-outside-the-storage-roots-first", job(input={"path": "/etc/passwd"}), 422,
     "outside the storage roots"),
    ("output-on-the-service-disk", job(output={"path": "{local}/out"}), 422,
     "output.path: '{local}/out' is on"),
    ("output-under-a-shared-folder", job(output={"path": "{shared}/out"}), 201, ""),
    ("output-object-storage", job(output={"path": "s3://bucket/prefix/out"}), 201, ""),
    ("output-unset-goes-to-the-shared-data-dir", job(), 201, ""),
    ("model-folder-on-the-service-disk", job(model={"path": "{local}/models/m"}), 422,
     "model.path: '{local}/models/m' is on"),
    ("model-folder-under-a-shared-folder", job(model={"path": "{shared}/models/m"}), 201, ""),
    ("model-from-the-catalog-anywhere", job(model="tiny"), 201, ""),
    ("models-entry-on-the-service-disk",
     job(model=None, models=[{"name": "a", "path": "org/hub-model"},
                             {"name": "b", "path": "{local}/models/m"}]),
     422, "models[1].path: "),
]
# fmt: on


def _body(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if v is not None}


@pytest.mark.parametrize(
    ("case", "spec", "status", "needle"), SUBMISSION, ids=[row[0] for row in SUBMISSION]
)
def test_submission_in_cluster_mode(world: World, case, spec, status, needle):
    response = world.client.post("/v1/jobs", json=fill(_body(spec), world))
    assert response.status_code == status, response.text
    if status == 201:
        return
    detail = response.json()["detail"]
    assert fill(needle, world) in detail, detail
    if "on the service's machine only" in detail:
        # The refusal says where jobs run, what is expected and who can change it.
        assert CLUSTER in detail and "s3://" in detail and str(world.shared) in detail
        assert "LLM_BATCH_SHARED_ROOTS" in detail


def test_what_the_nodes_cannot_do_is_named(world: World):
    said = {}
    for field, spec in (
        ("input", job(input={"path": "{local}/reviews.parquet"})),
        ("output", job(output={"path": "{local}/out"})),
        ("model", job(model={"path": "{local}/models/m"})),
    ):
        said[field] = world.client.post("/v1/jobs", json=fill(spec, world)).json()["detail"]
    assert "cannot read it" in said["input"]
    assert "cannot write there" in said["output"]
    assert "cannot load it" in said["model"]


def test_without_an_address_local_paths_are_fine(tmp_path: Path):
    shared, local, models = write_world(tmp_path)
    settings = Settings(data_dir=tmp_path / "data", storage_roots=str(tmp_path), models=models)
    assert not settings.cluster_mode and settings.shared_storage() is None
    with TestClient(create_app(settings, run_scheduler=False)) as client:
        spec = job(input={"path": f"{local}/reviews.parquet"}, output={"path": f"{local}/out"})
        assert client.post("/v1/jobs", json=spec).status_code == 201


# -- the data directory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shared_roots", "starts"),
    [
        (None, False),
        ("{base}/elsewhere", False),
        ("{base}/data-other", False),  # a sibling whose name starts the same
        ("{base}/data", True),
        ("{base}", True),
        ("/", True),  # a cluster on one machine: everything is shared
        ("{base}/elsewhere, {base}", True),
    ],
)
def test_cluster_mode_needs_a_shared_data_dir(tmp_path: Path, shared_roots, starts):
    roots = shared_roots.replace("{base}", str(tmp_path)) if shared_roots else None
    settings = Settings(data_dir=tmp_path / "data", ray_address=CLUSTER, shared_roots=roots)
    if starts:
        create_app(settings, run_scheduler=False)
        return
    with pytest.raises(SettingsError) as e:
        create_app(settings, run_scheduler=False)
    message = str(e.value)
    assert f"LLM_BATCH_DATA_DIR '{tmp_path / 'data'}'" in message
    assert "LLM_BATCH_SHARED_ROOTS" in message and CLUSTER in message


def test_serve_refuses_to_start_in_one_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", CLUSTER)
    monkeypatch.delenv("LLM_BATCH_SHARED_ROOTS", raising=False)
    assert main(["serve", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-batch: error: LLM_BATCH_DATA_DIR") and "\n" not in err


def test_serve_names_a_bad_setting_in_one_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_BATCH_SHARED_ROOTS", "/mnt/shared,s3://bucket")
    assert main(["serve", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "llm-batch: error: the service's settings are invalid: LLM_BATCH_SHARED_ROOTS: "
        "'s3://bucket' is a URI"
    ), err


def test_shared_roots_are_local_folders():
    with pytest.raises(ValueError, match="is a URI; list local folders"):
        Settings(shared_roots="/mnt/shared,s3://bucket")
    assert Settings(shared_roots="file:///mnt/shared/, /mnt/b").shared_roots == "/mnt/shared,/mnt/b"


def test_shared_roots_are_resolved_when_the_settings_are_read(tmp_path: Path):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    (tmp_path / "mnt").symlink_to(tmp_path / "first")
    settings = Settings(ray_address=CLUSTER, shared_roots=f"{tmp_path / 'mnt'},{tmp_path}/first")
    # Repointing the link later does not move what the running service checks against.
    (tmp_path / "mnt").unlink()
    (tmp_path / "mnt").symlink_to(tmp_path / "second")
    shared = settings.shared_storage()
    assert shared is not None and shared.folders == (str((tmp_path / "first").resolve()),)
    assert not shared.covers(str(tmp_path / "mnt" / "x.parquet"))


# -- SharedStorage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("s3://bucket/any/where", True),
        ("gs://bucket/x", True),
        ("abfs://container@account.dfs.core.windows.net/x", True),
        ("hdfs://namenode/x", True),
        ("{shared}", True),
        ("{shared}/deep/new/folder", True),
        ("file://{shared}/x.parquet", True),
        ("{shared}/../elsewhere", False),
        ("{shared}-sibling/x", False),
        ("file://{base}/x", False),
        ("/tmp/x", False),
    ],
)
def test_shared_storage_check(tmp_path: Path, path, ok):
    shared = SharedStorage.of([str(tmp_path / "s")], cluster=CLUSTER)
    path = path.replace("{shared}", str(tmp_path / "s")).replace("{base}", str(tmp_path))
    if ok:
        shared.check(path, field="input.path")
        return
    with pytest.raises(
        JobSpecError, match=r"^input\.path: .* is on the service's machine only, but jobs run on"
    ):
        shared.check(path, field="input.path")
