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

``/v1/embeddings`` requests go to a catalog model whose task is ``embed``. Each
element of a request's ``input`` is one row; the carryover columns tell finalizing
which line a row belongs to and how to write it::

    custom_id        string   the request's
    prompt           string   the element's text
    input_index      int32    its index in the request's ``input``
    input_count      int32    how many elements the request has
    encoding_format  string   ``float`` or ``base64``

``dimensions`` sets the job's ``model.pooling.dimensions``, an engine setting:
requests are grouped by (model, dimensions). The pipeline takes text, not token
ids: an ``input`` of token ids is decoded with the model's tokenizer, and refused
unless the text encodes back to exactly those ids (what the engine then sees).
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
    "EMBEDDINGS",
    "EMBEDDING_CARRYOVER",
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
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)

MAX_GROUPS = 8  # jobs one batch may become (each starts its own engines)
_MAX_ERRORS = 100  # errors reported before validation stops reading
_FLUSH_ROWS = 1024
_ROWS_PER_FILE = 512  # output rows per Parquet file: a cancelled batch keeps what was written
_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_CHAT_MAX_TOKENS = 4096  # when the model block does not say its max_model_len
_MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the elements of one request's input
_ENCODING_FORMATS = ("float", "base64")

OVERRIDES_TYPE = pa.struct(
    [
        ("max_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),
        ("stop", pa.list_(pa.string())),
        ("presence_penalty", pa.float64()),
        ("frequency_penalty", pa.float64()),
        ("logit_bias", pa.map_(pa.int64(), pa.float64())),
        # vLLM's extra fields, as its OpenAI server takes them.
        ("top_k", pa.int64()),
        ("min_p", pa.float64()),
        ("repetition_penalty", pa.float64()),
        ("min_tokens", pa.int64()),
    ]
)
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
INPUT_COLUMNS = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "prompt"}
# What an embeddings job carries from its input to its output rows (see the docstring).
EMBEDDING_CARRYOVER = ("custom_id", "input_index", "input_count", "encoding_format")
# The task a catalog model must have to serve each endpoint.
_TASKS = {CHAT: "generate", COMPLETIONS: "generate", EMBEDDINGS: "embed"}

# Body fields accepted and ignored when they have these values (they change nothing here).
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "stream": (False, None),
    "stream_options": (None,),
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
    """Requests that run as one job: same model, n, logprobs and response format
    (embeddings: same model and dimensions)."""

    index: int
    model: str
    n: int
    logprobs: int | None
    json_schema: dict[str, Any] | None
    path: Path
    dimensions: int | None = None
    requests: int = 0
    rows: int = 0  # input rows: one per request, or per element of an embeddings input
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


def _logit_bias(body: dict[str, Any]) -> list[tuple[int, float]] | None:
    """OpenAI's ``logit_bias``: token ids (as strings) to a bias from -100 to 100."""
    value = body.get("logit_bias")
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise _Refused("invalid_value", "logit_bias must be an object", "body.logit_bias")
    out = []
    for key, bias in value.items():
        token = str(key)
        if not token.isdigit() or not _is_number(bias) or not -100 <= bias <= 100:
            raise _Refused(
                "invalid_value",
                f"logit_bias maps token ids to numbers from -100 to 100, got {key!r}: {bias!r}",
                f"body.logit_bias.{key}",
            )
        out.append((int(token), float(bias)))
    return out


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


# Per-request sampling fields beyond OpenAI's basics: its penalties and logit_bias, and the
# extra fields vLLM's own OpenAI server takes.
_SAMPLING_EXTRA = {
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
}
_KNOWN = {
    CHAT: {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "seed", "stop", "n", "logprobs", "top_logprobs", "response_format", *_SAMPLING_EXTRA,
    },
    COMPLETIONS: {
        "model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
        "logprobs", *_SAMPLING_EXTRA,
    },
    EMBEDDINGS: {"model", "input", "encoding_format", "dimensions"},
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


class _Tokenizers:
    """The catalog models' tokenizers, each loaded on the first token-id input for it.

    The pipeline takes text: token ids become the text they decode to, kept only when
    that text encodes back to the very same ids with the settings the engine uses for a
    text prompt (its special tokens added), so that the engine embeds what was sent.
    """

    def __init__(self, catalog: ModelCatalog):
        self.catalog = catalog
        self._loaded: dict[str, Any] = {}  # model -> tokenizer, or why it cannot load

    def _get(self, model: str, param: str) -> Any:
        if model not in self._loaded:
            block = self.catalog.block(model, field="body.model")
            extra = (block.get("engine") or {}).get("extra_args") or {}
            source = str(extra.get("tokenizer") or block.get("path", ""))
            try:
                from transformers import AutoTokenizer

                # Never a download: the model is the operator's, already where it runs.
                self._loaded[model] = AutoTokenizer.from_pretrained(source, local_files_only=True)
            except Exception as e:  # noqa: BLE001 - any failure means: no token ids here
                self._loaded[model] = f"{type(e).__name__}: {str(e)[:200]}"
        tokenizer = self._loaded[model]
        if isinstance(tokenizer, str):
            raise _Refused(
                "unsupported_value",
                f"token ids are not supported for model {model!r}: its tokenizer cannot be "
                f"loaded here ({tokenizer}); send the text instead",
                param,
            )
        return tokenizer

    def text(self, model: str, ids: list[int], param: str) -> str:
        tokenizer = self._get(model, param)
        size = len(tokenizer)
        outside = next((t for t in ids if t >= size), None)
        if outside is not None:
            raise _Refused(
                "invalid_value",
                f"token id {outside} is outside the vocabulary of model {model!r} ({size} tokens)",
                param,
            )
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if tokenizer(text, add_special_tokens=True)["input_ids"] != ids:
            raise _Refused(
                "unsupported_value",
                "token ids are not supported unless they decode to a text that the model's "
                "tokenizer encodes back to the same ids (with its special tokens); these do "
                "not: send the text instead",
                param,
            )
        return str(text)


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) for t in value)


