"""Train the small sentiment classifier ``models/reviews-classifier`` on synthetic reviews.

The classify-task counterpart of ``models/reviews-tiny``: a
``LlamaForSequenceClassification`` whose ``id2label`` is
:data:`llm_batch.models.reviews.LABELS` (positive, negative, neutral), for jobs
with ``model.task: classify`` (``prompts/reviews-classify.yaml``). Plain PyTorch +
transformers on the CPU, seeded and deterministic; the committed model is::

    python tools/train_classifier.py --out models/reviews-classifier --vllm

(``--vllm`` also measures the held-out accuracy through vLLM's CPU engine; leave it
out to skip the engine start.)

Same data as ``tools/train_demo_model.py`` (whose helpers it reuses), with the same
defaults: training reviews from :func:`llm_batch.models.reviews.make_reviews` with
``--seed`` 0 (12,000), the held-out split of ``--heldout-seed`` 1 (200 reviews, every
text also in training dropped), which is the bundled ``prompts/examples/reviews.jsonl``:
the script checks that it is and never rewrites it. The same tokenizer (trained on
the same corpus) and the same model shape (4 layers, hidden 128, head_dim 64 as vLLM's
CPU attention requires), optimiser and schedule.

What the classifier sees is :data:`~llm_batch.models.reviews.CLASSIFY_PROMPT`
rendered, ``"Review: {text}\\nSentiment:"``, tokenized on its own as the engine does
(no BOS, no EOS). It is pooled the way vLLM pools a Llama sequence classifier: the
hidden state of the prompt's LAST token goes through the ``score`` head (no bias),
then softmax. Batches are right-padded with ``<pad>``, which is the config's
``pad_token_id``, so Hugging Face's own ``LlamaForSequenceClassification`` (the last
non-pad token) pools the same token; the held-out accuracy is checked with it on the
saved bf16 weights, and with ``--vllm`` through ``vllm.LLM(runner="pooling").classify``.

The loss is cross-entropy on the classes plus, weighted ``--text-weight`` (0.2), a
language-model loss on the whole prompt, its logits the hidden states times the input
embeddings (no extra weights: the saved checkpoint holds only the Llama body and the
``score`` head). It is the demo generator's auxiliary loss, which there made the
model learn the words and clauses far faster; here it was kept, not ablated (the
defaults give 0.96 held-out accuracy, through vLLM as through transformers).

Determinism: data, tokenizer, initialisation and batch order are seeded and
``torch.use_deterministic_algorithms(True)`` is on; with the same ``--threads``
(default 2) on the same machine and library versions the saved weights are bitwise
identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

# tools/ is this script's directory, hence on sys.path when it runs as a script.
from train_demo_model import DEFAULT_EXAMPLES, _normal, heldout_rows

from llm_batch.models.reviews import LABELS, classify_prompt, make_reviews
from llm_batch.models.tiny import build_tokenizer

__all__ = ["evaluate_vllm", "main", "train"]

DEFAULT_OUT = "models/reviews-classifier"


def _encode(tokenizer, rows: list[dict[str, Any]]) -> list[tuple[list[int], int]]:  # noqa: ANN001
    """(prompt token ids, class index) per row; the prompt tokenized as the engine does."""
    prompts = tokenizer([classify_prompt(r["text"]) for r in rows])["input_ids"]
    return [(ids, LABELS.index(r["label"])) for ids, r in zip(prompts, rows, strict=True)]


def _pad(chunk: list[tuple[list[int], int]], pad_id: int):  # noqa: ANN202
    """Right-padded (input_ids, attention_mask, last-token position, class)."""
    import torch

    width = max(len(ids) for ids, _ in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, (ids, _) in enumerate(chunk):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
    last = torch.tensor([len(ids) - 1 for ids, _ in chunk])
    cls = torch.tensor([c for _, c in chunk])
    return input_ids, attention, last, cls


def _forever(examples, batch_size: int, generator, pad_id: int):  # noqa: ANN001, ANN202
    """Shuffled batches, epoch after epoch (the last short batch of an epoch dropped)."""
    import torch

    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield _pad([examples[i] for i in order[start : start + batch_size]], pad_id)


def _evaluate(model, tokenizer, rows, batch_size: int = 128) -> float:  # noqa: ANN001
    """Accuracy of Hugging Face's own forward (it pools the last non-pad token)."""
    import torch

    ok = 0
    model.eval()
    examples = _encode(tokenizer, rows)
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            input_ids, attention, _, cls = _pad(
                examples[start : start + batch_size], tokenizer.pad_token_id
            )
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            ok += int((logits.float().argmax(-1) == cls).sum())
    return ok / len(rows)


def _check_examples(held: list[dict[str, Any]], directory: str) -> Path | None:
    """The bundled held-out file, checked to be this split (same ids, texts and labels)."""
    if not directory:
        return None
    path = Path(directory) / "reviews.jsonl"
    with open(path, encoding="utf-8") as f:
        bundled = [json.loads(line) for line in f if line.strip()]
    mine = [(r["id"], r["text"], r["label"]) for r in held]
    theirs = [(r["id"], r["text"], r["label"]) for r in bundled]
    if mine != theirs:
        raise RuntimeError(f"{path} is not the held-out split of these seeds and sizes")
    return path


