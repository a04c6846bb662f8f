"""``write_tiny_model``: the generate/embed causal LM and the classify model's config
(no engine: the configs and weights as written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_batch.models.tiny import check_labels, write_tiny_model

LABELS = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(
        tmp_path_factory.mktemp("models") / "cls", seed=3, task="classify", labels=LABELS
    )


def test_classify_writes_a_sequence_classifier_over_the_labels(classifier: Path) -> None:
    from transformers import AutoConfig

    raw = json.loads((classifier / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForSequenceClassification"]
    assert raw["id2label"] == {"0": "positive", "1": "negative", "2": "neutral"}
    assert raw["label2id"] == {"positive": 0, "negative": 1, "neutral": 2}
    assert raw["pad_token_id"] is not None
    assert raw["head_dim"] == 64  # what vLLM's CPU attention accepts
    config = AutoConfig.from_pretrained(classifier)
    assert config.num_labels == 3
    assert [config.id2label[i] for i in range(3)] == LABELS
    assert (classifier / "tokenizer.json").exists()


def test_classify_weights_have_a_score_head_of_one_row_per_label(classifier: Path) -> None:
    from safetensors import safe_open

    with safe_open(classifier / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        score = f.get_tensor("score.weight")
    assert "lm_head.weight" not in names
    assert tuple(score.shape) == (3, 128)
    assert str(score.dtype) == "torch.bfloat16"


def test_classify_model_runs_in_transformers_and_pools_the_last_token(classifier: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(classifier)
    model = LlamaForSequenceClassification.from_pretrained(classifier).eval()
    alone = tokenizer(["Review: fine\nSentiment:"], return_tensors="pt")
    padded = tokenizer(
        ["Review: fine\nSentiment:", "Review: a much longer review than that\nSentiment:"],
        padding=True,
        return_tensors="pt",
    )
    assert tokenizer.padding_side == "right"
    with torch.no_grad():
        a = model(**alone).logits[0]
        b = model(**padded).logits[0]
    assert a.shape == (3,)
    # Right padding with pad_token_id: the same (last real) token is pooled.
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


def test_same_seed_same_weights_and_generate_is_a_causal_lm(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a", seed=1, task="classify", labels=["x", "y"])
    b = write_tiny_model(tmp_path / "b", seed=1, task="classify", labels=["x", "y"])
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    gen = write_tiny_model(tmp_path / "g", seed=1)
    emb = write_tiny_model(tmp_path / "e", seed=1, task="embed")
    assert json.loads((gen / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # embed is the same causal LM: vLLM converts it (runner="pooling", convert="embed").
    assert (gen / "model.safetensors").read_bytes() == (emb / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        (None, "needs labels"),
        ([], "at least 2 labels, got 0"),
        (["only"], "at least 2 labels, got 1"),
        (["a", "b", "a"], "distinct: 'a' repeated"),
        (["a", ""], "non-empty strings"),
        (["a", "  "], "non-empty strings"),
        ("ab", "a list of at least 2"),
    ],
)
def test_classify_refuses_bad_labels(tmp_path: Path, labels, needle: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=needle):
        write_tiny_model(tmp_path / "m", task="classify", labels=labels)
    assert not (tmp_path / "m").exists()  # refused before anything is written


def test_labels_only_with_classify_and_tasks_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only for task classify, not 'generate'"):
        write_tiny_model(tmp_path / "m", labels=["a", "b"])
    with pytest.raises(ValueError, match="only for task classify, not 'embed'"):
        write_tiny_model(tmp_path / "m", task="embed", labels=["a", "b"])
    with pytest.raises(ValueError, match="task must be one of generate, embed, classify"):
        write_tiny_model(tmp_path / "m", task="score")
    assert not (tmp_path / "m").exists()


def test_check_labels_returns_them_in_order() -> None:
    assert check_labels(("b", "a")) == ["b", "a"]


def test_a_thinking_model_opens_a_think_block_unless_told_not_to(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(write_tiny_model(tmp_path / "think", thinking=True))
    ends = [tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
    assert ends == [512, 513] and len(tok) == 514  # two tokens after the trained vocabulary
    chat = [{"role": "user", "content": "hi"}]
    opened = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert opened.endswith("<|assistant|>\n<think>\n")
    closed = tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert closed.endswith("<think>\n\n</think>\n\n")
    # Text tokens, not special ones: decoded output keeps them for a reasoning parser.
    assert tok.decode([ends[1]], skip_special_tokens=True) == "</think>"
