"""Validating a batch: its JSONL input, line by line, into Parquet inputs and job specs.

One pass over the input file checks every line the way OpenAI's Batch API does
(each a JSON object with a unique ``custom_id``, ``method: POST``, the batch's
``url``, a ``body`` whose ``model`` the service offers, fields this service can
honour) and, while no line has failed, writes the requests to Parquet:

    custom_id   string                                  the job's carryover column
    messages    list<struct<role, content>>              /v1/chat/completions
    prompt      string                                   /v1/completions
    sampling    struct<max_tokens, temperature, top_p,   per-request sampling: the job's
                       seed, stop>                       ``sampling.overrides_column``

``n``, ``logprobs``/``top_logprobs`` and ``response_format`` are job-level in the
job format, as is the model: requests are grouped by (model, n, logprobs,
response format) and each group becomes one job (its own Parquet file), at most
``MAX_GROUPS`` per batch. Memory stays bounded by a buffer of rows per group and
the set of ``custom_id``s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llm_batch.service.catalog import ModelCatalog

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "ENDPOINTS",
    "INPUT_COLUMNS",
    "MAX_GROUPS",
    "Conversion",
    "Group",
    "LineError",
    "convert_input",
    "job_body",
]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)

MAX_GROUPS = 8  # jobs one batch may become (each starts its own engines)
_MAX_ERRORS = 100  # errors reported before validation stops reading
_FLUSH_ROWS = 1024
_ROWS_PER_FILE = 512  # output rows per Parquet file: a cancelled batch keeps what was written
_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_CHAT_MAX_TOKENS = 4096  # when the model block does not say its max_model_len

OVERRIDES_TYPE = pa.struct(
    [
        ("max_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),
        ("stop", pa.list_(pa.string())),
    ]
)
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
INPUT_COLUMNS = {CHAT: "messages", COMPLETIONS: "prompt"}

# Body fields accepted and ignored when they have these values (they change nothing here).
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "stream": (False, None),
    "stream_options": (None,),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "echo": (False, None),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "modalities": (None, ["text"]),
}
# Body fields that carry no meaning for generation: accepted with any value.
_INFORMATIONAL = ("user", "metadata", "store", "service_tier", "safety_identifier")


@dataclasses.dataclass(frozen=True)
class LineError:
    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Refused(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclasses.dataclass
class Group:
    """Requests that run as one job: same model, n, logprobs and response format."""

    index: int
    model: str
    n: int
    logprobs: int | None
    json_schema: dict[str, Any] | None
    path: Path
    requests: int = 0
    _writer: pq.ParquetWriter | None = None
    _rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Conversion:
    total: int
    groups: list[Group]
    errors: list[LineError]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(g.model for g in self.groups))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(body: dict[str, Any], name: str, *, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"an integer from {low}" + (f" to {high}" if high is not None else " up")
        raise _Refused("invalid_value", f"{name} must be {bound}, got {value!r}", f"body.{name}")
    return int(value)


def _number(
    body: dict[str, Any], name: str, *, low: float, high: float, low_open: bool = False
) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _Refused(
            "invalid_value", f"{name} must be a number in {interval}, got {value!r}", f"body.{name}"
        )
    return float(value)


def _stop(body: dict[str, Any]) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _Refused(
            "invalid_value", "stop must be a non-empty string or a list of them", "body.stop"
        )
    return stops or None


def _text(content: Any, param: str) -> str:
    """A message's content as text: a string, or a list of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _Refused(
                    "unsupported_value",
                    f"only text content parts are supported, got {kind!r}",
                    f"{param}[{j}]",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise _Refused("invalid_value", "content must be a string or a list of text parts", param)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise _Refused("missing_required_parameter", "body.messages is required", "body.messages")
    if not isinstance(messages, list) or not messages:
        raise _Refused("invalid_value", "messages must be a non-empty list", "body.messages")
    out = []
    for i, message in enumerate(messages):
        param = f"body.messages[{i}]"
        if not isinstance(message, dict):
            raise _Refused("invalid_value", "a message must be an object", param)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _Refused(
                "unsupported_value",
                f"role must be system, developer, user or assistant, got {role!r}",
                f"{param}.role",
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise _Refused("unsupported_value", "tool calls are not supported", param)
        out.append({"role": role, "content": _text(message.get("content"), f"{param}.content")})
    return out


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise _Refused("missing_required_parameter", "body.prompt is required", "body.prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _Refused(
            "unsupported_value",
            "prompt must be one string (lists of prompts and token ids are not supported)",
            "body.prompt",
        )
    return prompt


def _logprobs(body: dict[str, Any], endpoint: str) -> int | None:
    """The job-level ``sampling.logprobs`` (top-k per token) a request asks for."""
    if endpoint == COMPLETIONS:
        return _int(body, "logprobs", low=0, high=20)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _Refused("invalid_value", "logprobs must be true or false", "body.logprobs")
    top = _int(body, "top_logprobs", low=0, high=20)
    if top is not None and not wanted:
        raise _Refused("invalid_value", "top_logprobs needs logprobs: true", "body.top_logprobs")
    return (top or 0) if wanted else None


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a response format asks the output to follow (None: free text)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _Refused(
                "invalid_value",
                "response_format.json_schema.schema must be a JSON schema object",
                "body.response_format.json_schema.schema",
            )
        return schema
    raise _Refused(
        "invalid_value",
        "response_format.type must be text, json_object or json_schema",
        "body.response_format",
    )


_KNOWN = {
    CHAT: {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "seed", "stop", "n", "logprobs", "top_logprobs", "response_format",
    },
    COMPLETIONS: {
        "model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
        "logprobs",
    },
}  # fmt: skip


def _check_fields(body: dict[str, Any], endpoint: str) -> None:
    for name, value in body.items():
        if name in _KNOWN[endpoint] or name in _INFORMATIONAL:
            continue
        if name in _HARMLESS and value in _HARMLESS[name]:
            continue
        what = (
            "is not supported"
            if name not in _HARMLESS
            else f"is only supported as {_HARMLESS[name][0]!r}"
        )
        raise _Refused("unsupported_parameter", f"{name} {what} by this service", f"body.{name}")


@dataclasses.dataclass(frozen=True)
class _Request:
    custom_id: str
    model: str
    text: Any  # the prompt string or the message list
    overrides: dict[str, Any]
    key: tuple[Any, ...]  # (model, n, logprobs, schema as JSON)
    json_schema: dict[str, Any] | None


def _request(value: Any, endpoint: str, catalog: ModelCatalog) -> _Request:
    """One input line's request; raises _Refused naming the parameter."""
    if not isinstance(value, dict):
        raise _Refused("invalid_json_line", f"expected a JSON object, got {type(value).__name__}")
    custom_id = value.get("custom_id")
    if custom_id is None or custom_id == "":
        raise _Refused("missing_required_parameter", "custom_id is required", "custom_id")
    if not isinstance(custom_id, str):
        raise _Refused("invalid_value", "custom_id must be a string", "custom_id")
    method = value.get("method")
    if method != "POST":
        raise _Refused("invalid_value", f"method must be POST, got {method!r}", "method")
    url = value.get("url")
    if url != endpoint:
        raise _Refused(
            "url_mismatch",
            f"url {url!r} does not match the batch's endpoint {endpoint!r}",
            "url",
        )
    body = value.get("body")
    if not isinstance(body, dict):
        raise _Refused("missing_required_parameter", "body must be an object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Refused("missing_required_parameter", "body.model is required", "body.model")
    if model not in catalog.names:
        offered = ", ".join(catalog.names) or "none"
        raise _Refused(
            "model_not_found",
            f"model {model!r} is not offered by this service (offered: {offered})",
            "body.model",
        )
    _check_fields(body, endpoint)
    text: Any = _messages(body) if endpoint == CHAT else _prompt(body)
    max_tokens = _int(body, "max_tokens", low=1)
    if endpoint == CHAT:
        newer = _int(body, "max_completion_tokens", low=1)
        max_tokens = newer if newer is not None else max_tokens
    overrides = {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", low=0, high=2),
        "top_p": _number(body, "top_p", low=0, high=1, low_open=True),
        "seed": _int(body, "seed", low=-(2**63), high=2**63 - 1),
        "stop": _stop(body),
    }
    n = _int(body, "n", low=1, high=128) or 1
    logprobs = _logprobs(body, endpoint)
    schema = _response_format(body) if endpoint == CHAT else None
    key = (model, n, logprobs, json.dumps(schema, sort_keys=True) if schema is not None else None)
    return _Request(custom_id, model, text, overrides, key, schema)


def _schema(endpoint: str) -> pa.Schema:
    text = (
        pa.field("messages", MESSAGES_TYPE) if endpoint == CHAT else pa.field("prompt", pa.string())
    )
    return pa.schema(
        [pa.field("custom_id", pa.string()), text, pa.field("sampling", OVERRIDES_TYPE)]
    )


def _flush(group: Group, schema: pa.Schema) -> None:
    if not group._rows:
        return
    if group._writer is None:
        group._writer = pq.ParquetWriter(group.path, schema, compression="zstd")
    group._writer.write_table(pa.Table.from_pylist(group._rows, schema=schema))
    group._rows.clear()


def convert_input(
    source: Path,
    *,
    endpoint: str,
    catalog: ModelCatalog,
    folder: Path,
    max_requests: int,
) -> Conversion:
    """Validate the JSONL file ``source`` and, when every line is valid, write one Parquet
    input per group of requests into ``folder``. With errors, no Parquet file is left and
    ``Conversion.errors`` lists them (line-numbered, at most ``_MAX_ERRORS``)."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = _schema(endpoint)
    column = INPUT_COLUMNS[endpoint]
    seen: dict[str, int] = {}
    groups: dict[tuple[Any, ...], Group] = {}
    errors: list[LineError] = []
    total = 0

    def refuse(error: LineError) -> bool:
        errors.append(error)
        return len(errors) >= _MAX_ERRORS

    try:
        with open(source, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                total += 1
                if total > max_requests:
                    refuse(
                        LineError(
                            "too_many_tasks",
                            f"a batch holds at most {max_requests} requests",
                            number,
                        )
                    )
                    break
                try:
                    value = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    if refuse(
                        LineError(
                            "invalid_json_line", "This line is not parseable as valid JSON.", number
                        )
                    ):
                        break
                    continue
                try:
                    request = _request(value, endpoint, catalog)
                except _Refused as e:
                    if refuse(LineError(e.code, e.message, number, e.param)):
                        break
                    continue
                first = seen.setdefault(request.custom_id, number)
                if first != number:
                    message = f"custom_id {request.custom_id!r} is already used on line {first}"
                    if refuse(LineError("duplicate_custom_id", message, number, "custom_id")):
                        break
                    continue
                group = groups.get(request.key)
                if group is None:
                    if len(groups) >= MAX_GROUPS:
                        message = (
                            f"the batch's requests need more than {MAX_GROUPS} jobs: each distinct "
                            "(model, n, logprobs/top_logprobs, response_format) runs as its own job"
                        )
                        if refuse(LineError("too_many_groups", message, number, "body")):
                            break
                        continue
                    model, n, logprobs, _ = request.key
                    group = Group(
                        index=len(groups),
                        model=model,
                        n=n,
                        logprobs=logprobs,
                        json_schema=request.json_schema,
                        path=folder / f"input-{len(groups)}.parquet",
                    )
                    groups[request.key] = group
                group.requests += 1
                if errors:
                    continue  # nothing is written once a line has failed
                group._rows.append(
                    {
                        "custom_id": request.custom_id,
                        column: request.text,
                        "sampling": request.overrides,
                    }
                )
                if len(group._rows) >= _FLUSH_ROWS:
                    _flush(group, schema)
    except BaseException:
        for group in groups.values():
            if group._writer is not None:
                group._writer.close()
            group.path.unlink(missing_ok=True)
        raise
    if total == 0 and not errors:
        errors.append(LineError("empty_file", "The batch input file is empty."))
    for group in groups.values():
        if not errors:
            _flush(group, schema)
        if group._writer is not None:
            group._writer.close()
        if errors:
            group.path.unlink(missing_ok=True)
    return Conversion(total, [] if errors else list(groups.values()), errors)


def job_body(
    group: Group,
    *,
    batch_id: str,
    endpoint: str,
    catalog: ModelCatalog,
    groups: int,
    output_path: Path,
) -> dict[str, Any]:
    """The job (as ``POST /v1/jobs`` takes it) that runs one group of a batch's requests.

    Sampling defaults are OpenAI's (temperature 1, top_p 1; max_tokens 16 for
    completions, up to the context length for chat); each request's own values
    come from its ``sampling`` overrides.
    """
    block = catalog.block(group.model, field="body.model")
    max_model_len = (block.get("engine") or {}).get("max_model_len")
    if endpoint == CHAT:
        # vLLM stops a generation at the context length, which is what OpenAI does
        # when max_tokens is not given; the job's default must stay below it.
        max_tokens = max_model_len - 1 if max_model_len else _CHAT_MAX_TOKENS
        prompt: dict[str, Any] = {"messages_column": "messages"}
    else:
        max_tokens = _COMPLETIONS_MAX_TOKENS
        if max_model_len:
            max_tokens = min(max_tokens, max_model_len - 1)
        prompt = {"template": "{{ prompt }}"}
    sampling: dict[str, Any] = {
        "max_tokens": max(1, max_tokens),
        "temperature": 1.0,
        "top_p": 1.0,
        "n": group.n,
        "overrides_column": "sampling",
    }
    if group.logprobs is not None:
        sampling["logprobs"] = group.logprobs
    if group.json_schema is not None:
        sampling["structured"] = {"json_schema": group.json_schema}
    name = f"{batch_id} ({group.model})" + (f" #{group.index + 1}" if groups > 1 else "")
    return {
        "name": name,
        "input": {"path": str(group.path), "format": "parquet"},
        "prompt": prompt,
        "model": group.model,
        "sampling": sampling,
        "carryover": ["custom_id"],
        "output": {"path": str(output_path), "rows_per_file": _ROWS_PER_FILE},
    }
