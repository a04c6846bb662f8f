"""The response cache's own logic (``pipeline/cache.py``), without an engine: which rows have
a key, what the key depends on, entries stored and found again across workers and runs,
and what ``cache info`` and ``cache clear`` see and delete."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from llm_batch.pipeline import cache
from llm_batch.pipeline.cache import CacheConfig, ResponseCache
from llm_batch.pipeline.generation import BatchInputs, RowResult

GREEDY = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": None, "n": 1}


def inputs(prompts: list[str], overrides: list | None = None) -> BatchInputs:
    n = len(prompts)
    return BatchInputs(
        prompts=list(prompts),
        messages=[None] * n,
        render_errors=[None] * n,
        samples=[0] * n,
        overrides=overrides or [None] * n,
    )


def model_folder(tmp_path: Path, name: str = "m", header: bytes = b'{"w":[1]}') -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"vocab": 1}')
    (folder / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 64
    )
    return folder


def model(path: Path, **engine: object) -> dict:
    return {
        "path": str(path),
        "task": "generate",
        "engine": {"dtype": "auto", "max_model_len": 512, "extra_args": {}, **engine},
    }


def result(text: str, **kw: object) -> RowResult:
    fields: dict = {"input_tokens": 3, "output_tokens": 2, "finish_reason": "length"}
    return RowResult(text=text, latency=0.5, **{**fields, **kw})


def test_only_deterministic_rows_have_a_key():
    batch = inputs(
        ["a", "a", "b", "a", "a"],
        [
            None,
            None,
            None,
            json.dumps({"temperature": 0.8}),  # random: no key
            json.dumps({"temperature": 0.8, "seed": 3}),  # seeded: a key of its own
        ],
    )
    keys = cache.row_keys("ns", batch, GREEDY)
    assert keys[0] == keys[1] and keys[0] is not None
    assert keys[2] not in (None, keys[0])
    assert keys[3] is None
    assert keys[4] not in (None, keys[0])
    # n samples of a prompt are meant to differ: none has a key.
    assert cache.row_keys("ns", batch, {**GREEDY, "n": 2}) == [None] * 5
    # Another namespace, other keys; a row that failed to render has none.
    assert cache.row_keys("other", batch, GREEDY)[0] != keys[0]
    failed = BatchInputs(["a"], [None], ["template error"], [0], [None])
    assert cache.row_keys("ns", failed, GREEDY) == [None]


def test_chat_messages_are_keyed_by_their_content():
    chat = BatchInputs(
        prompts=[None, None, None],
        messages=[
            [{"role": "user", "content": "hi"}],
            [{"role": "user", "content": "hi"}],
            [{"role": "user", "content": "ho"}],
        ],
        render_errors=[None] * 3,
        samples=[0] * 3,
        overrides=[None] * 3,
    )
    keys = cache.row_keys("ns", chat, GREEDY)
    assert keys[0] == keys[1] != keys[2]


def ns(model_block: dict, sampling: dict = GREEDY, device: str = "cpu") -> str | None:
    return cache.namespace(model_block, sampling, device=device)


def test_the_namespace_follows_what_changes_outputs(tmp_path):
    folder = model_folder(tmp_path)
    base = ns(model(folder))
    assert base == ns(model(folder))
    # Engine arguments that change outputs, and the sampling block: another namespace.
    assert ns(model(folder, max_model_len=256), GREEDY) != base
    assert ns(model(folder, dtype="float32"), GREEDY) != base
    assert ns(model(folder, extra_args={"quantization": "fp8"}), GREEDY) != base
    assert ns(model(folder), {**GREEDY, "max_tokens": 9}) != base
    # Only speed: the same namespace. The overrides column's name is not the overrides.
    assert ns(model(folder, max_num_seqs=8, enforce_eager=True), GREEDY) == base
    assert ns(model(folder), {**GREEDY, "overrides_column": "o"}) == base
    # Other kernels, other parallelism: another namespace.
    assert ns(model(folder), device="gpu") != base
    assert ns(model(folder, tensor_parallel_size=2), GREEDY) != base
    # A model whose files are not here has no identity, so no cache.
    assert ns(model(tmp_path / "absent"), GREEDY) is None
    assert cache.model_identity("s3://bucket/models/m") is None


def test_the_model_identity_is_its_files_not_its_path(tmp_path):
    a = model_folder(tmp_path, "a")
    b = model_folder(tmp_path, "b")  # a copy elsewhere
    c = model_folder(tmp_path, "c", header=b'{"w":[2]}')  # other weights
    assert cache.model_identity(str(a)) == cache.model_identity(str(b))
    assert cache.model_identity(str(a)) != cache.model_identity(str(c))
    (b / "tokenizer.json").write_text('{"vocab": 2}')  # another tokenizer (or chat template)
    # (seen by the same process: the file's size or time changed, so it is read again)
    assert cache.model_identity(str(a)) != cache.model_identity(str(b))


def config(tmp_path: Path, mode: str = "read_write", run: str = "run1") -> CacheConfig:
    return CacheConfig(root=str(tmp_path / "cache"), namespace="0" * 32, mode=mode, run=run)


def fresh(cfg: CacheConfig) -> ResponseCache:
    """A cache as a new worker sees it (no index kept from another test)."""
    cache._OPEN.pop((cfg.root, cfg.namespace), None)
    return ResponseCache(cfg, GREEDY)


def test_entries_are_found_again_by_another_worker_and_run(tmp_path):
    writer = fresh(config(tmp_path))
    batch = inputs(["a", "b", "c", "a"])
    lookup = writer.lookup(batch)
    assert lookup.hits == {} and lookup.misses == [0, 1, 2, 3]
    generated = [
        result("A", logprobs=[{"token": "A", "logprob": -0.1, "top_logprobs": []}]),
        RowResult.failed("boom"),  # errors are not kept
        result("C", finish_reason="abort"),  # nor aborted requests
        result("A"),
    ]
    writer.store(lookup, lookup.merge(generated))

    reader = fresh(config(tmp_path, run="run2"))
    lookup = reader.lookup(inputs(["c", "a", "b", "a", "d"]))
    assert sorted(lookup.hits) == [1, 3] and lookup.misses == [0, 2, 4]
    hit = lookup.hits[1]
    assert (hit.text, hit.input_tokens, hit.output_tokens, hit.finish_reason) == (
        "A",
        3,
        2,
        "length",
    )
    assert hit.cached and hit.latency == 0.5
    assert hit.logprobs == [{"token": "A", "logprob": -0.1, "top_logprobs": []}]
    merged = lookup.merge([result("c"), result("b"), result("d")])
    assert [r.text for r in merged] == ["c", "A", "b", "A", "d"]


def test_modes_read_and_write_do_only_that(tmp_path):
    only_write = fresh(config(tmp_path, mode="write"))
    lookup = only_write.lookup(inputs(["a"]))
    only_write.store(lookup, [result("A")])
    assert fresh(config(tmp_path, mode="write")).lookup(inputs(["a"])).hits == {}
    only_read = fresh(config(tmp_path, mode="read", run="r"))
    lookup = only_read.lookup(inputs(["a", "b"]))
    assert list(lookup.hits) == [0]
    only_read.store(lookup, lookup.merge([result("B")]))
    assert fresh(config(tmp_path)).lookup(inputs(["b"])).hits == {}


def test_a_runs_batch_files_merge_into_one_and_stay_readable(tmp_path):
    cfg = config(tmp_path)
    writer = fresh(cfg)
    for i in range(3):
        lookup = writer.lookup(inputs([f"p{i}"]))
        writer.store(lookup, [result(f"T{i}")])
    folder = Path(cfg.root) / cfg.namespace
    assert len(list(folder.glob("b-run1-*.parquet"))) == 3
    reader = fresh(config(tmp_path, run="run2"))
    assert len(reader.lookup(inputs(["p0"])).hits) == 1  # indexed before the merge

    cache.merge_run(cfg)
    assert not list(folder.glob("b-*.parquet"))
    assert len(list(folder.glob("r-run1-*.parquet"))) == 1
    # A worker whose index names the merged-away files looks again and finds them.
    reader._store.listed_at = -1e18
    lookup = reader.lookup(inputs(["p0", "p1", "p2"]))
    assert [lookup.hits[i].text for i in range(3)] == ["T0", "T1", "T2"]


def test_info_and_clear_touch_only_the_caches_own_files(tmp_path):
    cfg = config(tmp_path)
    writer = fresh(cfg)
    cache.describe(cfg, {"path": "/models/tiny", "engine": {}}, GREEDY)
    for i in range(2):
        lookup = writer.lookup(inputs([f"p{i}"]))
        writer.store(lookup, [result(f"T{i}")])
    root = Path(cfg.root)
    mine = root / cfg.namespace
    (mine / "notes.txt").write_text("a user's file")  # not the cache's: never deleted
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "data.parquet").write_text("a user's file")

    (space,) = cache.info(cfg.root)
    assert space["namespace"] == cfg.namespace and space["model"] == "/models/tiny"
    assert space["entries"] == 2 and space["files"] == 2 and space["bytes"] > 0

    # --older-than: the entries of an old file go, the new one stays.
    old, new = sorted(mine.glob("b-*.parquet"))
    past = time.time() - 3 * 86400
    os.utime(old, (past, past))
    removed = cache.clear(cfg.root, older_than=86400)
    assert removed["entries"] == 1 and removed["files"] == 1
    assert not old.exists() and new.exists()

    removed = cache.clear(cfg.root)
    assert removed["entries"] == 1 and not new.exists()
    assert (mine / "notes.txt").exists() and (root / "elsewhere" / "data.parquet").exists()
    assert cache.info(cfg.root)[0]["entries"] == 0


def test_the_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_root("out/job") == str(tmp_path / "llm_batch" / "responses")
    assert cache.default_root("s3://bucket/runs/job") == "s3://bucket/runs/.llm-batch-cache"
    monkeypatch.setenv(cache.CACHE_DIR_ENV, "/data/cache")
    assert cache.default_root("s3://bucket/runs/job") == "/data/cache"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800)]
)
def test_ages(text, seconds):
    from llm_batch.cli.run import parse_age

    assert parse_age(text) == seconds


def test_a_bad_age_names_the_option():
    from llm_batch.cli.run import parse_age
    from llm_batch.errors import LLMBatchError

    with pytest.raises(LLMBatchError, match="--older-than 'soon'"):
        parse_age("soon")


def test_a_long_lived_worker_sees_what_earlier_runs_stored(tmp_path):
    """The service's workers serve job after job: a new run looks at the folder afresh."""
    first = fresh(config(tmp_path, run="run1"))
    assert first.lookup(inputs(["a"])).hits == {}  # the folder listed: empty
    lookup = first.lookup(inputs(["a"]))
    first.store(lookup, [result("A")])
    # The next run in the same worker (the same folder index), within the refresh interval.
    second = ResponseCache(config(tmp_path, run="run2"), GREEDY)
    assert second._store is first._store
    assert list(second.lookup(inputs(["a"])).hits) == [0]


