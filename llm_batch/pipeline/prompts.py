"""Prompt rendering: a row's columns through a sandboxed Jinja template.

Templates come from job files and from the network, so they are rendered in
Jinja's ``ImmutableSandboxedEnvironment`` (no attribute access to Python
internals, no mutation of row values) with ``StrictUndefined`` (a misspelt
column is an error, not an empty string). Only the columns a template uses are
turned into Python values; the carryover columns stay Arrow buffers.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llm_batch import columns
from llm_batch.errors import JobSpecError

__all__ = [
    "KeepIf",
    "PromptRenderer",
    "conversation",
    "expression_variables",
    "stopped_rows",
    "template_variables",
]

_MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_ROLES = ("system", "user", "assistant")


def _environment() -> ImmutableSandboxedEnvironment:
    # keep_trailing_newline: a template that ends in "\n" means it.
    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False
    )


def template_variables(source: str, *, field: str = "prompt.template") -> set[str]:
    """The top-level names a template reads (its columns); raises on a syntax error."""
    env = _environment()
    try:
        ast = env.parse(source)
    except TemplateSyntaxError as e:
        raise JobSpecError(
            f"{field}: template syntax error on line {e.lineno}: {e.message}"
        ) from None
    return set(meta.find_undeclared_variables(ast)) - set(env.globals)


def stopped_rows(batch: pa.Table) -> list[bool] | None:
    """Per row, whether it stopped at an earlier stage of a staged job (its ``dropped_by``
    is set); None for a batch of a job without stages."""
    if columns.DROPPED not in batch.column_names:
        return None
    return batch.column(columns.DROPPED).is_valid().to_pylist()


def expression_variables(source: str, *, field: str) -> set[str]:
    """The columns a ``keep_if`` expression reads; raises on a syntax error."""
    env = _environment()
    try:
        env.compile_expression(source)
        ast = env.parse("{{ (" + source + ") }}")
    except TemplateSyntaxError as e:
        raise JobSpecError(f"{field}: expression syntax error: {e.message}") from None
    return set(meta.find_undeclared_variables(ast)) - set(env.globals)


class KeepIf:
    """A stage's ``keep_if``: a Jinja expression over each row's columns, in the same
    sandbox as the templates. A row is kept when the expression is truthy."""

    def __init__(self, source: str, *, field: str):
        self.source = source
        self.variables = expression_variables(source, field=field)
        self._expression = _environment().compile_expression(source, undefined_to_none=False)

    def __call__(self, batch: pa.Table, live: list[bool]) -> list[bool | str]:
        """Per row: True (kept), False (not kept), or why it could not be evaluated.
        Rows not ``live`` (stopped earlier) are not evaluated (False)."""
        names = sorted(self.variables & set(batch.column_names))
        values = {name: batch.column(name).to_pylist() for name in names}
        out: list[bool | str] = []
        for i, alive in enumerate(live):
            if not alive:
                out.append(False)
                continue
            try:
                out.append(bool(self._expression(**{n: values[n][i] for n in names})))
            except Exception as e:  # noqa: BLE001 - this row's problem, said in its row
                out.append(f"keep_if {self.source!r} failed: {type(e).__name__}: {e}")
        return out


def conversation(value: Any) -> list[dict[str, str]]:
    """A row's whole conversation from a ``prompt.messages_column`` value: a list of
    ``{role, content}`` mappings or its JSON text. Raises ValueError saying what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"not a JSON list of messages: {e}") from None
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of {role, content} messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"message {i}: expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string")
        messages.append({"role": role, "content": content})
    return messages


