"""The job specification: every refusal names the field and what was expected."""

from __future__ import annotations

import pytest

from llm_batch.errors import JobSpecError
from llm_batch.job.spec import JobSpec

BASE = {
    "name": "t",
    "input": {"path": "in.parquet"},
    "prompt": {"template": "{{ text }}"},
    "model": {"path": "m"},
    "output": {"path": "out"},
}


def with_(**changes):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


def test_minimal_job_gets_defaults():
    spec = JobSpec.from_dict(BASE)
    assert spec.sampling.max_tokens == 16
    assert spec.sampling.temperature == 0.0
    assert spec.model.replicas == 1
    assert spec.input.resolved_format == "parquet"
    assert spec.carryover == []


def test_contract_example_from_the_readme_loads(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        """
name: reviews-sentiment
input:
  path: prompts/examples/reviews.parquet
  format: parquet
prompt:
  template: "Review: {{ text }}\\nSentiment:"
model:
  path: models/tiny
  engine: {max_model_len: 512, dtype: bfloat16, enforce_eager: true, tensor_parallel_size: 1}
  replicas: 1
sampling: {max_tokens: 16, temperature: 0.0, top_p: 1.0, seed: 0, stop: ["\\n"]}
carryover: [id, text, label]
output:
  path: out/reviews-sentiment
"""
    )
    spec = JobSpec.from_file(job)
    assert spec.sampling.stop == ["\n"]
    assert spec.model.engine.max_model_len == 512


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (with_(sampling__max_tokens=0), "sampling.max_tokens: Input should be greater than 0"),
        (with_(sampling__max_tokens=-3), "sampling.max_tokens"),
        (with_(sampling__temperature=-0.1), "sampling.temperature"),
        (with_(sampling__top_p=1.5), "sampling.top_p"),
        (with_(sampling__stop=[""]), "sampling.stop: stop strings must not be empty"),
        (with_(sampling__max_tokenz=5), "sampling.max_tokenz: unknown field"),
        (with_(colour="red"), "colour: unknown field"),
        ({k: v for k, v in BASE.items() if k != "input"}, "input: required field is missing"),
        (
            with_(prompt={"template": "a", "messages": [{"role": "user", "content": "b"}]}),
            "set exactly one of prompt.template or prompt.messages",
        ),
        (with_(prompt={"messages": [{"role": "robot", "content": "b"}]}), "prompt.messages.0.role"),
        (with_(carryover=["id", "id"]), "carryover: column 'id' is listed twice"),
        (with_(carryover=["error"]), "carryover: column 'error' clashes"),
        (with_(model__replicas=0), "model.replicas"),
        (
            with_(model__engine={"max_model_len": 64}, sampling={"max_tokens": 64}),
            "sampling.max_tokens=64 must be below model.engine.max_model_len=64",
        ),
        (with_(input__format="xml"), "input.format"),
        (
            with_(prompt={"template": "a", "chat_template_kwargs": {"enable_thinking": False}}),
            "prompt.chat_template_kwargs: applies to chat prompts",
        ),
        (
            with_(model__task="embed", model__reasoning_parser="qwen3", sampling={}),
            "reasoning_parser: applies to task generate, not embed",
        ),
    ],
)
def test_invalid_jobs_name_the_field(data, needle):
    with pytest.raises(JobSpecError) as e:
        JobSpec.from_dict(data)
    assert needle in str(e.value)


def test_format_cannot_be_inferred():
    spec = JobSpec.from_dict(with_(input={"path": "data.bin"}))
    with pytest.raises(JobSpecError, match="input.format: cannot infer"):
        _ = spec.input.resolved_format


def test_format_inferred_from_extension():
    assert (
        JobSpec.from_dict(with_(input={"path": "s3://b/x.jsonl"})).input.resolved_format == "jsonl"
    )
    assert JobSpec.from_dict(with_(input={"path": "x.csv.gz"})).input.resolved_format == "csv"


def test_spec_is_immutable():
    spec = JobSpec.from_dict(BASE)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type
        spec.name = "other"  # type: ignore[misc]


def test_bad_files(tmp_path):
    with pytest.raises(JobSpecError, match="does not exist"):
        JobSpec.from_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(JobSpecError, match="does not parse"):
        JobSpec.from_file(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(JobSpecError, match="expected a mapping"):
        JobSpec.from_file(scalar)


@pytest.mark.parametrize(
    "prompt",
    [
        {"template": "a", "messages_column": "conversation"},
        {"messages": [{"role": "user", "content": "b"}], "messages_column": "conversation"},
        {},
    ],
)
def test_messages_column_is_one_kind_of_prompt(prompt):
    with pytest.raises(JobSpecError, match="set exactly one of prompt.template or prompt.messages"):
        JobSpec.from_dict(with_(prompt=prompt))


def test_messages_column_names_its_field():
    spec = JobSpec.from_dict(with_(prompt={"messages_column": "conversation"}))
    assert spec.prompt.messages_column == "conversation"
    assert spec.prompt.field == "prompt.messages_column"
    assert JobSpec.from_dict(BASE).prompt.field == "prompt.template"


def test_a_reasoning_models_columns_include_its_reasoning():
    spec = JobSpec.from_dict(with_(model__reasoning_parser="deepseek_r1"))
    assert spec.output_columns()[:6] == [
        "generated_text",
        "num_input_tokens",
        "num_output_tokens",
        "finish_reason",
        "error",
        "reasoning_text",
    ]
