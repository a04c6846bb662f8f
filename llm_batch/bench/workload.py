"""The benchmark workload: a synthetic prompt dataset written in the format under test.

Every row has an ``id`` (int64, always carried, so outputs can be joined across
systems), a ``prompt`` of about ``prompt_tokens`` tokens as the model's own
tokenizer counts them, ``carry_strings`` string columns of ``carry_string_bytes``
bytes each and, optionally, a float32 ``embedding`` of ``embedding_dim`` values.
Everything is seeded: the same spec gives the same files. ``task`` is what every
system does with the rows: generate ``output_tokens`` tokens from each prompt, or
embed each prompt (one vector per row; ``output_tokens`` is then unused).
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "EMBEDDING_COLUMN",
    "TASKS",
    "ID_COLUMN",
    "PROMPT_COLUMN",
    "Workload",
    "WorkloadSpec",
    "build_table",
    "carry_string_columns",
    "generate_workload",
    "make_prompts",
    "write_input",
]

ID_COLUMN = "id"
PROMPT_COLUMN = "prompt"
EMBEDDING_COLUMN = "embedding"

BenchTask = Literal["generate", "embed"]
TASKS: tuple[BenchTask, ...] = ("generate", "embed")

# Plain words and numbers: a prompt reads like text, and rows rarely share a
# long prefix, so the engine's prefix cache does not flatter any system.
_TEXT = (
    "the quick brown fox jumps over lazy dog battery lasts all day screen is bright "
    "it broke after two days support never answered does what says nothing more "
    "write short story about robot who learns paint question capital france answer "
    "batch inference turns accelerator hours into tokens review sentiment positive "
    "negative neutral system user assistant label json name price city date yes no "
    "river mountain window garden coffee orange silver winter summer number letter "
    "table chair paper music travel market engine signal pattern circle square"
)
_WORDS = _TEXT.split()


class WorkloadSpec(BaseModel):
    """What one benchmark run feeds every system."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: BenchTask = Field(
        default="generate",
        description="generate: output_tokens greedy tokens per row. embed: one embedding "
        "per row, on vLLM's pooling runner (output_tokens unused).",
    )
    rows: int = Field(default=4000, ge=1, description="Input rows (prompts).")
    prompt_tokens: int = Field(
        default=64, ge=1, description="Prompt length in tokens, as the model's tokenizer counts."
    )
    output_tokens: int = Field(default=64, ge=1, description="Tokens generated per row.")
    carry_strings: int = Field(default=0, ge=0, description="String columns carried through.")
    carry_string_bytes: int = Field(
        default=1024, ge=0, description="Bytes of each carried string value."
    )
    embedding_dim: int = Field(
        default=0, ge=0, description="A float32 embedding column of this size (0: none)."
    )
    format: Literal["parquet", "jsonl", "csv"] = Field(
        default="parquet", description="Input file format."
    )
    rows_per_file: int = Field(default=1000, ge=1, description="Rows per input file.")
    seed: int = Field(default=0, description="Seed of the prompts and carried values.")

    @model_validator(mode="after")
    def _columns_fit(self) -> WorkloadSpec:
        if self.format == "csv" and self.embedding_dim:
            raise ValueError(
                f"{self.embedding_dim=} needs a nested column, which CSV cannot hold; "
                "use format parquet or jsonl"
            )
        if self.task == "embed" and self.embedding_dim:
            raise ValueError(
                f"{self.embedding_dim=}: task embed writes its own {EMBEDDING_COLUMN!r} column, "
                "so none can be carried; set embedding_dim to 0"
            )
        return self

    @property
    def carryover(self) -> list[str]:
        """The columns every system copies from input to output, in order."""
        cols = [ID_COLUMN, *carry_string_columns(self.carry_strings)]
        return cols + ([EMBEDDING_COLUMN] if self.embedding_dim else [])


