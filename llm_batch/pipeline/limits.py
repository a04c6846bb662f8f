"""What can be known of a model's limits before its engine starts, checked at validation.

For a local model folder: ``engine.max_model_len`` against the context the model's
own ``config.json`` allows (vLLM refuses it at engine start, tens of seconds later,
in a message buried in worker tracebacks); a ``sampling.max_tokens`` that leaves no
room for any prompt; and, for ``structured.choice``, a ``max_tokens`` too small to
hold the longest choice in the model's own tokens (every row would be cut). A model
named by hub id is not read here: its engine checks it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from llm_batch.errors import JobSpecError
from llm_batch.job.spec import ModelSpec, SamplingSpec

__all__ = ["check_model_limits", "choice_tokens", "context_limit"]

# The config.json keys vLLM reads a model's context length from (the smallest wins).
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


def _local_folder(path: str) -> str | None:
    folder = os.path.expanduser(path.removeprefix("file://"))
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def context_limit(path: str) -> tuple[int, str] | None:
    """(tokens, key) of the context a local model's config.json allows; None when it
    cannot be known here (a hub id, no such key, or a rope scaling vLLM applies)."""
    folder = _local_folder(path)
    if folder is None:
        return None
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    if config.get("rope_scaling"):
        return None  # vLLM stretches the context by the scaling: its own check decides
    found = [(int(config[k]), k) for k in _CONTEXT_KEYS if isinstance(config.get(k), int)]
    return min(found) if found else None


@functools.lru_cache(maxsize=16)
def _tokenizer(folder: str) -> Any:
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(tokenizer_json)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def choice_tokens(path: str, choices: list[str]) -> dict[str, int] | None:
    """How many of the model's tokens each choice takes (its plain encoding, no special
    tokens); None for a model not in a local folder."""
    folder = _local_folder(path)
    if folder is None:
        return None
    tokenizer = _tokenizer(folder)
    out = {}
    for choice in choices:
        encoded = tokenizer.encode(choice, add_special_tokens=False)
        out[choice] = len(getattr(encoded, "ids", encoded))
    return out


def check_model_limits(field: str, model: ModelSpec, sampling: SamplingSpec) -> None:
    """Refuse what the engine would refuse (or cut on every row); raises ``JobSpecError``
    naming the field and the numbers."""
    limit = context_limit(model.path)
    mml = model.engine.max_model_len
    if limit is not None and mml is not None and mml > limit[0]:
        raise JobSpecError(
            f"{field}.engine.max_model_len: {mml} is more than the model allows: "
            f"{limit[0]} tokens ({limit[1]} in {model.path}/config.json)"
        )
    if model.pools:
        return  # nothing generated: sampling does not apply
    context = mml or (limit[0] if limit else None)
    if context is not None and sampling.max_tokens >= context:
        raise JobSpecError(
            f"sampling.max_tokens: {sampling.max_tokens} leaves no room for a prompt in the "
            f"{context}-token context of {field} (max_model_len); lower it"
        )
    structured = sampling.structured
    if structured is not None and structured.choice:
        lengths = choice_tokens(model.path, structured.choice)
        if lengths:
            longest = max(lengths, key=lambda c: lengths[c])
            if lengths[longest] > sampling.max_tokens:
                raise JobSpecError(
                    f"sampling.max_tokens: {sampling.max_tokens} cannot hold the choice "
                    f"{longest!r}, which takes {lengths[longest]} tokens of {field}; set "
                    f"max_tokens to at least {lengths[longest]}"
                )
