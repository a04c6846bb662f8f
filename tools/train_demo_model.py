"""Train the small sentiment demo model ``models/reviews-tiny`` on synthetic reviews.

Plain PyTorch + transformers on the CPU, seeded and deterministic::

    python tools/train_demo_model.py --out models/reviews-tiny

The defaults produce the committed model and the bundled held-out example
dataset (``--examples prompts/examples``; pass ``--examples ''`` to skip it).
The second committed model, the 2-layer candidate that
``prompts/reviews-sentiment-compare.yaml`` compares with it, is::

    python tools/train_demo_model.py --out models/reviews-tiny-2layer --layers 2 --examples ''

What it does:

1. Generates training reviews (:func:`llm_batch.models.reviews.make_reviews`
   with ``--seed``) and a held-out set (``--heldout-seed``), dropping from the
   held-out set every text that also occurs in training (case-insensitive).
2. Trains a byte-level BPE tokenizer on the training corpus (bos/eos/pad/unk,
   the chat template of :mod:`llm_batch.models.tiny`).
3. Trains a small ``LlamaForCausalLM`` (head_dim 64, as vLLM's CPU attention
   requires) on ``"Review: {text}\\nSentiment:"`` followed by ``" {label}"`` and
   EOS. The main loss is on the target and EOS only; an auxiliary
   language-model loss on the whole sequence, weighted ``--text-weight``
   (0.2), makes the model learn the words and clauses far faster: with the
   label loss alone, 1,500 steps reached only about 0.89-0.94
   held-out accuracy (mixed and contrast reviews lagging), with it 0.99.
4. Also trains the answer vLLM's constrained decoding asks for. With
   ``StructuredOutputsParams(choice=["positive", "negative", "neutral"])`` the
   grammar admits only tokens that spell a prefix of a bare choice ("positive",
   "neg", "n", ...), never the space-prefixed " positive" the model learns to
   write. So at the same position an auxiliary cross-entropy, restricted to
   those tokens, makes the bare label word win among them. The training
   examples themselves stay exactly in the prompt format above.
   ``--gen-every N`` also trains the one-sentence generation task of
   :func:`~llm_batch.models.reviews.make_generation_examples` on every Nth
   step. It is off by default: in this step budget it cost label accuracy
   (0.91 with N=5) and the reviews it wrote ignored the product.
5. Saves the model in bfloat16 (``save_pretrained``) with the tokenizer, checks
   the held-out accuracy of the saved bf16 weights in both modes, and writes
   the held-out rows to ``reviews.jsonl`` and ``reviews.parquet``.

Determinism: data, tokenizer, initialisation and batch order are all seeded,
and ``torch.use_deterministic_algorithms(True)`` is on; with the same thread
count (``--threads``, default 2) on the same machine and library versions the
saved weights are bitwise identical. CPU matmul kernels may sum in a different
order with another thread count or CPU, which changes the last bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from llm_batch.models.reviews import (
    LABELS,
    classify_prompt,
    make_generation_examples,
    make_reviews,
)
from llm_batch.models.tiny import build_tokenizer

__all__ = ["heldout_rows", "main", "train", "write_examples"]

DEFAULT_OUT = "models/reviews-tiny"
DEFAULT_EXAMPLES = "prompts/examples"


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def heldout_rows(n: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    """The first ``n`` reviews of ``make_reviews(.., seed)`` whose text is new, ids 0..n-1.

    A text is new when its normalised form (lower case, single spaces) is
    neither in ``exclude`` (the training texts) nor earlier in the held-out set.
    """
    rows: list[dict[str, Any]] = []
    seen = set(exclude)
    for row in make_reviews(4 * n, seed=seed):
        key = _normal(row["text"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
        if len(rows) == n:
            return [{"id": i, **r} for i, r in enumerate(rows)]
    raise RuntimeError(f"only {len(rows)} held-out reviews are not in the training set")


def write_examples(
    rows: list[dict[str, Any]], directory: str | Path, name: str = "reviews"
) -> None:
    """Writes ``rows`` to ``<directory>/<name>.jsonl`` and ``<name>.parquet``.

    Columns: id int64, text, label, product (string), tags list<string>,
    meta struct<source: string, rating: int32>, created_at timestamp[ms].
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("text", pa.string()),
            ("label", pa.string()),
            ("product", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("meta", pa.struct([("source", pa.string()), ("rating", pa.int32())])),
            ("created_at", pa.timestamp("ms")),
        ]
    )
    table = pa.Table.from_pylist([{f.name: r[f.name] for f in schema} for r in rows], schema=schema)
    pq.write_table(table, out / f"{name}.parquet", compression="zstd")
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            record = {f.name: r[f.name] for f in schema}
            record["created_at"] = r["created_at"].strftime("%Y-%m-%dT%H:%M:%S")
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _choice_tokens(tokenizer, choices: tuple[str, ...]) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """Token ids a ``choice`` grammar admits first, and the whole-word id of each choice."""
    special = set(tokenizer.all_special_ids)
    allowed = []
    for tid in range(len(tokenizer)):
        if tid in special:
            continue
        piece = tokenizer.decode([tid])
        if piece and any(c.startswith(piece) for c in choices):
            allowed.append(tid)
    words = []
    for c in choices:
        ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"label {c!r} is not one token: {ids}")
        words.append(ids[0])
    return allowed, words


