"""``/v1/batches`` on ``/v1/embeddings``, no engine: the real ``openai`` client, the real
database and batch runner, the pipeline's part played by writing the rows an embeddings job
writes (``finish_embeddings``).

Conversion: one row per element of a request's ``input`` (a string, strings, token ids),
the catalog model's task checked, refusals naming the line and the field; output: OpenAI's
embedding response in float and base64, parsed as the ``openai`` client parses it. The
engine's part is tested end to end in ``test_openai_e2e``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai._models import construct_type
from openai._types import omit
from openai.lib._parsing._embeddings import parse_embedding_response
from openai.types import CreateEmbeddingResponse

from llm_batch.pipeline.manifest import Manifest
from llm_batch.service.store import Job, JobStatus, JobStore

from .conftest import batch_jobs, chat_line, submit

ENDPOINT = "/v1/embeddings"
DIM = 8


def embedding_line(custom_id: str, input: Any = "Hello world", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": "embedder", "input": input, **body},
    }


@pytest.fixture
def models_file(tmp_path: Path, tiny_model: Path) -> Path:
    # ``embedder`` is a real folder (its tokenizer decodes token ids); the others are hub
    # ids, never loaded (the scheduler is off) and with no tokenizer here.
    path = tmp_path / "models.yaml"
    path.write_text(
        "tiny:\n  path: tiny-hub-id\n  engine: {max_model_len: 256}\n"
        f"embedder:\n  path: {tiny_model}\n  task: embed\n  engine: {{max_model_len: 256}}\n"
        "hub-embedder:\n  path: embed-hub-id\n  task: embed\n"
    )
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def ids_of(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def validated(app, client, runner, lines: list[Any]):  # noqa: ANN001, ANN201
    batch = submit(client, lines, endpoint=ENDPOINT)
    runner.run_once()
    return client.batches.retrieve(batch.id)


def errors_of(batch) -> list[tuple[str | None, int | None, str | None]]:  # noqa: ANN001
    assert batch.status == "failed", batch
    return [(e.code, e.line, e.param) for e in batch.errors.data]


# -- conversion ------------------------------------------------------------------------


def test_each_input_element_is_a_row_of_one_job(app, client, runner, tokenizer):
    hello = ids_of(tokenizer, "Hello there")
    lines = [
        embedding_line("one", "A single text.", user="someone"),
        embedding_line("list", ["first", "second", "third"], encoding_format="base64"),
        embedding_line("ids", hello, encoding_format="float"),
        embedding_line("id-lists", [hello, ids_of(tokenizer, "General Kenobi")]),
    ]
    batch = validated(app, client, runner, lines)
    assert batch.status == "in_progress", batch.errors
    assert batch.endpoint == ENDPOINT and batch.model == "embedder"
    assert batch.request_counts.total == 4
    (job,) = batch_jobs(app, batch.id)
    spec = job.spec
    assert spec["model"]["task"] == "embed" and spec["model"]["pooling"] is None
    assert spec["prompt"]["template"] == "{{ prompt }}"
    assert spec["carryover"] == ["custom_id", "input_index", "input_count", "encoding_format"]
    rows = pq.read_table(spec["input"]["path"]).to_pylist()
    assert [(r["custom_id"], r["input_index"], r["input_count"]) for r in rows] == [
        ("one", 0, 1),
        ("list", 0, 3), ("list", 1, 3), ("list", 2, 3),
        ("ids", 0, 1),
        ("id-lists", 0, 2), ("id-lists", 1, 2),
    ]  # fmt: skip
    assert [r["prompt"] for r in rows] == [
        "A single text.", "first", "second", "third",
        "Hello there", "Hello there", "General Kenobi",
    ]  # fmt: skip
    assert [r["encoding_format"] for r in rows] == ["float"] + ["base64"] * 3 + ["float"] * 3
    # The decoded ids are exactly what the engine will tokenize the text into.
    assert ids_of(tokenizer, rows[4]["prompt"]) == hello


def test_dimensions_group_requests_into_jobs(app, client, runner):
    lines = [
        embedding_line("a"),
        embedding_line("b", dimensions=64),
        embedding_line("c"),
        embedding_line("d", ["x", "y"], dimensions=64),
    ]
    batch = validated(app, client, runner, lines)
    assert batch.status == "in_progress", batch.errors
    plain, cut = batch_jobs(app, batch.id)
    assert plain.spec["model"]["pooling"] is None
    assert cut.spec["model"]["pooling"]["dimensions"] == 64
    assert cut.spec["model"]["path"] == plain.spec["model"]["path"]  # the catalog's block
    ids = [
        pq.read_table(j.spec["input"]["path"]).column("custom_id").to_pylist() for j in (plain, cut)
    ]
    assert ids == [["a", "c"], ["b", "d", "d"]]
    row = app.state.openai.batches.get_batch(batch.id)
    assert [(r["requests"], r["rows"]) for r in row.jobs] == [(2, 2), (2, 3)]


def test_live_counts_are_requests_not_rows(app, client, runner, store: JobStore):
    lines = [embedding_line("a", ["x"] * 3), embedding_line("b", ["y"] * 3)]
    batch = validated(app, client, runner, lines)
    (job,) = batch_jobs(app, batch.id)
    store.claim(job.id, submission_id=job.id)
    store.set_progress(job.id, {"rows_total": 6, "rows_done": 3, "rows_failed": 0})
    runner.run_once()
    assert client.batches.retrieve(batch.id).request_counts.completed == 1


@pytest.mark.parametrize(
    ("line", "code", "param", "needle"),
    [
        (embedding_line("x", model="tiny"), "unsupported_value", "body.model",
         "model 'tiny' is not an embedding model (its task is generate)"),
        (embedding_line("x", model="gpt-4o"), "model_not_found", "body.model", "gpt-4o"),
        (embedding_line("x", encoding_format="int8"), "invalid_value", "body.encoding_format",
         "encoding_format must be float or base64, got 'int8'"),
        (embedding_line("x", input=None), "missing_required_parameter", "body.input",
         "body.input is required"),
        (embedding_line("x", input=[]), "invalid_value", "body.input", "input must be"),
        (embedding_line("x", input=""), "invalid_value", "body.input", "must not be empty"),
        (embedding_line("x", input=["ok", ""]), "invalid_value", "body.input[1]",
         "must not be empty"),
        (embedding_line("x", input=["ok", 3]), "invalid_value", "body.input[1]", "not mixed"),
        (embedding_line("x", input=[[1, 2], []]), "invalid_value", "body.input[1]", "input must"),
        (embedding_line("x", input=[[1, 2], "t"]), "invalid_value", "body.input[1]", "not mixed"),
        (embedding_line("x", input={"text": "t"}), "invalid_value", "body.input", "input must"),
        (embedding_line("x", input=[1, -2]), "invalid_value", "body.input", "not be negative"),
        (embedding_line("x", input=[True, 1]), "invalid_value", "body.input[1]", "not mixed"),
        (embedding_line("x", input=[10**6]), "invalid_value", "body.input",
         "token id 1000000 is outside the vocabulary of model 'embedder'"),
        (embedding_line("x", input=["t"] * 2049), "invalid_value", "body.input",
         "at most 2048 elements"),
        (embedding_line("x", dimensions=0), "invalid_value", "body.dimensions",
         "dimensions must be an integer from 1 up"),
        (embedding_line("x", prompt="t"), "unsupported_parameter", "body.prompt",
         "prompt is not supported"),
        (embedding_line("x", input=[5, 6], model="hub-embedder"), "unsupported_value",
         "body.input", "token ids are not supported for model 'hub-embedder': its tokenizer "
         "cannot be loaded here"),
        ({**embedding_line("x"), "url": "/v1/chat/completions"}, "url_mismatch", "url",
         "does not match the batch's endpoint '/v1/embeddings'"),
    ],
)  # fmt: skip
def test_a_bad_line_is_refused_naming_it_and_its_field(
    app, client, runner, line, code, param, needle
):
    batch = validated(app, client, runner, [embedding_line("fine"), line])
    assert errors_of(batch) == [(code, 2, param)]
    assert needle in batch.errors.data[0].message
    assert batch_jobs(app, batch.id) == []


def test_token_ids_that_do_not_round_trip_are_refused(app, client, runner, tokenizer):
    # A merged token spelled out as its characters: the same text, other ids (the engine,
    # which takes text, would embed the merged token instead).
    ids = ids_of(tokenizer, "Hello world")
    merged = next(t for t in tokenizer.convert_ids_to_tokens(ids) if len(t) > 1)
    spelled = tokenizer.convert_tokens_to_ids(list(merged))
    assert tokenizer.decode(spelled) == merged.replace("Ġ", " ")
    batch = validated(app, client, runner, [embedding_line("a", [ids, spelled])])
    assert errors_of(batch) == [("unsupported_value", 1, "body.input[1]")]
    assert batch.errors.data[0].message.startswith("token ids are not supported unless")


def test_mixed_endpoints_are_refused_per_line(app, client, runner):
    lines = [embedding_line("e"), chat_line("c"), {**embedding_line("m"), "url": "/v1/completions"}]
    batch = validated(app, client, runner, lines)
    assert errors_of(batch) == [("url_mismatch", 2, "url"), ("url_mismatch", 3, "url")]
    # And an embedding model is refused where text is generated.
    chat = submit(client, [chat_line("c", model="embedder")])
    runner.run_once()
    (error,) = client.batches.retrieve(chat.id).errors.data
    assert (error.code, error.param) == ("unsupported_value", "body.model")
    assert "'embedder' is not a text generation model (its task is embed)" in error.message


def test_inputs_of_all_requests_count_against_the_batch_limit(settings, tmp_path):
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from llm_batch.service.app import create_app

    app = create_app(settings.model_copy(update={"max_batch_requests": 4}), run_scheduler=False)
    with TestClient(app) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http)
        lines = [embedding_line("a", ["x", "y"]), embedding_line("b", ["x", "y"]),
                 embedding_line("c", "z")]  # fmt: skip
        batch = submit(client, lines, endpoint=ENDPOINT)
        app.state.openai.runner.run_once()
        (error,) = client.batches.retrieve(batch.id).errors.data
        assert (error.code, error.line, error.param) == ("too_many_tasks", 3, "body.input")


# -- output ------------------------------------------------------------------------------


def vector(text: str) -> np.ndarray:
    """A recognisable float32 vector per text, with values no short decimal spells."""
    seed = int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


EMBEDDING_ROWS = pa.schema(
    [
        ("row_id", pa.int64()),
        ("custom_id", pa.string()),
        ("input_index", pa.int32()),
        ("input_count", pa.int32()),
        ("encoding_format", pa.string()),
        ("embedding", pa.list_(pa.float32(), DIM)),
        ("num_input_tokens", pa.int32()),
        ("error", pa.string()),
    ]
)


def finish_embeddings(
    store: JobStore,
    job: Job,
    *,
    errors: dict[tuple[str, int], str] | None = None,
    rows: int | None = None,
    status: JobStatus = JobStatus.SUCCEEDED,
) -> None:
    """Write the rows an embeddings job writes for ``job`` (the first ``rows`` of them;
    ``errors`` maps (custom_id, input_index) to that row's error), in two part files that
    cut a request in two and come in another order than the input's, and end the job."""
    errors = errors or {}
    inputs = pq.read_table(job.spec["input"]["path"]).to_pylist()[:rows]
    written = []
    for row_id, row in enumerate(inputs):
        error = errors.get((row["custom_id"], row["input_index"]))
        written.append(
            {
                "row_id": row_id,
                **{k: row[k] for k in ("custom_id", "input_index", "input_count")},
                "encoding_format": row["encoding_format"],
                "embedding": None if error else vector(row["prompt"]),
                "num_input_tokens": None if error else len(row["prompt"]),
                "error": error,
            }
        )
    out = Path(job.output_path)
    out.mkdir(parents=True, exist_ok=True)
    cut = len(written) // 2 + 1
    halves = {
        "part-000000000000-000000.parquet": written[cut:],
        "part-000000000001-000000.parquet": written[:cut],
    }
    for name, part in halves.items():
        pq.write_table(pa.Table.from_pylist(part, schema=EMBEDDING_ROWS), out / name)
    Manifest("test", files=sorted(halves)).write(str(out))
    assert store.finish(
        job.id, status, from_statuses=("queued", "running", "cancelling", "cancelled")
    )


def parsed(body: dict[str, Any]) -> CreateEmbeddingResponse:
    """The body as the ``openai`` client makes it: base64 decoded by its own parser (what
    ``client.embeddings.create`` runs on a response when it asked for base64)."""
    response = construct_type(type_=CreateEmbeddingResponse, value=body)
    response = parse_embedding_response(response, encoding_format=omit)
    return CreateEmbeddingResponse.model_validate(response.model_dump())


def lines_of(client, file_id: str | None) -> list[dict[str, Any]]:  # noqa: ANN001
    assert file_id is not None
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_a_completed_embeddings_batch_writes_openai_shaped_lines(app, client, runner, store):
    texts = {
        "f": ["one text"],
        "b": ["one text"],
        "fl": ["p", "qq", "rrr"],
        "bl": ["p", "qq", "rrr"],
        "bad": ["p", "qq"],
    }
    lines = [
        embedding_line(cid, t[0] if cid in ("f", "b") else t,
                       **({"encoding_format": "base64"} if cid.startswith("b") else {}))
        for cid, t in texts.items()
    ]  # fmt: skip
    batch = validated(app, client, runner, lines)
    (job,) = batch_jobs(app, batch.id)
    message = "The decoder prompt (length 300) is longer than the maximum model length of 256."
    finish_embeddings(store, job, errors={("bad", 1): message})
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 4, "failed": 1}

    out = lines_of(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in out) == ["b", "bl", "f", "fl"]
    results = {}
    prompt_tokens = 0
    for line in out:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        body = response["body"]
        assert set(body) == {"object", "data", "model", "usage"}
        assert body["object"] == "list" and body["model"] == "embedder"
        is_base64 = line["custom_id"].startswith("b")
        for item in body["data"]:
            assert set(item) == {"object", "index", "embedding"} and item["object"] == "embedding"
            assert isinstance(item["embedding"], str if is_base64 else list)
        if not is_base64:  # floats: OpenAI's own type takes the body as it is
            CreateEmbeddingResponse.model_validate(body)
        result = results[line["custom_id"]] = parsed(body)
        want = texts[line["custom_id"]]
        assert [d.index for d in result.data] == list(range(len(want)))
        for d in result.data:
            # Exact: float32 in, float32 out, through JSON numbers or base64 bytes.
            assert np.array_equal(np.asarray(d.embedding, dtype=np.float32), vector(want[d.index]))
        tokens = sum(len(t) for t in want)
        assert result.usage.prompt_tokens == result.usage.total_tokens == tokens
        prompt_tokens += tokens
    for floats, packed in (("f", "b"), ("fl", "bl")):
        assert results[floats].data == results[packed].data

    (error,) = lines_of(client, batch.error_file_id)
    assert error["custom_id"] == "bad"
    assert error["error"] == {"code": "context_length_exceeded", "message": message}
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["message"] == message
    # A failed request's inputs that were embedded count too (here "bad"'s first: "p").
    assert batch.usage.input_tokens == batch.usage.total_tokens == prompt_tokens + 1
    assert batch.usage.output_tokens == 0


def test_a_request_cut_by_a_cancel_gets_no_line(app, client, runner, store):
    lines = [embedding_line("whole", ["a", "b"]), embedding_line("cut", ["c", "d", "e"])]
    batch = validated(app, client, runner, lines)
    (job,) = batch_jobs(app, batch.id)
    store.claim(job.id, submission_id=job.id)
    client.batches.cancel(batch.id)
    runner.run_once()
    finish_embeddings(store, job, rows=4, status=JobStatus.CANCELLED)  # "cut" half done
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "cancelled"
    assert [line["custom_id"] for line in lines_of(client, batch.output_file_id)] == ["whole"]
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 0}
    assert batch.error_file_id is None
