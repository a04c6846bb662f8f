"""What the engine stage hands vLLM and what it reads back, as pure logic: sampling
parameters (JSON without free whitespace by default), whether a structured output is
whole, and the one line a failed engine start reports."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from llm_batch.pipeline.engine_args import build_sampling_params, engine_failure
from llm_batch.pipeline.rows import structured_complete

SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}


def sampling(**structured) -> dict:
    return {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "structured": structured}


def test_json_outputs_have_no_free_whitespace_unless_the_job_asks():
    params = build_sampling_params(sampling(json_schema=SCHEMA))
    assert params.structured_outputs.disable_any_whitespace is True
    params = build_sampling_params(sampling(json_schema=SCHEMA, any_whitespace=True))
    assert params.structured_outputs.disable_any_whitespace is False


@pytest.mark.parametrize(
    ("text", "structured", "whole"),
    [
        ("negative", {"choice": ["positive", "negative"]}, True),
        ("negativ", {"choice": ["positive", "negative"]}, False),
        ("abc", {"regex": "[a-z]{3}"}, True),
        ("ab", {"regex": "[a-z]{3}"}, False),
        ('{"a": "x"}', {"json_schema": SCHEMA}, True),
        ('{"a": "x', {"json_schema": SCHEMA}, False),
        (None, {"choice": ["x"]}, True),  # an error row already
    ],
)
def test_a_cut_structured_output_is_not_whole(text, structured, whole):
    assert structured_complete(text, structured) is whole


def test_an_engine_refusal_reports_vllms_own_sentence():
    class ModelConfig(BaseModel):
        max_model_len: int

        @field_validator("max_model_len")
        @classmethod
        def _fits(cls, v: int) -> int:
            raise ValueError(f"User-specified max_model_len ({v}) is greater than the derived 512")

    with pytest.raises(ValidationError) as e:
        ModelConfig(max_model_len=2048)
    said = engine_failure(e.value)
    assert said == (
        "ValidationError: User-specified max_model_len (2048) is greater than the derived 512"
    )
    assert engine_failure(RuntimeError("\n  first line\nsecond")) == "RuntimeError: first line"


def test_vllms_sampling_fields_reach_its_sampling_params():
    from llm_batch.pipeline.engine_args import SamplingParamsCache

    base = {"max_tokens": 8, "temperature": 0.7, "top_p": 1.0}  # greedy would reset top_k
    fields = {
        "top_k": 5,
        "min_p": 0.1,
        "presence_penalty": 1.0,
        "frequency_penalty": -1.0,
        "repetition_penalty": 1.2,
        "min_tokens": 2,
        "stop_token_ids": [3],
        "logit_bias": {7: 5.0},
        "bad_words": ["x"],
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
    }
    params = build_sampling_params({**base, **fields})
    for key, value in fields.items():
        assert getattr(params, key) == value, key
    # Each is a per-row override too (a JSON object's keys are strings: token ids parse).
    row = SamplingParamsCache(base).get({"logit_bias": {"9": -3}, "top_k": 2}, 0)
    assert (row.logit_bias, row.top_k) == ({9: -3.0}, 2)


@pytest.mark.parametrize(
    ("sampling", "said"),
    [
        ({"temperature": 3}, "sampling.temperature: Input should be less than or equal to 2"),
        ({"top_k": -2}, "sampling.top_k: Input should be greater than or equal to -1"),
        ({"min_p": 1.5}, "sampling.min_p: Input should be less than or equal to 1"),
        ({"presence_penalty": 2.5}, "sampling.presence_penalty: Input should be less than"),
        ({"repetition_penalty": 0}, "sampling.repetition_penalty: Input should be greater than 0"),
        ({"logit_bias": {"5": 101}}, "sampling.logit_bias.5: Input should be less than or equal"),
        ({"logit_bias": {"x": 1}}, "sampling.logit_bias.x.[key]: Input should be a valid integer"),
        ({"min_tokens": 20}, "sampling.min_tokens=20 must be at most sampling.max_tokens=16"),
        ({"bad_words": [""]}, "sampling.bad_words.0: String should have at least 1 character"),
    ],
)
def test_a_sampling_value_vllm_would_refuse_is_refused_naming_it(sampling, said):
    from llm_batch.errors import JobSpecError
    from llm_batch.job.spec import JobSpec

    job = {
        "input": {"path": "x.parquet"},
        "prompt": {"template": "{{ t }}"},
        "model": {"path": "m"},
    }
    with pytest.raises(JobSpecError) as e:
        JobSpec.from_dict({**job, "sampling": sampling})
    assert said in str(e.value)


def test_a_structured_output_cut_at_max_tokens_is_counted_as_failed():
    import pyarrow as pa

    from llm_batch.pipeline.generation import RowResult
    from llm_batch.pipeline.rows import BatchFinisher

    finisher = BatchFinisher({"structured": {"choice": ["positive", "negative"]}})
    results = [
        RowResult(text="posi", input_tokens=3, output_tokens=2, finish_reason="length"),
        RowResult(text="negative", input_tokens=3, output_tokens=2, finish_reason="stop"),
    ]
    out, report = finisher.finish(pa.table({"row_id": [0, 1]}), results)
    assert out.column("error").to_pylist()[0].startswith("structured output cut at max_tokens")
    assert (report.rows, report.failed) == (2, 1)
    assert report.metrics["errors"]["count"] == 1
