"""The workload generator: prompt lengths in the model's tokens, carried columns, formats."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from llm_batch.bench.workload import (
    EMBEDDING_COLUMN,
    ID_COLUMN,
    PROMPT_COLUMN,
    Workload,
    WorkloadSpec,
    build_table,
    generate_workload,
    make_prompts,
    write_input,
)


@pytest.fixture(scope="module")
def tokenizer():
    from llm_batch.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize("tokens", [8, 64, 200])
def test_prompts_have_about_the_asked_token_count(tokenizer, tokens):
    prompts, lengths = make_prompts(tokenizer, 200, tokens, seed=1)
    assert lengths == [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert all(abs(n - tokens) <= 2 for n in lengths), (min(lengths), max(lengths))
    assert sum(lengths) / len(lengths) == pytest.approx(tokens, abs=0.5)


def test_prompts_are_distinct_and_seeded(tokenizer):
    a, _ = make_prompts(tokenizer, 100, 32, seed=0)
    assert len(set(a)) == 100
    assert make_prompts(tokenizer, 100, 32, seed=0)[0] == a
    assert make_prompts(tokenizer, 100, 32, seed=1)[0] != a


def test_table_columns_sizes_and_types():
    spec = WorkloadSpec(rows=50, carry_strings=3, carry_string_bytes=100, embedding_dim=16)
    table = build_table(spec, [f"p{i}" for i in range(50)])
    assert table.column_names == [
        ID_COLUMN,
        PROMPT_COLUMN,
        "carry_00",
        "carry_01",
        "carry_02",
        EMBEDDING_COLUMN,
    ]
    assert spec.carryover == [ID_COLUMN, "carry_00", "carry_01", "carry_02", EMBEDDING_COLUMN]
    assert table.column(ID_COLUMN).to_pylist() == list(range(50))
    values = table.column("carry_01").to_pylist()
    assert all(len(v.encode()) == 100 for v in values)
    assert len(set(values)) == 50
    assert table.column("carry_00").to_pylist() != values
    assert table.schema.field(EMBEDDING_COLUMN).type == pa.list_(pa.float32(), 16)
    assert build_table(spec, [f"p{i}" for i in range(50)]).equals(table)  # seeded


def test_no_carried_columns_but_the_id():
    spec = WorkloadSpec(rows=3, carry_strings=0)
    assert spec.carryover == [ID_COLUMN]
    assert build_table(spec, ["a", "b", "c"]).column_names == [ID_COLUMN, PROMPT_COLUMN]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_formats_round_trip_in_parts(tmp_path, fmt):
    spec = WorkloadSpec(
        rows=25, carry_strings=2, carry_string_bytes=10, embedding_dim=0 if fmt == "csv" else 4
    )
    table = build_table(spec, [f'prompt {i}, with "quotes"\nand lines' for i in range(25)])
    files = write_input(table, tmp_path, fmt, rows_per_file=10)
    assert [f.rsplit("/", 1)[1] for f in files] == [f"part-0000{i}.{fmt}" for i in range(3)]
    reader = {"parquet": pq.read_table, "jsonl": pajson.read_json, "csv": pacsv.read_csv}[fmt]
    back = pa.concat_tables(reader(f) for f in files)
    assert back.column_names == table.column_names
    for name in (ID_COLUMN, PROMPT_COLUMN, "carry_01"):
        assert back.column(name).to_pylist() == table.column(name).to_pylist()
    if spec.embedding_dim:
        emb = back.column(EMBEDDING_COLUMN).combine_chunks().cast(pa.list_(pa.float32(), 4))
        assert emb.equals(table.column(EMBEDDING_COLUMN).combine_chunks())
    if fmt == "jsonl":
        first = Path(files[0]).read_text(encoding="utf-8").splitlines()[0]
        assert json.loads(first)[ID_COLUMN] == 0  # one object per line


def test_csv_cannot_hold_an_embedding():
    with pytest.raises(ValidationError, match="embedding_dim=8 needs a nested column"):
        WorkloadSpec(format="csv", embedding_dim=8)


def test_embed_cannot_carry_an_embedding_and_needs_no_room_to_generate(tmp_path):
    with pytest.raises(ValidationError, match="task embed writes its own 'embedding' column"):
        WorkloadSpec(task="embed", embedding_dim=8)
    with pytest.raises(ValidationError):
        WorkloadSpec(task="classify")
    measured = {"input_path": "", "files": [], "input_bytes": 0, "prompt_tokens_mean": 40.0}
    lengths = {"prompt_tokens_min": 38, "prompt_tokens_max": 47}
    embed = Workload(spec=WorkloadSpec(task="embed", output_tokens=64), **measured, **lengths)
    generate = Workload(spec=WorkloadSpec(output_tokens=64), **measured, **lengths)
    assert embed.max_model_len() == 48  # 47 + 1
    assert generate.max_model_len() == 112  # 47 + 64 + 1, rounded up to 16
    assert embed.summary()["task"] == "embed"


def test_generate_measures_with_the_models_tokenizer(tmp_path, tokenizer):
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)  # the tokenizer is all the generator reads
    spec = WorkloadSpec(rows=40, prompt_tokens=24, output_tokens=8, rows_per_file=15)
    w = generate_workload(spec, model, tmp_path / "input")
    assert len(w.files) == 3
    assert w.input_bytes > 0
    assert abs(w.prompt_tokens_mean - 24) <= 0.5
    assert w.prompt_tokens_min <= 24 <= w.prompt_tokens_max
    assert w.max_model_len() % 16 == 0
    assert w.max_model_len() > w.prompt_tokens_max + spec.output_tokens
    assert w.summary()["prompt_tokens_measured"]["max"] == w.prompt_tokens_max
