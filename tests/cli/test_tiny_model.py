"""``llm-batch tiny-model``: --task and --labels, and their errors (one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_batch.cli import main


def test_classify_with_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cls"
    code = main(["tiny-model", str(out), "--task", "classify", "--labels", "pos, neg,neu"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "pos", "1": "neg", "2": "neu"}
    assert "classify, labels pos, neg, neu" in capsys.readouterr().out


@pytest.mark.parametrize("task", [None, "generate", "embed"])
def test_generate_and_embed_write_a_causal_lm(tmp_path: Path, task: str | None) -> None:
    argv = ["tiny-model", str(tmp_path / "m"), "--seed", "2"]
    assert main(argv + (["--task", task] if task else [])) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--labels", "a,b"], "--labels is only for --task classify (the task is generate)"),
        (
            ["--task", "embed", "--labels", "a,b"],
            "--labels is only for --task classify (the task is embed)",
        ),
        (["--task", "classify"], "--task classify needs --labels"),
        (["--task", "classify", "--labels", "a"], "--labels 'a': a classify model needs at least"),
        (["--task", "classify", "--labels", "a,b,a"], "--labels 'a,b,a': labels must be distinct"),
        (["--task", "classify", "--labels", "a,,b"], "--labels 'a,,b': labels must be non-empty"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    out = tmp_path / "m"
    assert main(["tiny-model", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-batch: error: ")
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_task_is_refused_by_the_parser(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["tiny-model", str(tmp_path / "m"), "--task", "score"])
    assert e.value.code == 2
