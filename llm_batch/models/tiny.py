"""A tiny deterministic Llama-architecture model, built offline.

For tests, demos and benchmarks on machines without a model hub: a byte-level
BPE tokenizer trained on a few sentences (vocabulary 512) with a chat
template, and a 2-layer Llama with random, seeded weights. It loads in vLLM's
CPU engine in seconds; greedy decoding on it is deterministic, so outputs can
be compared row by row with ``vllm.LLM.generate``. The shapes follow what the
CPU attention kernels accept (head_dim 64).

Tasks (``write_tiny_model(.., task=...)``, the job's ``model.task``):

* ``generate`` and ``embed``: the same ``LlamaForCausalLM``. vLLM serves the
  embed task from it with ``runner="pooling", convert="embed"`` (last-token
  pooling, normalised: ``hidden_size`` floats per prompt).
* ``classify``: a ``LlamaForSequenceClassification`` with a seeded random
  ``score`` head, one output per label (``id2label`` / ``label2id`` in the
  config, in the order given). vLLM recognises the architecture with
  ``runner="pooling"`` alone and pools the last token, then softmax.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "TASKS",
    "THINKING_CHAT_TEMPLATE",
    "THINK_TOKENS",
    "build_tokenizer",
    "check_labels",
    "write_tiny_adapter",
    "write_tiny_model",
]

# What a tiny model can be written for (a job's ``model.task`` also has ``score``,
# which vLLM serves from a classify model).
TASKS = ("generate", "embed", "classify")

# A plain, readable chat format; the generation prompt ends with the assistant tag.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A reasoning model's format (``write_tiny_model(thinking=True)``), as Qwen3's: the
# assistant turn opens a think block, or, with ``enable_thinking: false``, an empty one.
THINKING_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
THINK_TOKENS = ("<think>", "</think>")

_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Review: the battery lasts all day and the screen is bright. Sentiment: positive",
    "Review: it broke after two days and support never answered. Sentiment: negative",
    "Review: it does what it says, nothing more. Sentiment: neutral",
    "Write a short story about a robot who learns to paint.",
    "Question: what is the capital of France? Answer: Paris.",
    "Batch inference turns accelerator hours into tokens.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 { } [ ] : , \" ' - _ / ( ) ? ! .",
    "system user assistant label json name price city date yes no",
]


def build_tokenizer(  # noqa: ANN201
    vocab_size: int = 512, corpus: list[str] | None = None, *, thinking: bool = False
):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with bos/eos/pad/unk and a chat template;
    ``thinking``: with ``<think>`` and ``</think>`` tokens (text, not special: they stay in
    the decoded output, for a reasoning parser) and the thinking chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL + ["<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    if thinking:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
        fast.chat_template = THINKING_CHAT_TEMPLATE
    return fast


def check_labels(labels: Sequence[str] | None) -> list[str]:
    """The class names of a classify model: at least two, distinct, non-empty.

    Raises ``ValueError`` naming what is wrong.
    """
    if labels is None or isinstance(labels, str):
        raise ValueError("a classify model needs labels: a list of at least 2 class names")
    names = list(labels)
    if len(names) < 2:
        raise ValueError(f"a classify model needs at least 2 labels, got {len(names)}")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"labels must be non-empty strings, got {name!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"labels must be distinct: {', '.join(map(repr, dupes))} repeated")
    return names


def write_tiny_model(
    directory: str | Path,
    *,
    seed: int = 0,
    task: str = "generate",
    labels: Sequence[str] | None = None,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    max_position_embeddings: int = 2048,
    thinking: bool = False,
) -> Path:
    """Write the tokenizer and a seeded random Llama to ``directory``; returns it.

    ``task``: ``generate`` (default) or ``embed``, a ``LlamaForCausalLM``; ``classify``,
    a ``LlamaForSequenceClassification`` over ``labels`` (required then, at least two,
    distinct; ``id2label`` keeps their order). ``labels`` with another task is an error.
    ``thinking``: a reasoning model's tokenizer and chat template (``build_tokenizer``).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "classify":
        names = check_labels(labels)
    elif labels is not None:
        raise ValueError(f"labels are only for task classify, not {task!r}")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = build_tokenizer(thinking=thinking)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Also what HF's sequence classification pools by: the last non-pad token.
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model: Any
    if task == "classify":
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
        config.num_labels = len(names)
        model = LlamaForSequenceClassification(config).bfloat16()
    else:
        model = LlamaForCausalLM(config).bfloat16()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_tiny_adapter(
    model: str | Path, directory: str | Path, *, rank: int = 8, seed: int = 1, scale: float = 1.0
) -> Path:
    """Write a LoRA adapter of a tiny model (``write_tiny_model``) to ``directory``, as PEFT
    writes one (no ``peft`` needed): seeded random ``lora_A`` and ``lora_B`` of rank ``rank``
    on every layer's ``q_proj`` and ``v_proj``, so that its outputs differ from the base's
    and from another seed's. Returns the folder."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model) / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["head_dim"]
    outputs = {
        "q_proj": config["num_attention_heads"] * heads,
        "v_proj": config["num_key_value_heads"] * heads,
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * scale
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    adapter = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(outputs),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    return out_dir
