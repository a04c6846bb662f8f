"""``llm-batch bench --cache``: work avoided, whole commands against whole commands.

A labeling workload as they come: every prompt opens with the same 12-example few-shot
prefix, and half the rows repeat an earlier row (greedy sampling, so a repeat's output is
fixed). Three whole commands, each timed from outside (interpreter start, imports, Ray and
engine start included), one after another on the same machine:

1. raw vLLM: ``LLM.generate`` over every prompt, as a user writes it by hand;
2. ``llm-batch run`` into a new folder, with an empty response cache: duplicates are
   generated once (``rows_deduplicated``), the rest stored in the cache;
3. the same ``llm-batch run`` into another new folder: served from the cache.

Both engines have vLLM's prefix caching on (its default). The texts of 2 must equal raw
vLLM's row for row, and 3's must equal 2's.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

__all__ = ["render", "run_cache_bench"]

logger = logging.getLogger(__name__)

EXAMPLES = 12
EXAMPLE_TOKENS = 20


def workload(
    tokenizer: Any, rows: int, question_tokens: int, seed: int, *, groups: int = 1
) -> pa.Table:
    """``rows`` prompts: a few-shot prefix (one of ``groups``, at random) and a question;
    half the rows repeat an earlier row (the first row is new)."""
    from llm_batch.bench.workload import make_prompts

    rng = random.Random(seed)
    unique = rows - rows // 2
    prefixes = []
    for g in range(groups):
        examples, _ = make_prompts(tokenizer, EXAMPLES, EXAMPLE_TOKENS, seed=seed + 1 + g)
        prefixes.append(
            (f"Task {g}. " if groups > 1 else "")
            + "Label each text.\n"
            + "".join(f"Text: {text}\nLabel: {rng.choice(['yes', 'no'])}\n" for text in examples)
        )
    questions, _ = make_prompts(tokenizer, unique, question_tokens, seed=seed)
    new = [
        f"{prefixes[0] if groups == 1 else rng.choice(prefixes)}Text: {q}\nLabel:"
        for q in questions
    ]
    kinds = ["new"] * (unique - 1) + ["repeat"] * (rows - unique)
    rng.shuffle(kinds)
    seen = [new[0]]
    prompts = [new[0]]
    fresh = iter(new[1:])
    for kind in kinds:
        prompt = rng.choice(seen) if kind == "repeat" else next(fresh)
        if kind == "new":
            seen.append(prompt)
        prompts.append(prompt)
    return pa.table({"id": list(range(rows)), "prompt": prompts})


def _timed(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> float:
    """Wall seconds of one whole command; raises with its log's tail when it fails."""
    started = time.monotonic()
    with log.open("wb") as f:
        proc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False
        )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed (exit {proc.returncode}):\n{tail}")
    return wall


def _texts(folder: Path) -> dict[int, str]:
    table = pads.dataset(str(folder), format="parquet").to_table(columns=["id", "generated_text"])
    return dict(
        zip(table.column("id").to_pylist(), table.column("generated_text").to_pylist(), strict=True)
    )


