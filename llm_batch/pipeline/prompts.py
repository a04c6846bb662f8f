"""Prompt rendering: a row's columns through a sandboxed Jinja template.

Templates come from job files and from the network, so they are rendered in
Jinja's ``ImmutableSandboxedEnvironment`` (no attribute access to Python
internals, no mutation of row values) with ``StrictUndefined`` (a misspelt
column is an error, not an empty string). Only the columns a template uses are
turned into Python values; the carryover columns stay Arrow buffers.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llm_batch import columns
from llm_batch.errors import JobSpecError

__all__ = ["PromptRenderer", "template_variables"]

_MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


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


class PromptRenderer:
    """Appends the rendered prompt (or chat messages) to a batch.

    Built from the plain ``prompt`` dict of a job spec so it pickles into Ray
    tasks. A row whose template fails to render (an undefined attribute, a
    sandbox refusal, a null where a value is needed) gets a render error and no
    prompt; the engine turns it into an error row instead of failing the job.
    """

    def __init__(self, prompt: dict[str, Any]):
        self._prompt = prompt
        env = _environment()
        if prompt.get("template") is not None:
            self._fields = {"prompt.template": prompt["template"]}
        else:
            self._fields = {
                f"prompt.messages[{i}].content": m["content"]
                for i, m in enumerate(prompt["messages"])
            }
        self.variables: set[str] = set()
        for field, source in self._fields.items():
            self.variables |= template_variables(source, field=field)
        self._templates = [env.from_string(source) for source in self._fields.values()]
        self._roles = [m["role"] for m in prompt.get("messages") or []]
        self._chat = prompt.get("messages") is not None

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = sorted(self.variables & set(batch.column_names))
        values = {name: batch.column(name).to_pylist() for name in names}
        input_errors = (
            batch.column(columns.INPUT_ERROR).to_pylist()
            if columns.INPUT_ERROR in batch.column_names
            else None
        )
        rendered: list[Any] = []
        errors: list[str | None] = []
        for i in range(batch.num_rows):
            if input_errors is not None and input_errors[i] is not None:
                rendered.append(None)
                errors.append(input_errors[i])
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
        column = columns.MESSAGES if self._chat else columns.PROMPT
        arr = pa.array(rendered, type=_MESSAGE_TYPE if self._chat else pa.string())
        batch = batch.append_column(column, arr)
        return batch.append_column(columns.RENDER_ERROR, pa.array(errors, type=pa.string()))
