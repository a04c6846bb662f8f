"""Reasoning models on the real CPU engine: a tiny model whose chat template opens a think
block (``write_tiny_model(thinking=True)``), run with ``model.reasoning_parser``. One job of
two stages over the same rows: ``think`` (the block open: the output is split into
``reasoning_text`` and the answer, as vLLM's own parser splits raw ``LLM.chat``'s text) and
``direct`` (``chat_template_kwargs: {enable_thinking: false}``: the template closes the
block, the whole output is the answer, constrained by a choice from its first token)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch.job.spec import JobSpec

pytestmark = pytest.mark.e2e

ENGINE = {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True}
ROWS = 8
CHOICES = ["good", "bad"]
PARSER = "deepseek_r1"


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    from llm_batch.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-thinking", thinking=True)


@pytest.fixture(scope="module")
def think_end_id(thinking_model) -> int:
    from transformers import AutoTokenizer

    return int(AutoTokenizer.from_pretrained(thinking_model).convert_tokens_to_ids("</think>"))


def sampled(end_id: int) -> dict:
    # Seeded sampling with "</think>" made likelier: the think block closes part way, at a
    # step that differs row by row (greedy, this random model would never close it).
    return {"max_tokens": 16, "temperature": 1.0, "seed": 3, "logit_bias": {str(end_id): 3.0}}


@pytest.fixture(scope="module")
def reasoned(tmp_path_factory, thinking_model, think_end_id, ray_local):
    from llm_batch.pipeline.run import run_job

    root = tmp_path_factory.mktemp("reasoning")
    table = pa.table(
        {
            "id": list(range(ROWS)),
            "question": [f"Tell me about item {i}." for i in range(ROWS)],
            "label": [CHOICES[i % 2] for i in range(ROWS)],
        }
    )
    pq.write_table(table, root / "in.parquet")
    model = {"path": str(thinking_model), "engine": ENGINE, "reasoning_parser": PARSER}
    chat = [{"role": "user", "content": "{{ question }}"}]
    spec = JobSpec.from_dict(
        {
            "name": "reasoning",
            "input": {"path": str(root / "in.parquet")},
            "stages": [
                {
                    "name": "think",
                    "prompt": {"messages": chat},
                    "model": model,
                    "sampling": sampled(think_end_id),
                },
                {
                    "name": "direct",
                    "prompt": {
                        "messages": chat,
                        "chat_template_kwargs": {"enable_thinking": False},
                    },
                    "model": model,
                    "sampling": {"max_tokens": 4, "structured": {"choice": CHOICES}},
                },
            ],
            "metrics": {"label_column": "label"},
            "carryover": ["id", "question"],
            "output": {"path": str(root / "out")},
        }
    )
    run_job(spec)
    out = pads.dataset(str(root / "out"), format="parquet").to_table().sort_by("id")
    return {"out": out, "metrics": (root / "out" / "_metrics.json").read_text()}


def test_the_output_is_split_as_vllms_parser_splits_raw_chat_output(
    reasoned, thinking_model, think_end_id, reference_engines
):
    from vllm import SamplingParams
    from vllm.reasoning import ReasoningParserManager

    out = reasoned["out"].to_pylist()
    assert [c for c in reasoned["out"].column_names if c.startswith("think__")] == [
        "think__generated_text",
        "think__num_input_tokens",
        "think__num_output_tokens",
        "think__finish_reason",
        "think__error",
        "think__reasoning_text",
    ]
    llm = reference_engines(thinking_model, reasoning_parser=PARSER)
    fields = sampled(think_end_id)
    fields["logit_bias"] = {think_end_id: 3.0}
    raw = llm.chat(
        [[{"role": "user", "content": r["question"]}] for r in out],
        SamplingParams(**fields),
        use_tqdm=False,
    )
    parser = ReasoningParserManager.get_reasoning_parser(PARSER)(llm.get_tokenizer())
    split = [parser.extract_reasoning(o.outputs[0].text, None) for o in raw]
    assert [(r["think__reasoning_text"], r["think__generated_text"]) for r in out] == split
    # Both parts, in rows whose think block closed before max_tokens.
    assert any(reasoning and answer for reasoning, answer in split), split
    assert all(r["think__error"] is None for r in out)


def test_a_closed_think_block_makes_the_whole_output_the_constrained_answer(
    reasoned, thinking_model, reference_engines
):
    import json

    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    out = reasoned["out"].to_pylist()
    llm = reference_engines(thinking_model, reasoning_parser=PARSER)
    raw = llm.chat(
        [[{"role": "user", "content": r["question"]}] for r in out],
        SamplingParams(
            max_tokens=4,
            temperature=0.0,
            structured_outputs=StructuredOutputsParams(choice=CHOICES),
        ),
        chat_template_kwargs={"enable_thinking": False},
        use_tqdm=False,
    )
    answers = [r["direct__generated_text"] for r in out]
    assert answers == [o.outputs[0].text for o in raw]
    assert set(answers) <= set(CHOICES)
    assert all(r["direct__reasoning_text"] is None for r in out)
    # The label metrics read the answer.
    labels = json.loads(reasoned["metrics"])["metrics"]["direct"]["labels"]
    right = sum(a == r["label"] for a, r in zip(answers, out, strict=True))
    assert labels["accuracy"] == right / ROWS
