"""``/v1/batches`` with the real ``openai`` client, the real database and the batch runner,
the pipeline's part played by writing the Parquet rows a job writes (``finish_job``).

What the engine does is tested end to end in ``test_openai_e2e``; here: validation with
line-numbered errors, the conversion to jobs, the status machine, the output and error
files' shapes (parsed with the ``openai`` package's own types), cancel, restart."""

from __future__ import annotations

import json

import openai
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from openai.types import Batch, Completion, FileObject
from openai.types.chat import ChatCompletion

from llm_batch.service.app import create_app
from llm_batch.service.store import JobStatus

from .conftest import (
    GUIDE_SYSTEM,
    batch_jobs,
    chat_line,
    completion_line,
    finish_job,
    jsonl,
    submit,
)

GUIDE = [chat_line("request-1"), chat_line("request-2", "How are you?")]


def lines_of(client, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_new_batch_is_validating_with_openais_fields(client):
    batch = submit(client, GUIDE, metadata={"team": "nlp"})
    assert isinstance(batch, Batch)
    assert batch.id.startswith("batch_") and batch.object == "batch"
    assert batch.status == "validating"
    assert batch.endpoint == "/v1/chat/completions" and batch.completion_window == "24h"
    assert batch.metadata == {"team": "nlp"}
    assert batch.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}
    assert batch.output_file_id is None and batch.error_file_id is None and batch.errors is None
    assert client.batches.retrieve(batch.id) == batch


def test_validation_makes_one_job_reading_a_parquet_input(app, client, runner, store):
    batch = submit(
        client,
        [
            chat_line("a", temperature=0.2, seed=7, stop="\n", top_p=0.9),
            chat_line("b", max_completion_tokens=5, max_tokens=None),
            {
                **chat_line("c"),
                "body": {
                    "model": "tiny",
                    "messages": [
                        {"role": "developer", "content": "Terse."},
                        {"role": "user", "content": [{"type": "text", "text": "{{ x }}"}]},
                    ],
                    "user": "someone",
                    "stream": False,
                },
            },
        ],
    )
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "in_progress" and batch.in_progress_at is not None
    assert batch.model == "tiny"
    assert batch.request_counts.total == 3
    (job,) = batch_jobs(app, batch.id)
    assert job.status == "queued" and job.name == f"{batch.id} (tiny)"
    spec = job.spec
    assert spec["prompt"]["messages_column"] == "messages"
    assert spec["carryover"] == ["custom_id"]
    assert spec["model"]["path"] == "tiny-hub-id"  # the catalog's block
    assert spec["sampling"]["overrides_column"] == "sampling"
    # OpenAI's defaults, not the job format's: temperature 1, up to the context for chat.
    assert spec["sampling"]["temperature"] == 1.0 and spec["sampling"]["max_tokens"] == 255
    rows = pq.read_table(spec["input"]["path"]).to_pylist()
    assert [r["custom_id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["messages"] == [
        {"role": "system", "content": GUIDE_SYSTEM},
        {"role": "user", "content": "Hello world!"},
    ]
    # developer is the system role; text parts are joined; contents are never templates.
    assert rows[2]["messages"] == [
        {"role": "system", "content": "Terse."},
        {"role": "user", "content": "{{ x }}"},
    ]
    assert {k: v for k, v in rows[0]["sampling"].items() if v is not None} == {
        "max_tokens": 1000, "temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["\n"]
    }  # fmt: skip
    assert rows[1]["sampling"]["max_tokens"] == 5
    assert rows[2]["sampling"]["temperature"] is None  # the job's default then
    # Running again (a restart mid-validation) makes no second job.
    app.state.openai.batches.update_batch(batch.id, status="validating")
    runner.run_once()
    assert [j.id for j in batch_jobs(app, batch.id)] == [job.id]
    assert len(store.page(limit=10)[0]) == 1


def test_completions_become_a_template_job(app, client, runner):
    batch = submit(client, [completion_line("x", "2 + 2 =")], endpoint="/v1/completions")
    runner.run_once()
    (job,) = batch_jobs(app, batch.id)
    assert job.spec["prompt"]["template"] == "{{ prompt }}"
    assert job.spec["sampling"]["max_tokens"] == 16  # OpenAI's default for completions
    assert pq.read_table(job.spec["input"]["path"]).column("prompt").to_pylist() == ["2 + 2 ="]


def test_penalties_logit_bias_and_vllms_extra_fields_are_honoured_per_request(app, client, runner):
    penalties = {
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"17": -100, "3": 2.5},
        "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
    }  # fmt: skip
    batch = submit(client, [chat_line("a", **penalties), chat_line("b")])
    runner.run_once()
    (job,) = batch_jobs(app, batch.id)
    rows = pq.read_table(job.spec["input"]["path"]).to_pylist()
    got = dict(rows[0]["sampling"])
    assert dict(got.pop("logit_bias")) == {17: -100.0, 3: 2.5}
    assert {k: got[k] for k in penalties if k != "logit_bias"} == {
        k: v for k, v in penalties.items() if k != "logit_bias"
    }
    assert all(rows[1]["sampling"][k] is None for k in penalties)
    # What the engine stage makes of the row: vLLM's own SamplingParams fields.
    from llm_batch.pipeline.engine_args import SamplingParamsCache

    params = SamplingParamsCache(job.spec["sampling"]).get(rows[0]["sampling"], 0)
    assert params.logit_bias == {17: -100.0, 3: 2.5}
    assert (params.presence_penalty, params.top_k, params.min_tokens) == (0.5, 20, 2)