def test_an_entry_is_stored_once(tmp_path):
    """A copy of a row (deduplicated in the engine) is not stored again, nor a key the
    cache holds; two batches that both stored a key leave it once after the merge."""
    cfg = config(tmp_path)
    writer = fresh(cfg)
    lookup = writer.lookup(inputs(["a", "b"]))
    writer.store(lookup, [result("A"), result("B", deduplicated=True)])
    for _ in range(2):  # two batches in flight, the same new row in both
        lookup = writer.lookup(inputs(["c"]))
        writer.store(lookup, [result("C")])
    cache.merge_run(cfg)
    (space,) = cache.info(cfg.root)
    assert space["entries"] == 2 and space["files"] == 1  # a and c: b was a copy


def test_a_fine_tuned_checkpoint_is_another_model(tmp_path):
    """The same tensors, shapes and offsets (the same header, the same size), other values:
    a fine-tune of a base model, whose training moves weights all over the file (here one
    value in every 4 KiB past the sampled start). Its identity differs."""
    header = b'{"w":{"dtype":"F32","shape":[1048576],"data_offsets":[0,4194304]}}'
    weights = bytearray(4 << 20)
    base = model_folder(tmp_path, "base", header=header)
    (base / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + weights)
    tuned = model_folder(tmp_path, "tuned", header=header)
    weights[(1 << 20) + 64 :: 4096] = b"\x01" * len(weights[(1 << 20) + 64 :: 4096])
    (tuned / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + weights)
    assert cache.model_identity(str(base)) != cache.model_identity(str(tuned))
