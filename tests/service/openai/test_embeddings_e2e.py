"""``/v1/embeddings`` batches end to end: the real ``openai`` client against ``llm-batch serve``
(the session's service, offering the tiny model as ``tiny-embed``, task embed), the real Ray
and the real vLLM CPU engine on its pooling runner.

One batch carries every claim: a text, a list of texts and token ids, in float and in
base64, and one text longer than ``max_model_len``. It runs to ``completed``; each output
line is OpenAI's embedding response as the client parses it, the base64 lines decode to the
float lines' vectors, a list's vectors come in its order, token ids embed as their text
does, and the over-long text goes to the error file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai._models import construct_type
from openai._types import omit
from openai.lib._parsing._embeddings import parse_embedding_response
from openai.types import CreateEmbeddingResponse

from .conftest import jsonl

pytestmark = pytest.mark.e2e

MODEL = "tiny-embed"
ENDED = ("completed", "failed", "cancelled", "expired")
TEXTS = ["The battery lasts all day.", "Broke in a week.", "Fine, I guess."]
# Bfloat16 weights: the same text in two requests may be batched with different neighbours,
# which can change the last bits of its vector.
ATOL = 1e-3


@pytest.fixture(scope="module")
def client(service):
    from openai import OpenAI

    return OpenAI(base_url=f"{service.url}/v1", api_key="anything")


@pytest.fixture(scope="module")
def token_ids(tiny_model: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    return list(tokenizer(TEXTS[0], add_special_tokens=True)["input_ids"])


def line(custom_id: str, input: Any, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": MODEL, "input": input, **body},
    }


def lines_of(client, file_id: str | None) -> dict[str, dict[str, Any]]:
    assert file_id is not None
    found = [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
    return {x["custom_id"]: x for x in found}


def parsed(body: dict[str, Any]) -> CreateEmbeddingResponse:
    """As ``client.embeddings.create`` makes its result (base64 decoded by its own parser)."""
    response = construct_type(type_=CreateEmbeddingResponse, value=body)
    response = parse_embedding_response(response, encoding_format=omit)
    return CreateEmbeddingResponse.model_validate(response.model_dump())


def vectors(body: dict[str, Any]) -> np.ndarray:
    return np.array([d.embedding for d in parsed(body).data], dtype=np.float32)


@pytest.fixture(scope="module")
def finished(client, service, token_ids):
    lines = [
        line("text", TEXTS[0]),
        line("text-base64", TEXTS[0], encoding_format="base64"),
        line("list", TEXTS),
        line("list-base64", TEXTS, encoding_format="base64"),
        line("ids", token_ids),
        line("too-long", "xyzzy " * 1000),  # thousands of tokens: past max_model_len=2048
    ]
    upload = client.files.create(file=("embeddings.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    deadline = time.monotonic() + 400
    while (batch := client.batches.retrieve(batch.id)).status not in ENDED:
        if time.monotonic() > deadline:
            jobs = httpx.get(f"{service.url}/v1/jobs", params={"limit": 100}, timeout=30).json()
            mine = [(j["id"], j["status"], j.get("error")) for j in jobs["data"]
                    if batch.id in j["name"]]  # fmt: skip
            pytest.fail(
                f"batch not done after 400 s: {batch}\njobs: {mine}\n"
                f"service log:\n{service.log_tail(40)}"
            )
        time.sleep(0.5)
    yield batch
    # The embedding engine is this module's alone: released, not left idle for the session.
    pools = httpx.get(f"{service.url}/v1/engines", timeout=30).json()["data"]
    for pool in pools:
        if pool["model"] == MODEL:
            httpx.delete(f"{service.url}/v1/engines/{pool['id']}", timeout=60)


def test_an_embeddings_batch_runs_to_completed(client, finished, token_ids):
    batch = finished
    assert batch.status == "completed", batch.errors
    assert batch.endpoint == "/v1/embeddings" and batch.model == MODEL
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 5, "failed": 1}
    out = lines_of(client, batch.output_file_id)
    assert sorted(out) == ["ids", "list", "list-base64", "text", "text-base64"]
    for custom_id, found in out.items():
        assert found["error"] is None and found["response"]["status_code"] == 200
        body = found["response"]["body"]
        assert body["object"] == "list" and body["model"] == MODEL
        packed = custom_id.endswith("base64")
        assert all(isinstance(d["embedding"], str if packed else list) for d in body["data"])
        if not packed:
            CreateEmbeddingResponse.model_validate(body)
        result = parsed(body)
        assert [d.index for d in result.data] == list(range(len(result.data)))
        assert result.usage.prompt_tokens == result.usage.total_tokens > 0

    text, text64 = (
        vectors(out["text"]["response"]["body"]),
        vectors(out["text-base64"]["response"]["body"]),
    )
    many, many64 = (
        vectors(out["list"]["response"]["body"]),
        vectors(out["list-base64"]["response"]["body"]),
    )
    ids = vectors(out["ids"]["response"]["body"])
    # The tiny model's hidden size, one vector per input, normalised (vLLM's default).
    assert text.shape == text64.shape == ids.shape == (1, 128)
    assert many.shape == many64.shape == (len(TEXTS), 128)
    assert np.allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-3)
    # base64 decodes to what the floats say; a list keeps its order; ids embed as their text.
    assert np.allclose(text, text64, atol=ATOL) and np.allclose(many, many64, atol=ATOL)
    assert np.allclose(many[0], text[0], atol=ATOL)
    assert np.allclose(ids, text, atol=ATOL)
    # ...and the tolerance is far below what tells texts apart.
    assert min(np.abs(many[i] - many[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))) > 10 * ATOL

    tokens = {c: out[c]["response"]["body"]["usage"]["prompt_tokens"] for c in out}
    assert tokens["text"] == tokens["ids"] == len(token_ids)
    assert tokens["list"] == tokens["list-base64"] > tokens["text"]
    assert batch.usage.input_tokens == sum(tokens.values()) and batch.usage.output_tokens == 0


def test_a_text_past_the_context_goes_to_the_error_file(client, finished):
    errors = lines_of(client, finished.error_file_id)
    assert list(errors) == ["too-long"]
    error = errors["too-long"]
    assert error["error"]["code"] == "context_length_exceeded"
    assert error["response"]["status_code"] == 400