def _embedding_inputs(body: dict[str, Any], model: str, tokenizers: _Tokenizers) -> list[str]:
    """The texts of an embeddings request's ``input``: a string, a list of strings, a list
    of token ids or a list of such lists."""
    value = body.get("input")
    param = "body.input"
    if value is None:
        raise _Refused("missing_required_parameter", "body.input is required", param)
    shape = (
        "input must be a string, a list of strings, a list of token ids or a list of "
        "lists of token ids"
    )
    if isinstance(value, str):
        items: list[Any] = [value]
        params = [param]
    elif isinstance(value, list) and value:
        if len(value) > _MAX_EMBEDDING_INPUTS:
            raise _Refused(
                "invalid_value",
                f"input holds at most {_MAX_EMBEDDING_INPUTS} elements, got {len(value)}",
                param,
            )
        if all(_is_int(t) for t in value):
            items, params = [value], [param]
        else:
            items, params = value, [f"{param}[{i}]" for i in range(len(value))]
            kind = type(value[0])
            other = next((i for i, v in enumerate(value) if type(v) is not kind), None)
            if other is not None:
                raise _Refused("invalid_value", shape + " (not mixed)", params[other])
    else:
        raise _Refused("invalid_value", shape + " (not empty)", param)
    texts = []
    for item, where in zip(items, params, strict=True):
        if isinstance(item, str):
            if not item:
                raise _Refused("invalid_value", "an input string must not be empty", where)
            texts.append(item)
        elif _token_ids(item):
            if any(t < 0 for t in item):
                raise _Refused("invalid_value", "token ids must not be negative", where)
            texts.append(tokenizers.text(model, item, where))
        else:
            raise _Refused("invalid_value", shape + " (not mixed, not empty)", where)
    return texts


def _encoding_format(body: dict[str, Any]) -> str:
    value = body.get("encoding_format")
    if value is None:
        return "float"
    if value not in _ENCODING_FORMATS:
        raise _Refused(
            "invalid_value",
            f"encoding_format must be float or base64, got {value!r}",
            "body.encoding_format",
        )
    return str(value)


@dataclasses.dataclass(frozen=True)
class _Request:
    custom_id: str
    model: str
    rows: list[dict[str, Any]]  # what the request writes to its group's Parquet input
    key: tuple[Any, ...]  # its group: (model, n, logprobs, schema as JSON) or (model, dimensions)
    n: int = 1
    logprobs: int | None = None
    json_schema: dict[str, Any] | None = None
    dimensions: int | None = None