def good(i: int) -> dict:
    return chat_line(f"r{i}")


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["this is not json"], [("invalid_json_line", 1, None)]),
        ([good(1), "[1, 2]"], [("invalid_json_line", 2, None)]),
        (
            [good(1), {**good(2), "custom_id": None}],
            [("missing_required_parameter", 2, "custom_id")],
        ),
        ([good(1), good(2), good(1)], [("duplicate_custom_id", 3, "custom_id")]),
        ([{**good(1), "url": "/v1/completions"}], [("url_mismatch", 1, "url")]),
        ([{**good(1), "method": "GET"}], [("invalid_value", 1, "method")]),
        ([chat_line("a", model="gpt-4o")], [("model_not_found", 1, "body.model")]),
        (
            [chat_line("a", tools=[{"type": "function"}])],
            [("unsupported_parameter", 1, "body.tools")],
        ),
        # Engine arguments are the operator's (the models file): a request has none.
        (
            [chat_line("a", trust_remote_code=True)],
            [("unsupported_parameter", 1, "body.trust_remote_code")],
        ),
        ([chat_line("a", temperature=3)], [("invalid_value", 1, "body.temperature")]),
        ([chat_line("a", stop=[""])], [("invalid_value", 1, "body.stop")]),
        ([chat_line("a", presence_penalty=3)], [("invalid_value", 1, "body.presence_penalty")]),
        (
            [chat_line("a", logit_bias={"abc": 1})],
            [("invalid_value", 1, "body.logit_bias.abc")],
        ),
        ([chat_line("a", logit_bias={"5": 101})], [("invalid_value", 1, "body.logit_bias.5")]),
        ([chat_line("a", top_k=-2)], [("invalid_value", 1, "body.top_k")]),
        ([chat_line("a", top_logprobs=2)], [("invalid_value", 1, "body.top_logprobs")]),
        (
            [{**good(1), "body": {"model": "tiny"}}],
            [("missing_required_parameter", 1, "body.messages")],
        ),
        ([], [("empty_file", None, None)]),
        (
            ["nope", good(2), {**good(3), "custom_id": "r2"}, chat_line("z", model="x")],
            [
                ("invalid_json_line", 1, None),
                ("duplicate_custom_id", 3, "custom_id"),
                ("model_not_found", 4, "body.model"),
            ],
        ),
    ],
)
def test_invalid_input_files_fail_with_line_numbered_errors(
    app, client, runner, settings, lines, expected
):
    batch = submit(client, lines)
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors.object == "list"
    got = [(e.code, e.line, e.param) for e in batch.errors.data]
    assert got == expected, batch.errors
    assert all(e.message for e in batch.errors.data)
    assert batch_jobs(app, batch.id) == []
    assert not (settings.batches_dir() / batch.id).exists()  # no Parquet left behind


