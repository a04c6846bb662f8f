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
