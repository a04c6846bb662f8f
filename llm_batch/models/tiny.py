"""A tiny deterministic Llama-architecture model, built offline.

For tests, demos and benchmarks on machines without a model hub: a byte-level
BPE tokenizer trained on a few sentences (vocabulary 512) with a chat
template, and a 2-layer Llama with random, seeded weights. It loads in vLLM's
CPU engine in seconds; greedy decoding on it is deterministic, so outputs can
be compared row by row with ``vllm.LLM.generate``. The shapes follow what the
CPU attention kernels accept (head_dim 64).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "build_tokenizer", "write_tiny_model"]

# A plain, readable chat format; the generation prompt ends with the assistant tag.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

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


def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):  # noqa: ANN201
    """A byte-level BPE ``PreTrainedTokenizerFast`` with bos/eos/pad/unk and a chat template."""
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
    return fast


def write_tiny_model(
    directory: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write the tokenizer and a seeded random Llama to ``directory``; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
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
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).bfloat16()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