def test_the_duplicate_names_the_first_line(client, runner):
    batch = submit(client, [good(1), good(2), good(1)])
    runner.run_once()
    (error,) = client.batches.retrieve(batch.id).errors.data
    assert error.message == "custom_id 'r1' is already used on line 1"


def test_too_many_requests(tmp_path, db_url, models_file):
    from openai import OpenAI

    from llm_batch.service.process import free_port
    from llm_batch.service.settings import Settings

    settings = Settings(
        data_dir=tmp_path / "d",
        db=db_url,
        models=models_file,
        max_batch_requests=2,
        ray_dashboard_port=free_port(),
    )
    app = create_app(settings, run_scheduler=False)
    with TestClient(app) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http)
        batch = submit(client, [good(1), good(2), good(3)])
        app.state.openai.runner.run_once()
        (error,) = client.batches.retrieve(batch.id).errors.data
        assert (error.code, error.line) == ("too_many_tasks", 3)


@pytest.mark.parametrize(
    ("change", "error", "param"),
    [
        ({"endpoint": "/v1/responses"}, openai.BadRequestError, "endpoint"),
        ({"completion_window": "48h"}, openai.BadRequestError, "completion_window"),
        ({"input_file_id": "file-nope"}, openai.NotFoundError, "input_file_id"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, openai.BadRequestError, "metadata"),
        ({"extra_body": {"priority": 3}}, openai.BadRequestError, "priority"),
    ],
)
def test_create_refusals_name_the_parameter(client, change, error, param):
    f = client.files.create(file=("r.jsonl", jsonl(GUIDE)), purpose="batch")
    args = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    with pytest.raises(error) as e:
        client.batches.create(**{**args, **change})
    assert e.value.body["param"] == param
    assert list(client.batches.list()) == []


def test_a_completed_chat_batch_writes_openai_shaped_files(app, client, runner, store):
    lines = [*GUIDE, chat_line("request-3", "x " * 5000)]
    batch = submit(client, lines)
    runner.run_once()
    (job,) = batch_jobs(app, batch.id)
    store.claim(job.id, submission_id=job.id)
    store.set_progress(job.id, {"rows_total": 3, "rows_done": 2, "rows_failed": 1})
    runner.run_once()
    assert client.batches.retrieve(batch.id).request_counts.model_dump() == {
        "total": 3, "completed": 1, "failed": 1
    }  # fmt: skip
    too_long = (
        "VLLMValidationError: The decoder prompt (length 5003) is longer than the maximum "
        "model length of 256."
    )
    finish_job(store, job, errors={"request-3": too_long})
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch.errors
    assert batch.finalizing_at is not None and batch.completed_at is not None
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    assert batch.usage.input_tokens == 14 and batch.usage.output_tokens == 6
    assert batch.usage.total_tokens == 20

    output = client.files.retrieve(batch.output_file_id)
    assert isinstance(output, FileObject) and output.purpose == "batch_output"
    assert output.filename == f"{batch.id}_output.jsonl"
    out = lines_of(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in out) == ["request-1", "request-2"]
    for line in out:
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        completion = ChatCompletion.model_validate(response["body"])
        assert completion.object == "chat.completion" and completion.model == "tiny"
        (choice,) = completion.choices
        assert choice.index == 0 and choice.finish_reason == "length"
        assert choice.message.role == "assistant" and choice.message.content == "Hi there 0"
        assert choice.logprobs is None
        assert completion.usage.model_dump(exclude_none=True) == {
            "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10
        }  # fmt: skip

    (err,) = lines_of(client, batch.error_file_id)
    assert err["custom_id"] == "request-3"
    assert err["error"] == {"code": "context_length_exceeded", "message": too_long}
    assert err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert client.files.retrieve(batch.error_file_id).purpose == "batch_output"
    assert {f.id for f in client.files.list(purpose="batch_output")} == {
        batch.output_file_id, batch.error_file_id
    }  # fmt: skip

    with pytest.raises(openai.ConflictError) as e:
        client.batches.cancel(batch.id)
    assert e.value.response.headers["x-should-retry"] == "false"