def _encode(tokenizer, rows: list[dict[str, Any]], label_ids: dict[str, int]):  # noqa: ANN001, ANN202
    """(input_ids, first target position, label index) per row.

    The prompt is tokenized on its own, as the engine does, then the target
    " {label}" (one token) and EOS are appended.
    """
    out = []
    prompts = tokenizer([classify_prompt(r["text"]) for r in rows])["input_ids"]
    for ids, r in zip(prompts, rows, strict=True):
        out.append(
            (
                ids + [label_ids[r["label"]], tokenizer.eos_token_id],
                len(ids),
                LABELS.index(r["label"]),
            )
        )
    return out


def _encode_generation(tokenizer, rows: list[dict[str, Any]]):  # noqa: ANN001, ANN202
    """(input_ids, first target position, -1) per generation example: prompt, review, EOS."""
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    targets = tokenizer([r["target"] for r in rows], add_special_tokens=False)["input_ids"]
    return [
        (ids + target + [tokenizer.eos_token_id], len(ids), -1)
        for ids, target in zip(prompts, targets, strict=True)
    ]


def _forever(examples, batch_size: int, generator, pad_id: int):  # noqa: ANN001, ANN202
    """Epoch after epoch of :func:`_batches`."""
    while True:
        yield from _batches(examples, batch_size, generator, pad_id)


def _batches(examples, batch_size: int, generator, pad_id: int):  # noqa: ANN001, ANN202
    """Shuffled, right-padded batches: (input_ids, attention_mask, target position, class)."""
    import torch

    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, _, _) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
        pos = torch.tensor([p for _, p, _ in chunk])
        cls = torch.tensor([c for _, _, c in chunk])
        yield input_ids, attention, pos, cls


