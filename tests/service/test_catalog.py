"""The models file of ``llm-batch serve --models``: names resolve to model blocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_batch.errors import JobSpecError
from llm_batch.service.catalog import ModelCatalog


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_names_resolve_and_relative_paths_follow_the_file(tmp_path):
    (tmp_path / "local").mkdir()
    catalog = ModelCatalog.from_file(
        write(tmp_path, "a: {path: local, replicas: 2}\nb: {path: org/hub-model}\n")
    )
    assert catalog.names == ["a", "b"]
    job = catalog.resolve({"model": "a", "name": "x"})
    assert job == {"model": {"path": str(tmp_path / "local"), "replicas": 2}, "name": "x"}
    multi = catalog.resolve({"models": ["b", {"name": "c", "path": "p"}]})
    assert multi["models"] == [{"name": "b", "path": "org/hub-model"}, {"name": "c", "path": "p"}]


def test_a_job_with_an_inline_model_is_unchanged():
    job = {"model": {"path": "m"}}
    assert ModelCatalog().resolve(job) == job


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("- a\n- b\n", "expected a mapping of model names"),
        ("a: 3\n", "a: expected a model block"),
        ("a: {path: m, batch_size: 0}\n", "a is invalid: batch_size: Input should be greater"),
        ("a: {path: m, engin: {}}\n", "engin: unknown field"),
        ("a: [unclosed\n", "cannot be read"),
    ],
)
def test_bad_models_files_name_the_problem(tmp_path, text, needle):
    with pytest.raises(JobSpecError, match="models file") as e:
        ModelCatalog.from_file(write(tmp_path, text))
    assert needle in str(e.value)


def test_missing_models_file(tmp_path):
    with pytest.raises(JobSpecError, match="does not exist"):
        ModelCatalog.from_file(tmp_path / "nope.yaml")


def test_names_resolve_inside_stages(tmp_path):
    catalog = ModelCatalog.from_file(write(tmp_path, "a: {path: org/a}\nb: {path: org/b}\n"))
    job = catalog.resolve(
        {"stages": [{"name": "s", "model": "a"}, {"name": "t", "models": ["b", {"path": "p"}]}]}
    )
    assert job["stages"][0]["model"] == {"path": "org/a"}
    assert job["stages"][1]["models"] == [{"name": "b", "path": "org/b"}, {"path": "p"}]
    with pytest.raises(JobSpecError, match=r"^stages\[1\]\.models\[0\]: 'c' is not a model"):
        catalog.resolve({"stages": [{"model": "a"}, {"models": ["c"]}]})


def test_a_models_adapters_are_offered_by_their_own_names(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "fr").mkdir()
    catalog = ModelCatalog.from_file(
        write(tmp_path, "tiny: {path: base, adapters: {tiny-fr: fr, tiny-hub: org/adapter}}\n")
    )
    assert catalog.names == ["tiny", "tiny-fr", "tiny-hub"]
    base = str(tmp_path / "base")
    assert catalog.resolve({"model": "tiny-fr"})["model"] == {
        "path": base,
        "lora": str(tmp_path / "fr"),
    }
    assert catalog.block("tiny-hub", field="model")["lora"] == "org/adapter"
    assert "lora" not in catalog.block("tiny", field="model")
    assert sorted(catalog.folders()) == sorted(
        [base, base, str(tmp_path / "fr"), base, "org/adapter"]
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a: {path: m, adapters: [x]}\n", "a.adapters: expected a mapping of names to folders"),
        ("a: {path: m, adapters: {b: x}}\nb: {path: m}\n", "a.adapters.b: the name is taken"),
    ],
)
def test_bad_adapters_are_refused(tmp_path, text, needle):
    with pytest.raises(JobSpecError, match="models file") as e:
        ModelCatalog.from_file(write(tmp_path, text))
    assert needle in str(e.value)