def test_completions_with_samples_and_logprobs(app, client, runner, store):
    lines = [completion_line(f"c{i}", n=2, logprobs=2) for i in range(3)]
    batch = submit(client, lines, endpoint="/v1/completions")
    runner.run_once()
    (job,) = batch_jobs(app, batch.id)
    assert (job.spec["sampling"]["n"], job.spec["sampling"]["logprobs"]) == (2, 2)
    finish_job(store, job)
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.error_file_id is None
    out = lines_of(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in out) == ["c0", "c1", "c2"]
    for line in out:
        completion = Completion.model_validate(line["response"]["body"])
        assert completion.object == "text_completion"
        assert [c.index for c in completion.choices] == [0, 1]
        assert [c.text for c in completion.choices] == ["Hi there 0", "Hi there 1"]
        logprobs = completion.choices[0].logprobs
        assert logprobs.tokens == ["Hi", " x"] and logprobs.text_offset == [0, 2]
        assert logprobs.top_logprobs == [{"Hi": -0.5}, {"Hi": -0.5}]
        assert completion.usage.completion_tokens == 6 and completion.usage.prompt_tokens == 7


def test_chat_logprobs_and_response_format_group_into_jobs(app, client, runner, store):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    json_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    lines = [
        chat_line("plain"),
        chat_line("lp", logprobs=True, top_logprobs=1),
        chat_line("json", response_format=json_format),
        chat_line("json2", response_format=json_format),
        chat_line("obj", response_format={"type": "json_object"}),
        chat_line("other", model="other"),
    ]
    batch = submit(client, lines)
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "in_progress" and batch.model == "tiny, other"
    jobs = batch_jobs(app, batch.id)
    assert len(jobs) == 5
    by_first = {
        pq.read_table(j.spec["input"]["path"]).column("custom_id")[0].as_py(): j for j in jobs
    }
    assert by_first["lp"].spec["sampling"]["logprobs"] == 1
    assert by_first["json"].spec["sampling"]["structured"]["json_schema"] == schema
    assert pq.read_table(by_first["json"].spec["input"]["path"]).num_rows == 2
    assert by_first["obj"].spec["sampling"]["structured"]["json_schema"] == {"type": "object"}
    assert by_first["other"].spec["model"]["path"] == "other-hub-id"
    for job in jobs:
        finish_job(store, job)
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    out = {line["custom_id"]: line for line in lines_of(client, batch.output_file_id)}
    assert sorted(out) == sorted(line["custom_id"] for line in lines)
    assert out["other"]["response"]["body"]["model"] == "other"
    content = ChatCompletion.model_validate(out["lp"]["response"]["body"]).choices[0].logprobs
    assert [t.token for t in content.content] == ["Hi", " x"]
    assert content.content[0].bytes == [72, 105]
    assert [t.token for t in content.content[0].top_logprobs] == ["Hi"]


def test_more_groups_than_jobs_allowed_fail_validation(client, runner):
    lines = [chat_line(f"r{n}", n=n) for n in range(1, 11)]
    batch = submit(client, lines)
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("too_many_groups", 9), ("too_many_groups", 10)
    ]  # fmt: skip


def test_cancel_mid_run_keeps_the_written_lines(app, client, runner, store):
    batch = submit(client, [chat_line(f"r{i}") for i in range(6)])
    runner.run_once()
    (job,) = batch_jobs(app, batch.id)
    store.claim(job.id, submission_id=job.id)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None
    runner.run_once()
    assert store.get(job.id).status == "cancelling"  # the scheduler stops its Ray run
    assert client.batches.retrieve(batch.id).status == "cancelling"
    # The run had written three rows when Ray stopped it.
    finish_job(store, job, only={"r0", "r2", "r4"}, status=JobStatus.CANCELLED)
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 3, "failed": 0}
    assert sorted(x["custom_id"] for x in lines_of(client, batch.output_file_id)) == [
        "r0", "r2", "r4"
    ]  # fmt: skip
    assert batch.error_file_id is None
    assert client.batches.cancel(batch.id).status == "cancelled"  # idempotent


def test_cancel_before_validation(app, client, runner):
    batch = submit(client, GUIDE)
    assert client.batches.cancel(batch.id).status == "cancelling"
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "cancelled"
    assert batch.output_file_id is None and batch_jobs(app, batch.id) == []