def _labels_of(model_dir: str | Path) -> list[str]:
    """The class names of a saved classifier, in the order of its ``id2label``."""
    id2label = json.loads((Path(model_dir) / "config.json").read_text())["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]


def evaluate_vllm(model_dir: str | Path, examples: str | Path) -> dict[str, Any]:
    """Held-out accuracy through vLLM's CPU engine: ``LLM(runner="pooling").classify``.

    Starts an engine (spawned processes: call it under ``if __name__ == "__main__"``).
    """
    from vllm import LLM

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with open(examples, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    t0 = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        runner="pooling",
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=512,
        # The CPU engine's default gpu_memory_utilization (0.92 of NUMA node 0) fails
        # on a shared machine; an explicit KV-cache size skips that check.
        kv_cache_memory_bytes=1 << 30,
        seed=0,
    )
    start_seconds = time.perf_counter() - t0
    try:
        labels = _labels_of(model_dir)
        outputs = llm.classify([classify_prompt(r["text"]) for r in rows], use_tqdm=False)
        ok = 0
        sums = []
        for row, out in zip(rows, outputs, strict=True):
            probs = out.outputs.probs
            sums.append(sum(probs))
            ok += labels[max(range(len(probs)), key=probs.__getitem__)] == row["label"]
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {
        "vllm_heldout_accuracy": ok / len(rows),
        "vllm_rows": len(rows),
        "vllm_probs_sum_range": [min(sums), max(sums)],
        "vllm_engine_start_seconds": round(start_seconds, 1),
    }


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForSequenceClassification

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    train_rows = make_reviews(args.train_size, seed=args.seed)
    held = heldout_rows(
        args.heldout_size, args.heldout_seed, {_normal(r["text"]) for r in train_rows}
    )
    examples_file = _check_examples(held, args.examples)

    # The demo generator's tokenizer corpus (prompts with answers, the bare label
    # words), so that both demo models tokenize a review the same way.
    corpus = [classify_prompt(r["text"]) + " " + r["label"] for r in train_rows]
    corpus += [" ".join(LABELS)] * 200 + list(LABELS) * 200
    tokenizer = build_tokenizer(args.vocab_size, corpus)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.kv_heads,
        head_dim=64,
        max_position_embeddings=args.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    config.num_labels = len(LABELS)
    # Its body is built from the config's dtype (bfloat16, the saved dtype), unlike
    # LlamaForCausalLM's: train in float32.
    model = LlamaForSequenceClassification(config).float()
    model.train()
    examples = _encode(tokenizer, train_rows)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(args.seed)
    batches = _forever(examples, args.batch_size, generator, tokenizer.pad_token_id)
    embed = model.model.embed_tokens
    t_train = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        input_ids, attention, last, cls = next(batches)
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        # vLLM's LAST pooling: the prompt's last token, then the score head.
        logits = model.score(hidden[torch.arange(len(last)), last])
        cls_loss = F.cross_entropy(logits, cls)
        loss = cls_loss
        if args.text_weight > 0:
            lm_logits = hidden[:, :-1] @ embed.weight.T
            targets = input_ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
            text_loss = F.cross_entropy(
                lm_logits.reshape(-1, lm_logits.size(-1)), targets.reshape(-1)
            )
            loss = loss + args.text_weight * text_loss
        if step % args.log_every == 0 or step == args.steps - 1:
            acc = float((logits.argmax(-1) == cls).float().mean())
            print(
                f"step {step:4d}  loss {cls_loss.item():.4f}  batch acc {acc:.2f}  "
                f"lr {lr_at(step):.2e}  {time.perf_counter() - t_train:6.1f}s",
                flush=True,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    train_seconds = time.perf_counter() - t_train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.bfloat16()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    saved = LlamaForSequenceClassification.from_pretrained(out, dtype=torch.bfloat16)
    weights = (out / "model.safetensors").read_bytes()
    report: dict[str, Any] = {
        "out": str(out),
        "labels": _labels_of(out),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_rows": len(train_rows),
        "heldout_rows": len(held),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "heldout_accuracy_hf": _evaluate(saved, tokenizer, held),
        "train_accuracy_hf_first_1000": _evaluate(saved, tokenizer, train_rows[:1000]),
        "model_bytes": len(weights),
        "model_sha256": hashlib.sha256(weights).hexdigest(),
    }
    if args.vllm:
        if examples_file is None:
            raise SystemExit("--vllm measures on the bundled examples: --examples must be set")
        report.update(evaluate_vllm(out, examples_file))
    print(json.dumps(report, indent=2))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python tools/train_classifier.py", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="model directory (default %(default)s)")
    p.add_argument(
        "--examples",
        default=DEFAULT_EXAMPLES,
        help="directory of the bundled held-out reviews.jsonl, checked to be this split "
        "('' to skip; default %(default)s)",
    )
    p.add_argument(
        "--vllm",
        action="store_true",
        help="also measure the held-out accuracy through vLLM's CPU engine (starts one)",
    )
    p.add_argument("--seed", type=int, default=0, help="training data and weights seed")
    p.add_argument("--heldout-seed", type=int, default=1, help="held-out data seed")
    p.add_argument("--train-size", type=int, default=12000)
    p.add_argument("--heldout-size", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--text-weight",
        type=float,
        default=0.2,
        help="weight of an auxiliary language-model loss on the prompt (0: classes only)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed for determinism)")
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
