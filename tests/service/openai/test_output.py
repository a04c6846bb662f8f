"""The response bodies of an OpenAI batch's output lines, from output rows (no service)."""

from __future__ import annotations

from llm_batch.service.openai.output import CHAT, _body

ROW = {
    "generated_text": "good",
    "num_input_tokens": 3,
    "num_output_tokens": 2,
    "finish_reason": "stop",
    "error": None,
}


def test_a_reasoning_models_chat_message_carries_reasoning_content():
    body = _body([{**ROW, "reasoning_text": "weighing it"}], endpoint=CHAT, model="m", created=0)
    message = body["choices"][0]["message"]
    assert message["content"] == "good"
    assert message["reasoning_content"] == "weighing it"  # as vLLM's server names it
    plain = _body([ROW], endpoint=CHAT, model="m", created=0)["choices"][0]["message"]
    assert "reasoning_content" not in plain