def run_cache_bench(config: Any, *, prefix_groups: int = 1) -> dict[str, Any]:
    """Run the three commands; the report (also ``<out>/report.json``). With several prefix
    groups, also ``llm-batch run --no-cache`` with rows grouped by prefix and without."""
    from transformers import AutoTokenizer

    from llm_batch.bench.harness import _sampling, tiny_model_dir
    from llm_batch.job.spec import JobSpec
    from llm_batch.pipeline.engine_args import build_engine_args

    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(config.model).resolve()) if config.model else str(tiny_model_dir())
    spec = config.workload
    tokenizer = AutoTokenizer.from_pretrained(model)
    table = workload(tokenizer, spec.rows, spec.prompt_tokens, spec.seed, groups=prefix_groups)
    source = out / "input.parquet"
    pq.write_table(table, source)
    prompt_tokens = [
        len(ids) for ids in tokenizer(table.column("prompt").to_pylist()[:200])["input_ids"]
    ]
    engine: dict[str, Any] = {
        "max_model_len": max(prompt_tokens) * 2 + spec.output_tokens,
        "dtype": "bfloat16",
        "enforce_eager": config.enforce_eager,
        **config.engine_args,
    }
    if config.kv_cache_gb is not None:
        engine["kv_cache_space_gb"] = config.kv_cache_gb
    if config.max_num_seqs is not None:
        engine["max_num_seqs"] = config.max_num_seqs
    job: dict[str, Any] = {
        "name": "bench-cache",
        "input": {"path": str(source)},
        "prompt": {"template": "{{ prompt }}"},
        "model": {"path": model, "engine": engine, "replicas": config.replicas},
        "sampling": _sampling(spec),
        "carryover": ["id"],
    }
    if config.batch_size is not None:
        job["model"]["batch_size"] = config.batch_size
    job_file = out / "job.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    ungrouped = {**job, "prompt": {**job["prompt"], "group_by_prefix": False}}
    (out / "job-ungrouped.yaml").write_text(yaml.safe_dump(ungrouped, sort_keys=False))
    model_spec = JobSpec.model_validate({**job, "output": {"path": str(out)}}).model
    assert model_spec is not None

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        {
            "RAY_TMPDIR": tempfile.mkdtemp(prefix="llmb-", dir="/tmp"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "LLM_BATCH_CACHE_DIR": str(out / "cache"),
            "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "WARNING"),
        }
    )
    for stale in ("cache", "raw", "first", "again", "grouped", "ungrouped"):
        shutil.rmtree(out / stale, ignore_errors=True)

    raw_cfg = {
        "task": "generate",
        "model": model,
        "engine_args": build_engine_args(model_spec.model_dump(), on_cpu=True),
        "sampling": _sampling(spec),
        "input": {"files": [str(source)], "format": "parquet"},
        "prompt_column": "prompt",
        "carryover": ["id"],
        "output": str(out / "raw"),
        "result": str(out / "raw-result.json"),
    }
    (out / "raw.json").write_text(json.dumps(raw_cfg, indent=1))
    report: dict[str, Any] = {
        "model": model,
        "rows": spec.rows,
        "repeated_rows": spec.rows // 2,
        "prefix_examples": EXAMPLES,
        "prefix_groups": prefix_groups,
        "replicas": config.replicas,
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens),
        "output_tokens": spec.output_tokens,
        "commands": {},
    }
    cli = [sys.executable, "-m", "llm_batch.cli", "run", str(job_file)]
    commands = {
        "raw": [sys.executable, "-m", "llm_batch.bench.systems", "raw", str(out / "raw.json")],
        "first": [*cli, "--output", str(out / "first")],
        "again": [*cli, "--output", str(out / "again")],
    }
    if prefix_groups > 1:
        commands["grouped"] = [*cli, "--no-cache", "--output", str(out / "grouped")]
        commands["ungrouped"] = [
            *cli[:-1],
            str(out / "job-ungrouped.yaml"),
            "--no-cache",
            "--output",
            str(out / "ungrouped"),
        ]
    for name, cmd in commands.items():
        logger.info("running %s: %s", name, " ".join(cmd[2:]))
        wall = _timed(cmd, env, out / f"{name}.log", config.timeout)
        report["commands"][name] = {
            "command": " ".join(["python", *cmd[1:]]),
            "seconds": round(wall, 2),
            "rows_per_s": round(spec.rows / wall, 1),
        }
        logger.info("%s: %.1f s", name, wall)
    for name in [n for n in commands if n != "raw"]:
        metrics = json.loads((out / name / "_metrics.json").read_text())
        report["commands"][name].update(
            rows_deduplicated=metrics.get("rows_deduplicated"),
            rows_cached=metrics.get("rows_cached"),
            engine_starts=metrics.get("engine_starts"),
        )
    raw, first, again = _texts(out / "raw"), _texts(out / "first"), _texts(out / "again")
    report["checks"] = {
        "first_equals_raw": first == raw,
        "rows_differing_from_raw": sum(1 for k, v in raw.items() if first.get(k) != v),
        "again_equals_first": again == first,
    }
    c = report["commands"]
    report["ratios"] = {
        "first_speedup_over_raw": round(c["raw"]["seconds"] / c["first"]["seconds"], 3),
        "again_time_over_first": round(c["again"]["seconds"] / c["first"]["seconds"], 3),
    }
    if "grouped" in c:
        report["ratios"]["grouped_speedup_over_ungrouped"] = round(
            c["ungrouped"]["seconds"] / c["grouped"]["seconds"], 3
        )
        report["checks"]["grouped_equals_raw"] = _texts(out / "grouped") == raw
        report["checks"]["ungrouped_equals_raw"] = _texts(out / "ungrouped") == raw
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def render(report: dict[str, Any]) -> str:
    c, r, checks = report["commands"], report["ratios"], report["checks"]
    lines = [
        f"{report['rows']:,} rows ({report['repeated_rows']:,} repeating an earlier row), a "
        f"{report['prefix_examples']}-example shared prefix, {report['output_tokens']} greedy "
        "tokens each",
        "| command | seconds | rows/s | deduplicated | from the cache | engines started |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("raw", "raw vLLM `LLM.generate`"),
        ("first", "`llm-batch run`"),
        ("again", "`llm-batch run`, again into a new folder"),
        ("grouped", "`llm-batch run --no-cache`, rows grouped by prefix"),
        ("ungrouped", "`llm-batch run --no-cache`, `prompt.group_by_prefix: false`"),
    ):
        if name not in c:
            continue
        x = c[name]
        lines.append(
            f"| {label} | {x['seconds']:.1f} | {x['rows_per_s']:,.1f} | "
            f"{x.get('rows_deduplicated', '-')} | {x.get('rows_cached', '-')} | "
            f"{x.get('engine_starts', '-')} |"
        )
    lines.append(
        f"llm-batch ÷ raw: {r['first_speedup_over_raw']:.2f}× faster (target ≥ 1.5); "
        f"again ÷ first: {r['again_time_over_first']:.2f} of the time (target ≤ 0.25)"
    )
    if "grouped_speedup_over_ungrouped" in r:
        lines.append(
            f"{report['prefix_groups']} prefix groups, {report['replicas']} replica(s): grouped "
            f"÷ ungrouped {r['grouped_speedup_over_ungrouped']:.2f}× faster; texts equal raw "
            f"vLLM's: {checks['grouped_equals_raw']}, {checks['ungrouped_equals_raw']}"
        )
    lines.append(
        f"texts equal raw vLLM's: {checks['first_equals_raw']} "
        f"({checks['rows_differing_from_raw']} rows differ); "
        f"again equal first: {checks['again_equals_first']}"
    )
    return "\n".join(lines)