def _evaluate(model, tokenizer, rows, label_ids, allowed, words, batch_size: int = 128):  # noqa: ANN001, ANN202
    """Held-out accuracy of greedy free text (label token then EOS) and of the choice mode."""
    import torch

    spaced = [label_ids[label] for label in LABELS]
    free_ok = choice_ok = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            examples = _encode(tokenizer, chunk, label_ids)
            width = max(len(ids) for ids, _, _ in examples)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (ids, _, _) in enumerate(examples):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention[i, : len(ids)] = 1
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
            for i, (_, p, c) in enumerate(examples):
                first = logits[i, p - 1]
                then = logits[i, p]  # after the (teacher-forced) correct label
                if (
                    int(first.argmax()) == spaced[c]
                    and int(then.argmax()) == tokenizer.eos_token_id
                ):
                    free_ok += 1
                if allowed[int(first[allowed].argmax())] == words[c]:
                    choice_ok += 1
    return free_ok / len(rows), choice_ok / len(rows)


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    train_rows = make_reviews(args.train_size, seed=args.seed)
    held = heldout_rows(
        args.heldout_size, args.heldout_seed, {_normal(r["text"]) for r in train_rows}
    )

    # The second task, one-sentence reviews from (product, sentiment); none of
    # its reviews is a held-out text, which would leak that row's label.
    held_texts = {_normal(r["text"]) for r in held}
    gen_rows = [
        g
        for g in make_generation_examples(args.gen_size if args.gen_every else 0, seed=args.seed)
        if _normal(g["target"]) not in held_texts
    ]

    # Tokenizer: the training prompts with their answers, plus the bare label
    # words (the constrained-decoding answers) so that each is one token.
    corpus = [classify_prompt(r["text"]) + " " + r["label"] for r in train_rows]
    corpus += [g["prompt"] + g["target"] for g in gen_rows]
    corpus += [" ".join(LABELS)] * 200 + list(LABELS) * 200
    tokenizer = build_tokenizer(args.vocab_size, corpus)
    label_ids = {}
    for label in LABELS:
        ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"' {label}' is not one token: {ids}")
        label_ids[label] = ids[0]
    allowed, words = _choice_tokens(tokenizer, LABELS)
    allowed_t = torch.tensor(allowed)
    word_index = torch.tensor([allowed.index(w) for w in words])

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
    )
    model = LlamaForCausalLM(config)
    model.train()
    examples = _encode(tokenizer, train_rows, label_ids)
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
    pad = tokenizer.pad_token_id
    classify_batches = _forever(examples, args.batch_size, generator, pad)
    gen_batches = None
    if gen_rows:
        gen_examples = _encode_generation(tokenizer, gen_rows)
        gen_batches = _forever(gen_examples, args.batch_size, generator, pad)
    t_train = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if gen_batches is not None and args.gen_every and step % args.gen_every == 1:
            # Generation: loss on the review and EOS after the prompt.
            input_ids, attention, pos, _ = next(gen_batches)
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
            targets = input_ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
            positions = torch.arange(targets.size(1)).unsqueeze(0)
            targets = targets.masked_fill(positions < (pos - 1).unsqueeze(1), -100)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
            if step % args.log_every == 1:
                print(f"step {step:4d}  generation loss {loss.item():.4f}", flush=True)
        else:
            input_ids, attention, pos, cls = next(classify_batches)
            # The label token (predicted at pos - 1) and EOS (predicted at pos).
            hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            rows = torch.arange(len(pos))
            first = model.lm_head(hidden[rows, pos - 1])
            then = model.lm_head(hidden[rows, pos])
            lm_loss = 0.5 * (
                F.cross_entropy(first, input_ids[rows, pos])
                + F.cross_entropy(then, input_ids[rows, pos + 1])
            )
            choice_loss = F.cross_entropy(first[:, allowed_t], word_index[cls])
            loss = lm_loss + args.choice_weight * choice_loss
            if args.text_weight > 0:
                # A language-model loss on the whole sequence (the review text
                # included) makes the model learn the words and clauses much
                # faster than the label loss alone.
                logits = model.lm_head(hidden[:, :-1])
                targets = input_ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
                text_loss = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
                )
                loss = loss + args.text_weight * text_loss
            if step % args.log_every == 0 or step == args.steps - 1:
                print(
                    f"step {step:4d}  loss {lm_loss.item():.4f}  choice {choice_loss.item():.4f}  "
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
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    saved = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    free_acc, choice_acc = _evaluate(saved, tokenizer, held, label_ids, allowed, words)
    train_acc = _evaluate(saved, tokenizer, train_rows[:1000], label_ids, allowed, words)
    if args.examples:
        write_examples(held, args.examples)
    weights = (out / "model.safetensors").read_bytes()
    report = {
        "out": str(out),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_rows": len(train_rows),
        "heldout_rows": len(held),
        "generation_rows": len(gen_rows),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "heldout_accuracy_free": free_acc,
        "heldout_accuracy_choice": choice_acc,
        "train_accuracy_free_choice_first_1000": train_acc,
        "model_bytes": len(weights),
        "model_sha256": hashlib.sha256(weights).hexdigest(),
    }
    print(json.dumps(report, indent=2))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python tools/train_demo_model.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="model directory (default %(default)s)")
    p.add_argument(
        "--examples",
        default=DEFAULT_EXAMPLES,
        help="directory for the held-out reviews.{jsonl,parquet} ('' to skip; default %(default)s)",
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
    p.add_argument("--choice-weight", type=float, default=0.5)
    p.add_argument(
        "--text-weight",
        type=float,
        default=0.2,
        help="weight of an auxiliary language-model loss on the whole sequence (0: label only)",
    )
    p.add_argument("--gen-size", type=int, default=4000, help="generation-task examples")
    p.add_argument(
        "--gen-every",
        type=int,
        default=0,
        help="every Nth step (N >= 2) trains the generation task (0: never)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed for determinism)")
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
