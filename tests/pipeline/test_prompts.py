"""Prompt rendering: sandboxed, strict about columns, errors per row."""

from __future__ import annotations

import pyarrow as pa
import pytest

from llm_batch import columns
from llm_batch.errors import JobSpecError
from llm_batch.pipeline.prompts import PromptRenderer, template_variables


def test_variables_are_the_columns_a_template_reads():
    assert template_variables("{{ a }} {% for x in b %}{{ x.y }}{% endfor %} {{ c | upper }}") == {
        "a",
        "b",
        "c",
    }


def test_syntax_error_names_the_field_and_line():
    with pytest.raises(JobSpecError, match=r"prompt.template: template syntax error on line 2"):
        template_variables("ok\n{{ broken ")


def test_renders_and_keeps_the_table():
    table = pa.table({"text": ["a", "b"], "keep": pa.array([[1], [2]], pa.list_(pa.int64()))})
    out = PromptRenderer({"template": "T: {{ text }}"})(table)
    assert out.column(columns.PROMPT).to_pylist() == ["T: a", "T: b"]
    assert out.column(columns.RENDER_ERROR).to_pylist() == [None, None]
    # The carryover column is the same buffer, not a copy.
    assert (
        out.column("keep").chunk(0).buffers()[1].address
        == table.column("keep").chunk(0).buffers()[1].address
    )


def test_chat_messages_render_each_content():
    table = pa.table({"q": ["hi"]})
    out = PromptRenderer(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "{{ q }}?"},
            ]
        }
    )(table)
    assert out.column(columns.MESSAGES).to_pylist() == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi?"}]
    ]


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ text.__class__.__mro__[1].__subclasses__() }}",
        "{{ text.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_sandbox_refuses_python_internals(template):
    out = PromptRenderer({"template": template})(pa.table({"text": ["x"]}))
    assert out.column(columns.PROMPT).to_pylist() == [None]
    error = out.column(columns.RENDER_ERROR).to_pylist()[0]
    assert error.startswith("prompt rendering failed")


def test_undefined_value_is_a_row_error_not_a_job_error():
    table = pa.table({"m": pa.array([{"x": "1"}, None], pa.struct([("x", pa.string())]))})
    out = PromptRenderer({"template": "{{ m.x }}"})(table)
    assert out.column(columns.PROMPT).to_pylist() == ["1", None]
    assert out.column(columns.RENDER_ERROR).to_pylist()[1].startswith("prompt rendering failed")


_CONVERSATION = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def test_messages_column_passes_each_rows_conversation_as_is():
    conversations = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "{{ not jinja }}"},
        ],
        [{"role": "user", "content": "hi"}],
    ]
    table = pa.table({"conv": pa.array(conversations, _CONVERSATION), "id": [1, 2]})
    renderer = PromptRenderer({"messages_column": "conv"})
    assert renderer.variables == {"conv"}
    out = renderer(table)
    # Contents are data, never templates: "{{ not jinja }}" stays as written.
    assert out.column(columns.MESSAGES).to_pylist() == conversations
    assert out.column(columns.RENDER_ERROR).to_pylist() == [None, None]
    assert columns.PROMPT not in out.column_names


def test_messages_column_may_hold_json_text():
    table = pa.table({"conv": ['[{"role": "user", "content": "hi"}]']})
    out = PromptRenderer({"messages_column": "conv"})(table)
    assert out.column(columns.MESSAGES).to_pylist() == [[{"role": "user", "content": "hi"}]]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (None, "non-empty list"),
        ("[]", "non-empty list"),
        ("{not json", "not a JSON list"),
        ('[{"role": "robot", "content": "x"}]', "message 0: role must be one of"),
        ('[{"role": "user", "content": 3}]', "message 0: content must be a string"),
        ('["hi"]', "message 0: expected an object"),
    ],
)
def test_a_bad_conversation_is_that_rows_error(value, needle):
    table = pa.table(
        {"conv": pa.array([value, '[{"role": "user", "content": "ok"}]'], pa.string())}
    )
    out = PromptRenderer({"messages_column": "conv"})(table)
    assert out.column(columns.MESSAGES).to_pylist()[0] is None
    error = out.column(columns.RENDER_ERROR).to_pylist()[0]
    assert error.startswith("prompt.messages_column 'conv': ") and needle in error, error
    assert out.column(columns.RENDER_ERROR).to_pylist()[1] is None


def test_plan_names_the_messages_column_the_input_lacks(tmp_path):
    import pyarrow.parquet as pq

    from llm_batch.job.spec import JobSpec
    from llm_batch.pipeline.run import plan_job

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "in.parquet")
    spec = JobSpec.from_dict(
        {
            "input": {"path": str(tmp_path / "in.parquet")},
            "prompt": {"messages_column": "conversation"},
            "model": {"path": "hub-id"},
        }
    )
    with pytest.raises(JobSpecError, match="prompt.messages_column uses column 'conversation'"):
        plan_job(spec)