def _request(value: Any, endpoint: str, catalog: ModelCatalog, tokenizers: _Tokenizers) -> _Request:
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
    block = catalog.block(model, field="body.model")
    task = block.get("task") or "generate"
    if task != _TASKS[endpoint]:
        what = "not an embedding model" if endpoint == EMBEDDINGS else "not a text generation model"
        raise _Refused(
            "unsupported_value",
            f"model {model!r} is {what} (its task is {task}); {endpoint} needs a model "
            f"whose task is {_TASKS[endpoint]}",
            "body.model",
        )
    _check_fields(body, endpoint)
    if endpoint == EMBEDDINGS:
        texts = _embedding_inputs(body, model, tokenizers)
        encoding = _encoding_format(body)
        dimensions = _int(body, "dimensions", low=1)
        if dimensions == (block.get("pooling") or {}).get("dimensions"):
            dimensions = None  # the model's own setting: the same job
        rows = [
            {
                "custom_id": custom_id,
                "prompt": text,
                "input_index": i,
                "input_count": len(texts),
                "encoding_format": encoding,
            }
            for i, text in enumerate(texts)
        ]
        return _Request(custom_id, model, rows, (model, dimensions), dimensions=dimensions)
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
        "presence_penalty": _number(body, "presence_penalty", low=-2, high=2),
        "frequency_penalty": _number(body, "frequency_penalty", low=-2, high=2),
        "logit_bias": _logit_bias(body),
        "top_k": _int(body, "top_k", low=-1),
        "min_p": _number(body, "min_p", low=0, high=1),
        "repetition_penalty": _number(
            body, "repetition_penalty", low=0, high=math.inf, low_open=True
        ),
        "min_tokens": _int(body, "min_tokens", low=0),
    }
    n = _int(body, "n", low=1, high=128) or 1
    logprobs = _logprobs(body, endpoint)
    schema = _response_format(body) if endpoint == CHAT else None
    key = (model, n, logprobs, json.dumps(schema, sort_keys=True) if schema is not None else None)
    row = {"custom_id": custom_id, INPUT_COLUMNS[endpoint]: text, "sampling": overrides}
    return _Request(custom_id, model, [row], key, n=n, logprobs=logprobs, json_schema=schema)


def _schema(endpoint: str) -> pa.Schema:
    if endpoint == EMBEDDINGS:
        return pa.schema(
            [
                pa.field("custom_id", pa.string()),
                pa.field("prompt", pa.string()),
                pa.field("input_index", pa.int32()),
                pa.field("input_count", pa.int32()),
                pa.field("encoding_format", pa.string()),
            ]
        )
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
    ``Conversion.errors`` lists them (line-numbered, at most ``_MAX_ERRORS``).
    ``max_requests`` bounds the lines, and for ``/v1/embeddings`` also the inputs
    of all the lines together (OpenAI's limits)."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = _schema(endpoint)
    tokenizers = _Tokenizers(catalog)
    seen: dict[str, int] = {}
    groups: dict[tuple[Any, ...], Group] = {}
    errors: list[LineError] = []
    total = inputs = 0

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
                    request = _request(value, endpoint, catalog, tokenizers)
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
                inputs += len(request.rows)
                if endpoint == EMBEDDINGS and inputs > max_requests:
                    message = (
                        f"a {EMBEDDINGS} batch holds at most {max_requests} inputs, "
                        "counting every element of every request's input"
                    )
                    refuse(LineError("too_many_tasks", message, number, "body.input"))
                    break
                group = groups.get(request.key)
                if group is None:
                    if len(groups) >= MAX_GROUPS:
                        what = (
                            "(model, dimensions)"
                            if endpoint == EMBEDDINGS
                            else "(model, n, logprobs/top_logprobs, response_format)"
                        )
                        message = (
                            f"the batch's requests need more than {MAX_GROUPS} jobs: each "
                            f"distinct {what} runs as its own job"
                        )
                        if refuse(LineError("too_many_groups", message, number, "body")):
                            break
                        continue
                    group = Group(
                        index=len(groups),
                        model=request.model,
                        n=request.n,
                        logprobs=request.logprobs,
                        json_schema=request.json_schema,
                        dimensions=request.dimensions,
                        path=folder / f"input-{len(groups)}.parquet",
                    )
                    groups[request.key] = group
                group.requests += 1
                group.rows += len(request.rows)
                if errors:
                    continue  # nothing is written once a line has failed
                group._rows.extend(request.rows)
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

    An embeddings group names its catalog model, or, with ``dimensions``, is that
    model's block with ``pooling.dimensions`` set (another engine: vLLM applies it
    per request, but the pools key engines by their pooling options).
    """
    block = catalog.block(group.model, field="body.model")
    name = f"{batch_id} ({group.model})" + (f" #{group.index + 1}" if groups > 1 else "")
    output = {"path": str(output_path), "rows_per_file": _ROWS_PER_FILE}
    if endpoint == EMBEDDINGS:
        model: Any = group.model
        if group.dimensions is not None:
            pooling = {**(block.get("pooling") or {}), "dimensions": group.dimensions}
            model = {**block, "pooling": pooling}
        return {
            "name": name,
            "input": {"path": str(group.path), "format": "parquet"},
            "prompt": {"template": "{{ prompt }}"},
            "model": model,
            "carryover": list(EMBEDDING_CARRYOVER),
            "output": output,
        }
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
    return {
        "name": name,
        "input": {"path": str(group.path), "format": "parquet"},
        "prompt": prompt,
        "model": group.model,
        "sampling": sampling,
        "carryover": ["custom_id"],
        "output": output,
    }
