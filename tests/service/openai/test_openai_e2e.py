"""The OpenAI Batch API end to end: the real ``openai`` client against ``llm-batch serve`` on
loopback (the session's service, offering the tiny model as ``tiny``), the real Ray and the
real vLLM CPU engine.

Three batches start engines, so they carry every claim between them:

- OpenAI's Batch guide example (its chat requests, only the model name changed) runs to
  ``completed``, one output line per request, matched by ``custom_id``;
- a ``/v1/completions`` batch with two samples and logprobs per request, one of whose
  prompts is longer than ``max_model_len``: that request goes to the error file, the rest
  complete; two more requests carry penalties (OpenAI's and vLLM's extra fields) and a
  ``logit_bias``, each answered as raw ``LLM.generate`` answers the same ``SamplingParams``;
- a large chat batch cancelled mid-run ends ``cancelled``, the lines written by then kept.

The first two are submitted together, so the second's engine starts while the first's
requests are answered. Invalid input files (no engine) end ``failed`` with line numbers.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from openai.types import Batch, Completion, FileObject
from openai.types.chat import ChatCompletion

from tests.service.holds import frozen, pool_processes

from .conftest import jsonl

pytestmark = pytest.mark.e2e

ENDED = ("completed", "failed", "cancelled", "expired")
# Large enough that a cancel sent once the first file is written lands long before the end,
# however slowly the stop reaches the run (6,000 once all finished inside one slow stop).
CANCEL_REQUESTS = 20000

# The example of OpenAI's Batch guide, with the model name changed to one the service offers.
GUIDE_EXAMPLE = """\
{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny", "messages": [{"role": "system", "content": "You are a helpful assistant."},{"role": "user", "content": "Hello world!"}],"max_tokens": 1000}}
{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny", "messages": [{"role": "system", "content": "You are an unhelpful assistant."},{"role": "user", "content": "Hello world!"}],"max_tokens": 1000}}
"""  # noqa: E501


PENALIZED_PROMPT = "Review: it works well and it works. Sentiment:"
# Greedy requests through the door's sampling fields: OpenAI's penalties and logit_bias,
# and vLLM's extra fields.
PENALIZED = {
    "penalized": {
        "max_tokens": 6,
        "temperature": 0,
        "presence_penalty": 1.5,
        "frequency_penalty": 1.0,
        "repetition_penalty": 1.3,
        "top_k": 5,
        "min_tokens": 3,
    },
    "biased": {"max_tokens": 6, "temperature": 0, "logit_bias": {"65": 100}},
}


@pytest.fixture(scope="module")
def client(service):
    from openai import OpenAI

    return OpenAI(base_url=f"{service.url}/v1", api_key="anything")


def wait(client, batch_id: str, done, *, timeout: float, every: float = 0.3) -> list[Batch]:
    """Poll the batch until ``done(batch)``; every state seen."""
    seen: list[Batch] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        seen.append(batch)
        if done(batch):
            return seen
        if batch.status in ENDED:
            pytest.fail(f"batch ended {batch.status} while waiting: {batch}")
        time.sleep(every)
    pytest.fail(f"batch {batch_id} not there after {timeout}s: {seen[-1] if seen else None}")


def lines_of(client, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def create(client, data: bytes, endpoint: str) -> Batch:
    f = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert isinstance(f, FileObject) and f.bytes == len(data)
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")


@pytest.fixture(scope="module")
def finished(client) -> dict[str, Any]:
    """The guide example and the completions batch, submitted together, waited for."""
    started = time.monotonic()
    guide = create(client, GUIDE_EXAMPLE.encode(), "/v1/chat/completions")
    too_long = "xyzzy " * 1000  # thousands of tokens: longer than max_model_len=2048
    prompts = {f"c{i}": f"Review: it works, {i}. Sentiment:" for i in range(4)} | {
        "too-long": too_long
    }
    lines = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": p, "max_tokens": 5, "n": 2, "logprobs": 2},
        }
        for cid, p in prompts.items()
    ]
    lines += [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": PENALIZED_PROMPT, **body},
        }
        for cid, body in PENALIZED.items()
    ]
    completions = create(client, jsonl(lines), "/v1/completions")
    guide_seen = wait(client, guide.id, lambda b: b.status in ENDED, timeout=400)
    completions_seen = wait(client, completions.id, lambda b: b.status in ENDED, timeout=400)
    return {
        "guide": guide_seen,
        "completions": completions_seen,
        "prompts": prompts,
        "seconds": time.monotonic() - started,
    }


def test_the_guide_example_runs_to_completed(client, finished):
    seen = finished["guide"]
    batch = seen[-1]
    assert batch.status == "completed", batch.errors
    statuses = [b.status for b in seen]
    assert statuses[0] in ("validating", "in_progress")
    assert set(statuses) <= {"validating", "in_progress", "finalizing", "completed"}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 2, "failed": 0}
    assert batch.error_file_id is None and batch.model == "tiny"

    output = client.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output"
    lines = lines_of(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == ["request-1", "request-2"]
    prompt_tokens = completion_tokens = 0
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.object == "chat.completion" and completion.model == "tiny"
        (choice,) = completion.choices
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        usage = completion.usage
        assert 0 < usage.completion_tokens <= 1000 and usage.prompt_tokens > 5
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        prompt_tokens += usage.prompt_tokens
        completion_tokens += usage.completion_tokens
    assert batch.usage.input_tokens == prompt_tokens
    assert batch.usage.output_tokens == completion_tokens
    assert batch.usage.total_tokens == prompt_tokens + completion_tokens


def test_a_request_failing_at_inference_goes_to_the_error_file(client, finished):
    batch = finished["completions"][-1]
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.model_dump() == {"total": 7, "completed": 6, "failed": 1}
    (error,) = lines_of(client, batch.error_file_id)
    assert error["custom_id"] == "too-long"
    assert error["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 2048" in error["error"]["message"]
    assert error["response"]["status_code"] == 400

    lines = lines_of(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == sorted(
        ["c0", "c1", "c2", "c3", *PENALIZED]
    )
    for line in (x for x in lines if x["custom_id"] not in PENALIZED):
        completion = Completion.model_validate(line["response"]["body"])
        assert completion.object == "text_completion"
        assert [c.index for c in completion.choices] == [0, 1]  # n=2: two samples
        for choice in completion.choices:
            assert isinstance(choice.text, str)
            logprobs = choice.logprobs
            # One entry per generated token (a token that is part of a character decodes
            # to less than the text shows, so the tokens are not compared with the text).
            steps = len(logprobs.tokens)
            assert 0 < steps <= 5
            assert len(logprobs.token_logprobs) == len(logprobs.text_offset) == steps
            assert len(logprobs.top_logprobs) == steps
            assert all(0 < len(top) <= 2 for top in logprobs.top_logprobs)
        assert completion.usage.completion_tokens == sum(
            len(c.logprobs.tokens) for c in completion.choices
        )


def test_batches_list_pages(client, finished):
    guide, completions = finished["guide"][-1], finished["completions"][-1]
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [completions.id] and page.has_more
    raw = client.batches.with_raw_response.list(limit=1).http_response.json()
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (
        completions.id, completions.id, True,
    )  # fmt: skip
    after = client.batches.list(limit=1, after=completions.id)
    assert [b.id for b in after.data] == [guide.id]
    listed = [b.id for b in client.batches.list(limit=100)]
    assert listed.index(completions.id) < listed.index(guide.id)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"not json at all\n", [("invalid_json_line", 1)]),
        (
            GUIDE_EXAMPLE.encode() + b'{"method": "POST", "url": "/v1/chat/completions"}\n',
            [("missing_required_parameter", 3)],
        ),
        (GUIDE_EXAMPLE.encode() + GUIDE_EXAMPLE.encode()[:200] + b"\n", [("invalid_json_line", 3)]),
        (
            GUIDE_EXAMPLE.encode() + GUIDE_EXAMPLE.encode().split(b"\n")[0] + b"\n",
            [("duplicate_custom_id", 3)],
        ),
        (
            GUIDE_EXAMPLE.replace("chat/completions", "embeddings", 1).encode(),
            [("url_mismatch", 1)],
        ),
        (
            GUIDE_EXAMPLE.replace('"tiny"', '"gpt-4o"').encode(),
            [("model_not_found", 1), ("model_not_found", 2)],
        ),
    ],
)
def test_invalid_input_files_end_failed_with_line_numbers(client, service, data, expected):
    batch = create(client, data, "/v1/chat/completions")
    final = wait(client, batch.id, lambda b: b.status in ENDED, timeout=60)[-1]
    assert final.status == "failed" and final.failed_at is not None
    assert [(e.code, e.line) for e in final.errors.data] == expected, final.errors
    assert final.output_file_id is None and final.request_counts.completed == 0


def test_cancel_mid_run_keeps_the_completed_lines(client, service, finished):
    lines = [
        {
            "custom_id": f"row-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"Review {i}: fine"}],
                "max_tokens": 4,
            },
        }
        for i in range(CANCEL_REQUESTS)
    ]
    batch = create(client, jsonl(lines), "/v1/chat/completions")
    wait(client, batch.id, lambda b: b.status == "in_progress", timeout=120)
    (job_id,) = [j["id"] for j in service_jobs(service) if batch.id in j["name"]]
    # Some lines written (a part file in place), then the pool's engine held: the rest
    # provably pending when the cancel lands.
    deadline = time.monotonic() + 400
    while not written(service, job_id):
        assert time.monotonic() < deadline, "no line was written"
        time.sleep(0.3)
    pools = httpx.get(f"{service.url}/v1/engines", timeout=30).json()["data"]
    (pool,) = [p for p in pools if job_id in p["jobs"]]
    _, engine = pool_processes(service, pool["id"])
    with frozen(engine):
        cancelled = client.batches.cancel(batch.id)
        assert cancelled.status in ("cancelling", "cancelled")
        final = wait(client, batch.id, lambda b: b.status == "cancelled", timeout=180)[-1]
    assert final.cancelling_at is not None and final.cancelled_at is not None
    kept = lines_of(client, final.output_file_id)
    ids = [line["custom_id"] for line in kept]
    assert 0 < len(ids) < CANCEL_REQUESTS
    assert len(set(ids)) == len(ids) and set(ids) <= {line["custom_id"] for line in lines}
    assert final.request_counts.completed == len(ids)
    assert final.request_counts.total == CANCEL_REQUESTS
    for line in kept[:50]:
        ChatCompletion.model_validate(line["response"]["body"])
    # The job underneath was stopped too.
    job_page = service_jobs(service)
    assert any(j["status"] == "cancelled" and batch.id in j["name"] for j in job_page)


def written(service, job_id: str) -> bool:  # noqa: ANN001
    r = httpx.get(f"{service.url}/v1/jobs/{job_id}/results", params={"limit": 1}, timeout=30)
    return r.status_code == 200


def service_jobs(service) -> list[dict[str, Any]]:
    return httpx.get(f"{service.url}/v1/jobs", params={"limit": 100}, timeout=30).json()["data"]


def test_penalties_and_logit_bias_are_answered_as_raw_vllm_answers_them(
    client, finished, tiny_model
):
    from vllm import LLM, SamplingParams

    batch = finished["completions"][-1]
    got = {
        line["custom_id"]: Completion.model_validate(line["response"]["body"]).choices[0].text
        for line in lines_of(client, batch.output_file_id)
        if line["custom_id"] in PENALIZED
    }
    llm = LLM(
        model=str(tiny_model),
        max_model_len=2048,
        dtype="bfloat16",
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        seed=0,
    )
    try:
        expected = {}
        for cid, body in PENALIZED.items():
            fields = {k: v for k, v in body.items() if k != "logit_bias"}
            if "logit_bias" in body:
                fields["logit_bias"] = {int(k): v for k, v in body["logit_bias"].items()}
            params = SamplingParams(**fields)
            expected[cid] = llm.generate([PENALIZED_PROMPT], params, use_tqdm=False)[0]
            expected[cid] = expected[cid].outputs[0].text
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert got == expected
    assert got["biased"] != got["penalized"]
