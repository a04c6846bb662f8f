"""A bad job fails in a second with one clear line, before Ray or an engine starts."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_batch.cli import main


@pytest.fixture
def job(tmp_path):
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "a"}\n')
    (tmp_path / "empty.jsonl").write_text("")

    def write(**overrides):
        data = {
            "input": {"path": str(tmp_path / "in.parquet")},
            "prompt": {"template": "{{ text }}"},
            "model": {"path": "unused"},
            "carryover": ["id"],
            "output": {"path": str(tmp_path / "out")},
        }
        data.update(overrides)
        path = tmp_path / "job.json"
        path.write_text(json.dumps(data))
        return str(path)

    write.root = tmp_path
    return write


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            {"input": {"path": "/no/such/file.parquet"}},
            "input.path: '/no/such/file.parquet' does not exist",
        ),
        (
            {"prompt": {"template": "{{ txt }}"}},
            "prompt.template uses column 'txt', which the input does not have (it has: id, text)",
        ),
        ({"carryover": ["id", "label"]}, "carryover uses column 'label'"),
        ({"prompt": {"template": "{% if %}"}}, "prompt.template: template syntax error on line 1"),
        (
            {"prompt": {"messages": [{"role": "user", "content": "{{ nope }}"}]}},
            "prompt.messages uses column 'nope'",
        ),
        ({"sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
        ({"sampling": {"temperature": -1}}, "sampling.temperature"),
        ({"modle": {"path": "x"}}, "modle: unknown field"),
        ({"model": {"path": "/no/model"}}, "model.path: model folder '/no/model' does not exist"),
        (
            {"model": None, "models": [{"name": "a", "path": "/tmp"}]},
            "models[0].path: '/tmp' holds no config.json",
        ),
    ],
)
def test_bad_jobs_exit_2_with_one_line(job, capsys, overrides, needle):
    assert main(["run", job(**overrides)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-batch: error: ")
    assert needle in err
    assert err.count("\n") == 1


def test_empty_jsonl_input(job, capsys):
    assert main(["run", job(input={"path": str(job.root / "empty.jsonl")})]) == 2
    assert "is empty" in capsys.readouterr().err


def test_missing_job_file(capsys, tmp_path):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
