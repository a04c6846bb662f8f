"""vLLM's sampling fields end to end, on the real CPU engine: one job whose rows each
override one field (seeded where sampling is random), each row's text equal to raw
``LLM.generate`` with the same ``SamplingParams``."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch.job.spec import JobSpec

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12
# One row per field: (override, what raw vLLM is given besides max_tokens).
CASES: list[dict] = [
    {"top_k": 5, "temperature": 1.0, "seed": 11},
    {"min_p": 0.3, "temperature": 1.0, "seed": 12},
    {"presence_penalty": 2.0},
    {"frequency_penalty": 2.0},
    {"repetition_penalty": 1.9},
    {"min_tokens": 10, "stop": ["e"]},
    {"stop_token_ids": [5, 6, 7, 8, 9, 10]},
    {"logit_bias": {"40": 100.0}},
    {"bad_words": ["the", "a"]},
    {"include_stop_str_in_output": True, "stop": ["e"]},
    {"skip_special_tokens": False},
    {},  # the job's own sampling: the baseline
]


def test_each_sampling_field_gives_raw_vllms_text(
    tmp_path, tiny_model, ray_local, reference_engines
):
    from vllm import SamplingParams

    from llm_batch.pipeline.run import run_job

    prompts = [f"Write about item {i} and the weather:" for i in range(len(CASES))]
    table = pa.table(
        {
            "id": list(range(len(CASES))),
            "text": prompts,
            "overrides": [json.dumps(c) if c else None for c in CASES],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    spec = JobSpec.from_dict(
        {
            "name": "sampling",
            "input": {"path": str(tmp_path / "in.parquet")},
            "prompt": {"template": "{{ text }}"},
            "model": {
                "path": str(tiny_model),
                "engine": {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True},
            },
            "sampling": {"max_tokens": MAX_TOKENS, "overrides_column": "overrides"},
            "carryover": ["id"],
            "output": {"path": str(tmp_path / "out")},
        }
    )
    run_job(spec)
    out = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().sort_by("id")
    assert out.column("error").null_count == len(CASES), out.column("error").to_pylist()

    def params(case: dict) -> SamplingParams:
        fields = {"temperature": 0.0, **case}
        if "logit_bias" in fields:  # JSON's keys are strings; vLLM's token ids are ints
            fields["logit_bias"] = {int(k): v for k, v in fields["logit_bias"].items()}
        return SamplingParams(max_tokens=MAX_TOKENS, **fields)

    llm = reference_engines(tiny_model)
    expected = [
        llm.generate([prompt], params(case), use_tqdm=False)[0].outputs[0].text
        for prompt, case in zip(prompts, CASES, strict=True)
    ]
    got = out.column("generated_text").to_pylist()
    for case, g, e in zip(CASES, got, expected, strict=True):
        assert g == e, case
    # The fields did something: a forced token, a longer minimum, a penalty.
    baselines = [
        o.outputs[0].text
        for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS), use_tqdm=False)
    ]
    changed = [c for c, g, b in zip(CASES, got, baselines, strict=True) if g != b]
    assert {"logit_bias", "presence_penalty"} <= {k for c in changed for k in c}, changed