class PromptRenderer:
    """Appends the rendered prompt (or chat messages) to a batch.

    Built from the plain ``prompt`` dict of a job spec so it pickles into Ray
    tasks. A row whose template fails to render (an undefined attribute, a
    sandbox refusal, a null where a value is needed) gets a render error and no
    prompt; the engine turns it into an error row instead of failing the job.
    With ``messages_column`` each row's conversation is taken from that column as
    it is: no template runs over it (its text is data, not a template).
    """

    def __init__(self, prompt: dict[str, Any], *, field: str = "prompt"):
        """``field``: the spec path of ``prompt``, for errors (``stages[1].prompt``)."""
        self._prompt = prompt
        env = _environment()
        self._messages_column: str | None = prompt.get("messages_column")
        if prompt.get("template") is not None:
            self._fields = {f"{field}.template": prompt["template"]}
        elif self._messages_column is not None:
            self._fields = {}
        else:
            self._fields = {
                f"{field}.messages[{i}].content": m["content"]
                for i, m in enumerate(prompt["messages"])
            }
        self.variables: set[str] = set()
        for field, source in self._fields.items():
            self.variables |= template_variables(source, field=field)
        if self._messages_column is not None:
            self.variables.add(self._messages_column)
        self._templates = [env.from_string(source) for source in self._fields.values()]
        self._roles = [m["role"] for m in prompt.get("messages") or []]
        self._chat = prompt.get("messages") is not None or self._messages_column is not None
        # A score job's second text: a template of its own, or a column taken as it is.
        self._pair_column: str | None = prompt.get("pair_column")
        self._pair = None
        self.pair_variables: set[str] = set()
        if prompt.get("template_pair") is not None:
            self.pair_variables = template_variables(
                prompt["template_pair"], field=f"{field}.template_pair"
            )
            self._pair = env.from_string(prompt["template_pair"])
        elif self._pair_column is not None:
            self.pair_variables = {self._pair_column}
        self.variables |= self.pair_variables

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = sorted(self.variables & set(batch.column_names))
        values = {name: batch.column(name).to_pylist() for name in names}
        input_errors = (
            batch.column(columns.INPUT_ERROR).to_pylist()
            if columns.INPUT_ERROR in batch.column_names
            else None
        )
        # Rows stopped at an earlier stage get no prompt: the engines skip them.
        stopped = stopped_rows(batch)
        rendered: list[Any] = []
        errors: list[str | None] = []
        for i in range(batch.num_rows):
            if stopped is not None and stopped[i]:
                rendered.append(None)
                errors.append(None)
                continue
            if input_errors is not None and input_errors[i] is not None:
                rendered.append(None)
                errors.append(input_errors[i])
                continue
            if self._messages_column is not None:
                try:
                    rendered.append(conversation(values[self._messages_column][i]))
                    errors.append(None)
                except ValueError as e:
                    rendered.append(None)
                    errors.append(f"prompt.messages_column {self._messages_column!r}: {e}")
                continue
            row = {name: values[name][i] for name in names}
            try:
                texts = [t.render(row) for t in self._templates]
            except Exception as e:  # noqa: BLE001 - any template failure is this row's error
                rendered.append(None)
                errors.append(f"prompt rendering failed: {type(e).__name__}: {e}")
                continue
            errors.append(None)
            if self._chat:
                rendered.append(
                    [{"role": r, "content": c} for r, c in zip(self._roles, texts, strict=True)]
                )
            else:
                rendered.append(texts[0])
        if self._pair is not None or self._pair_column is not None:
            batch = batch.append_column(columns.PAIR, self._pairs(values, errors, stopped))
        column = columns.MESSAGES if self._chat else columns.PROMPT
        arr = pa.array(rendered, type=_MESSAGE_TYPE if self._chat else pa.string())
        batch = batch.append_column(column, arr)
        return batch.append_column(columns.RENDER_ERROR, pa.array(errors, type=pa.string()))

    def _pairs(
        self, values: dict[str, list[Any]], errors: list[str | None], stopped: list[bool] | None
    ) -> pa.Array:
        """Each row's second text (a row whose pair fails gets its render error)."""
        pairs: list[str | None] = []
        names = sorted(self.pair_variables & set(values))
        for i, error in enumerate(errors):
            if error is not None or (stopped is not None and stopped[i]):
                pairs.append(None)
                continue
            if self._pair_column is not None:
                value = values[self._pair_column][i]
                if value is None:
                    errors[i] = f"prompt.pair_column {self._pair_column!r}: the value is null"
                pairs.append(None if value is None else str(value))
                continue
            assert self._pair is not None
            try:
                pairs.append(self._pair.render({name: values[name][i] for name in names}))
            except Exception as e:  # noqa: BLE001 - this row's error, as for the prompt
                pairs.append(None)
                errors[i] = f"prompt.template_pair rendering failed: {type(e).__name__}: {e}"
        return pa.array(pairs, type=pa.string())
