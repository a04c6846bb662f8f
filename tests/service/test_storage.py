"""Storage roots: which paths a submitted job may name, after ``..`` and symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm_batch.errors import JobSpecError
from llm_batch.service.settings import Settings
from llm_batch.service.storage import StorageRoots, is_hub_id, parse_roots


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    (folder / "in").mkdir(parents=True)
    (folder / "in" / "a.parquet").write_bytes(b"x")
    (tmp_path / "outside.parquet").write_bytes(b"x")
    return folder


@pytest.fixture
def roots(root: Path) -> StorageRoots:
    return StorageRoots.of([str(root), "s3://bucket/prefix", "gs://whole-bucket"])


def check(roots: StorageRoots, path: str, base: Path, **kw) -> str:
    return roots.check(path, field="input.path", base=str(base), **kw)


def test_paths_under_a_root_are_kept_resolved(roots, root, tmp_path):
    assert check(roots, str(root / "in" / "a.parquet"), tmp_path) == str(root / "in/a.parquet")
    assert check(roots, "in/a.parquet", root) == str(root / "in" / "a.parquet")  # relative
    assert check(roots, "in/../in/a.parquet", root) == str(root / "in" / "a.parquet")
    assert check(roots, f"file://{root}/in/a.parquet", tmp_path) == str(root / "in/a.parquet")
    assert check(roots, str(root / "out" / "new"), tmp_path) == str(root / "out" / "new")
    assert check(roots, str(root), tmp_path) == str(root)
    assert check(roots, "s3://bucket/prefix/in/x.parquet", tmp_path).startswith("s3://")
    assert check(roots, "S3://bucket/prefix", tmp_path) == "S3://bucket/prefix"
    assert check(roots, "gs://whole-bucket/any/thing", tmp_path).startswith("gs://")


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("../outside.parquet", "outside the storage roots (it resolves to"),
        ("../../../../../../etc/passwd", "resolves to '/etc/passwd'"),
        ("/etc/passwd", "outside the storage roots"),
        ("~/anything", "outside the storage roots"),
        ("file:///etc/passwd", "outside the storage roots"),
        ("file://otherhost/etc/passwd", "must not name a host"),
        ("s3://bucket/prefix-other/x", "outside the storage roots"),
        ("s3://bucket/other/x", "outside the storage roots"),
        ("s3://bucket2/prefix/x", "outside the storage roots"),
        ("s3://bucket/prefix/../other/x", "'.' or '..' segments"),
        ("s3://bucket/prefix/%2e%2e/other", "'.' or '..' segments"),
        ("s3://bucket/prefix/x?endpoint_override=evil.example", "query or fragment"),
        ("s3://bucket/prefix/x#frag", "query or fragment"),
        ("hdfs://namenode/prefix/x", "URI scheme 'hdfs', which no root has"),
        ("http://169.254.169.254/latest", "URI scheme 'http'"),
        ("mock://x", "URI scheme 'mock'"),
        ("in/a\x00.parquet", "NUL byte"),
    ],
)
def test_paths_outside_the_roots_are_refused_naming_the_field(roots, root, path, needle):
    with pytest.raises(JobSpecError) as e:
        check(roots, path, root)
    message = str(e.value)
    assert message.startswith("input.path: ") and needle in message, message
    if "outside" in needle:
        assert str(root) in message and "LLM_BATCH_STORAGE_ROOTS" in message


def test_a_symlink_out_of_a_root_is_refused(roots, root, tmp_path):
    (root / "in" / "link.parquet").symlink_to(tmp_path / "outside.parquet")
    (root / "escape").symlink_to("/etc")
    with pytest.raises(JobSpecError, match="resolves to .*outside.parquet"):
        check(roots, str(root / "in" / "link.parquet"), tmp_path)
    with pytest.raises(JobSpecError, match="resolves to '/etc/passwd'"):
        check(roots, str(root / "escape" / "passwd"), tmp_path)
    # A folder's files are checked one by one: a link inside it is caught too.
    with pytest.raises(JobSpecError, match="link.parquet.* is a link to .*outside the storage"):
        roots.check_files(sorted(str(p) for p in (root / "in").iterdir()), field="input.path")
    roots.check_files([str(root / "in" / "a.parquet"), "bucket/key"], field="input.path")


def test_a_symlink_inside_a_root_is_followed(roots, root):
    (root / "alias").symlink_to(root / "in")
    assert check(roots, str(root / "alias" / "a.parquet"), root) == str(root / "in/a.parquet")


def test_a_root_that_is_a_symlink_allows_its_target(tmp_path, root):
    (tmp_path / "link-root").symlink_to(root)
    roots = StorageRoots.of([str(tmp_path / "link-root")])
    assert check(roots, str(root / "in" / "a.parquet"), tmp_path) == str(root / "in/a.parquet")


def test_model_paths_hub_ids_and_catalog_folders(roots, root, tmp_path):
    catalog_model = tmp_path / "models" / "tiny"
    catalog_model.mkdir(parents=True)
    data = {
        "input": {"path": "in/a.parquet"},
        "output": {"path": "out/x", "rows_per_file": 3},
        "models": [
            {"name": "hub", "path": "org/some-model"},
            {"name": "cat", "path": str(catalog_model)},
        ],
    }
    with pytest.raises(JobSpecError, match=r"^models\[1\]\.path: .* outside the storage roots"):
        roots.confine_job(data, base=str(root))
    got = roots.with_models([str(catalog_model), "org/hub-model"]).confine_job(data, base=str(root))
    assert got["input"] == {"path": str(root / "in" / "a.parquet")}
    assert got["output"] == {"path": str(root / "out" / "x"), "rows_per_file": 3}
    assert got["models"][0]["path"] == "org/some-model"  # a hub id is not a path
    assert got["models"][1]["path"] == str(catalog_model)
    # The catalog's folders are allowed as models only, not as inputs.
    with pytest.raises(JobSpecError, match=r"^input\.path"):
        roots.with_models([str(catalog_model)]).confine_job(
            {"input": {"path": str(catalog_model)}}, base=str(root)
        )
    for path in ("../x", "a/b/c", "/abs", "~/m", ".hidden", "org/..x"):
        assert not is_hub_id(path), path
    for path in ("tiny-hub-id", "org/model-1.5", "Org_x/m.v2"):
        assert is_hub_id(path), path


def test_malformed_blocks_are_left_for_validation(roots, root):
    data = {"input": "in.parquet", "model": 3, "output": None}
    assert roots.confine_job(data, base=str(root)) == data


def test_settings_roots_always_hold_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=tmp_path / "data")
    assert settings.roots() == [str(tmp_path / "data")]
    settings = Settings(
        data_dir=tmp_path / "data", storage_roots=" rel , file:///srv/x/, s3://b/p/ ,,"
    )
    assert settings.roots() == [str(tmp_path / "data"), str(tmp_path / "rel"), "/srv/x", "s3://b/p"]
    monkeypatch.setenv("LLM_BATCH_STORAGE_ROOTS", "gs://bucket")
    assert Settings(data_dir=tmp_path / "data").roots()[1:] == ["gs://bucket"]
    for bad in ("s3://", "s3:///path", "s3://b/p?x=1", "file://host/x"):
        with pytest.raises(ValueError, match="storage_roots"):
            Settings(data_dir=tmp_path / "data", storage_roots=bad)


def test_realpath_of_roots(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert parse_roots(str(tmp_path / "link")) == [os.path.realpath(tmp_path / "real")]


def test_a_stages_model_paths_are_confined_too(roots, root, tmp_path):
    outside = tmp_path / "elsewhere" / "m"
    outside.mkdir(parents=True)
    data = {
        "input": {"path": "in/a.parquet"},
        "stages": [
            {"name": "a", "model": {"path": "org/hub-model"}},
            {"name": "b", "models": [{"name": "x", "path": str(outside)}]},
        ],
    }
    with pytest.raises(JobSpecError, match=r"^stages\[1\]\.models\[0\]\.path: .* outside"):
        roots.confine_job(data, base=str(root))


def test_an_adapter_is_confined_as_its_model_is(roots, root, tmp_path):
    outside = tmp_path / "elsewhere" / "adapter"
    outside.mkdir(parents=True)
    data = {"input": {"path": "in/a.parquet"}, "model": {"path": "org/m", "lora": str(outside)}}
    with pytest.raises(JobSpecError, match=r"^model\.lora: .* outside the storage roots"):
        roots.confine_job(data, base=str(root))
    got = roots.with_models([str(outside)]).confine_job(data, base=str(root))
    assert got["model"]["lora"] == str(outside)  # the catalog's adapter: allowed