def carry_string_columns(n: int) -> list[str]:
    return [f"carry_{i:02d}" for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Workload:
    """A written workload and what was measured about it."""

    spec: WorkloadSpec
    input_path: str  # a folder of part files
    files: list[str]
    input_bytes: int
    prompt_tokens_mean: float
    prompt_tokens_min: int
    prompt_tokens_max: int

    @property
    def carryover(self) -> list[str]:
        return self.spec.carryover

    def max_model_len(self) -> int:
        """Room for the longest prompt and the generation (none when embedding), rounded up
        to 16 tokens."""
        output = self.spec.output_tokens if self.spec.task == "generate" else 0
        need = self.prompt_tokens_max + output + 1
        return -(-need // 16) * 16

    def summary(self) -> dict[str, Any]:
        return {
            **self.spec.model_dump(),
            "input_path": self.input_path,
            "files": len(self.files),
            "input_bytes": self.input_bytes,
            "carryover": self.carryover,
            "prompt_tokens_measured": {
                "mean": round(self.prompt_tokens_mean, 2),
                "min": self.prompt_tokens_min,
                "max": self.prompt_tokens_max,
            },
        }


def make_prompts(
    tokenizer: Any, rows: int, tokens: int, *, seed: int = 0
) -> tuple[list[str], list[int]]:
    """``rows`` distinct prompts of about ``tokens`` tokens each, and their measured lengths.

    Each prompt is random words cut at a token boundary, so re-encoding it gives
    ``tokens`` tokens, give or take one where a cut word merges differently.
    Lengths count the special tokens the tokenizer adds, as vLLM does.
    """
    special = len(tokenizer("x")["input_ids"]) - len(
        tokenizer("x", add_special_tokens=False)["input_ids"]
    )
    body = max(tokens - special, 1)
    rng = random.Random(seed)
    # One word is at least one token, so `body` words are always long enough.
    drafts = [f"Row {i}: " + " ".join(rng.choice(_WORDS) for _ in range(body)) for i in range(rows)]
    enc = tokenizer(drafts, add_special_tokens=False, return_offsets_mapping=True)
    prompts = [
        text[: offsets[min(body, len(offsets)) - 1][1]]
        for text, offsets in zip(drafts, enc["offset_mapping"], strict=True)
    ]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    return prompts, lengths


def _random_strings(rng: np.random.Generator, rows: int, size: int) -> pa.Array:
    """``rows`` random lowercase ASCII strings of ``size`` bytes, built without Python loops."""
    data = rng.integers(ord("a"), ord("z") + 1, size=rows * size, dtype=np.uint8)
    offsets = np.arange(0, rows * size + 1, size, dtype=np.int64)
    if offsets[-1] < 2**31:
        return pa.StringArray.from_buffers(
            rows, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)
        )
    return pa.LargeStringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(data))


def build_table(spec: WorkloadSpec, prompts: list[str]) -> pa.Table:
    """The input rows: id, prompt, carried strings, embedding."""
    rows = len(prompts)
    rng = np.random.default_rng(spec.seed)
    arrays: dict[str, pa.Array] = {
        ID_COLUMN: pa.array(np.arange(rows, dtype=np.int64)),
        PROMPT_COLUMN: pa.array(prompts, pa.string()),
    }
    for name in carry_string_columns(spec.carry_strings):
        arrays[name] = _random_strings(rng, rows, spec.carry_string_bytes)
    if spec.embedding_dim:
        values = rng.standard_normal(rows * spec.embedding_dim, dtype=np.float32)
        arrays[EMBEDDING_COLUMN] = pa.FixedSizeListArray.from_arrays(
            pa.array(values), spec.embedding_dim
        )
    return pa.table(arrays)


def write_input(table: pa.Table, folder: str | Path, fmt: str, *, rows_per_file: int) -> list[str]:
    """Write ``table`` as ``part-NNNNN.<ext>`` files in ``folder``; returns their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    ext = {"parquet": "parquet", "jsonl": "jsonl", "csv": "csv"}[fmt]
    files = []
    for i, start in enumerate(range(0, table.num_rows, rows_per_file)):
        part = table.slice(start, rows_per_file)
        path = out / f"part-{i:05d}.{ext}"
        if fmt == "parquet":
            pq.write_table(part, path)
        elif fmt == "csv":
            pacsv.write_csv(part, path)
        else:
            # pyarrow has no JSON writer; rows are plain values, so json.dumps is exact.
            with path.open("w", encoding="utf-8") as f:
                for row in part.to_pylist():
                    f.write(json.dumps(row, ensure_ascii=False))
                    f.write("\n")
        files.append(str(path))
    return files


def generate_workload(spec: WorkloadSpec, model: str | Path, folder: str | Path) -> Workload:
    """Make the prompts with ``model``'s tokenizer and write the input files to ``folder``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    prompts, lengths = make_prompts(tokenizer, spec.rows, spec.prompt_tokens, seed=spec.seed)
    table = build_table(spec, prompts)
    files = write_input(table, folder, spec.format, rows_per_file=spec.rows_per_file)
    return Workload(
        spec=spec,
        input_path=str(Path(folder)),
        files=files,
        input_bytes=sum(Path(f).stat().st_size for f in files),
        prompt_tokens_mean=statistics.fmean(lengths),
        prompt_tokens_min=min(lengths),
        prompt_tokens_max=max(lengths),
    )