def test_a_failed_job_fails_the_batch_and_keeps_what_it_wrote(app, client, runner, store):
    batch = submit(client, GUIDE)
    runner.run_once()
    (job,) = batch_jobs(app, batch.id)
    finish_job(store, job, only={"request-1"}, status=JobStatus.FAILED)
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "failed" and batch.failed_at is not None
    (error,) = batch.errors.data
    assert error.code == "batch_failed" and job.id in error.message
    assert [x["custom_id"] for x in lines_of(client, batch.output_file_id)] == ["request-1"]


def test_list_pages_newest_first(client):
    ids = [submit(client, GUIDE).id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[:0:-1] and page.has_more
    raw = client.batches.with_raw_response.list(limit=2).http_response.json()
    assert (raw["object"], raw["first_id"], raw["last_id"]) == ("list", ids[2], ids[1])
    rest = client.batches.list(limit=2, after=ids[1])
    assert [b.id for b in rest.data] == [ids[0]] and not rest.has_more
    assert [b.id for b in client.batches.list()] == ids[::-1]
    assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]  # auto-paging
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_a_restarted_service_carries_on(app, client, runner, store, settings):
    from llm_batch.service.openai.output import write_results

    batch = submit(client, GUIDE)
    runner.run_once()
    (job,) = batch_jobs(app, batch.id)
    finish_job(store, job)
    # The service dies while finalizing: the files are written, the batch not yet ended.
    app.state.openai.batches.update_batch(batch.id, status="finalizing")
    write_results(
        batch_id=batch.id,
        endpoint=batch.endpoint,
        runs=[(store.get(job.id), "tiny")],
        folder=settings.files_dir(),
        owner=None,
    )
    # A new service on the same database and folder finishes it.
    again = create_app(settings, run_scheduler=False)
    with TestClient(again):
        again.state.openai.runner.run_once()
        row = again.state.openai.batches.get_batch(batch.id)
    assert row.status == "completed"
    assert len(lines_of(client, row.output_file_id)) == 2
    # The same file was written again, not a second one beside it.
    assert [f.id for f in client.files.list(purpose="batch_output")] == [row.output_file_id]
    input_id = client.batches.retrieve(batch.id).input_file_id
    assert sorted(p.name for p in settings.files_dir().iterdir()) == sorted(
        [input_id, row.output_file_id]
    )


def test_a_batch_past_its_window_expires_keeping_the_written_lines(app, client, runner, store):
    import datetime as dt

    from sqlalchemy import update

    from llm_batch.service.store import Batch as BatchRow

    batch = submit(client, [chat_line(f"r{i}") for i in range(4)])
    assert batch.expires_at == batch.created_at + 86400  # completion_window: 24h
    runner.run_once()
    (job,) = batch_jobs(app, batch.id)
    store.claim(job.id, submission_id=job.id)
    with store.engine.begin() as conn:  # the window ends now
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        conn.execute(update(BatchRow).where(BatchRow.id == batch.id).values(expires_at=past))
    runner.run_once()
    assert store.get(job.id).status == "cancelling"  # its job is stopped
    assert client.batches.retrieve(batch.id).status == "in_progress"
    finish_job(store, job, only={"r1", "r3"}, status=JobStatus.CANCELLED)
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 2, "failed": 2}
    assert sorted(x["custom_id"] for x in lines_of(client, batch.output_file_id)) == ["r1", "r3"]
    errors = lines_of(client, batch.error_file_id)
    assert sorted(x["custom_id"] for x in errors) == ["r0", "r2"]
    assert {x["error"]["code"] for x in errors} == {"batch_expired"}
    assert {x["response"]["status_code"] for x in errors} == {400}


def test_output_expires_after_dates_the_output_files(app, client, runner, store):
    f = client.files.create(file=("r.jsonl", jsonl(GUIDE)), purpose="batch")
    args = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(
            **args, extra_body={"output_expires_after": {"anchor": "x", "seconds": 3600}}
        )
    assert e.value.body["param"] == "output_expires_after"
    batch = client.batches.create(
        **args, extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 7200}}
    )
    runner.run_once()
    (job,) = batch_jobs(app, batch.id)
    store.claim(job.id, submission_id=job.id)
    finish_job(store, job)
    runner.run_once()
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    out = client.files.retrieve(batch.output_file_id)
    assert out.expires_at is not None and abs(out.expires_at - (batch.completed_at + 7200)) <= 1
