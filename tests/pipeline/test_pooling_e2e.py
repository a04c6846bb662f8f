"""Pooling models end to end, on the real vLLM CPU engine: each job's columns against
plain vLLM (``LLM.embed``, ``LLM.classify``, ``LLM.score``) on the same prompts.

Two jobs, each run once for the module (two engines each, one pass over the data):
- a generator and an embedder side by side;
- a classifier (a sequence-classification checkpoint, labels in its config) scored
  against a label column, and a score over pairs (the embedder's cosine);
and a pooling job whose driver is killed mid-run, resumed exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch.job.spec import JobSpec
from tests.pipeline.test_faults import _kill_leftovers, _run_cli
from tests.pipeline.test_labeling import recompute_labels

pytestmark = pytest.mark.e2e

ENGINE = {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True}
LABELS = ["positive", "negative", "neutral"]
EMBED = {"runner": "pooling", "convert": "embed"}
N = 90


def _read(path: Path) -> pa.Table:
    return pads.dataset(str(path), format="parquet").to_table().sort_by("id")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from llm_batch.models.tiny import write_tiny_model

    folder = tmp_path_factory.mktemp("models") / "tiny-classifier"
    return write_tiny_model(folder, seed=3, task="classify", labels=LABELS)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[pa.Table, Path]:
    words = ["great", "awful", "fine", "broken", "lovely", "meh"]
    data = pa.table(
        {
            "id": list(range(N)),
            "text": [f"the {words[i % 6]} thing number {i}" for i in range(N)],
            "doc": [f"a note about {words[(i * 5) % 6]} things" for i in range(N)],
            "label": [LABELS[(i * 7) % 3] if i % 10 else None for i in range(N)],
        }
    )
    path = tmp_path_factory.mktemp("pooling") / "in.parquet"
    pq.write_table(data, path)
    return data, path


@pytest.fixture(scope="module")
def generate_and_embed(table, tiny_model, tmp_path_factory, ray_local) -> pa.Table:
    from llm_batch.pipeline.run import run_job

    _, path = table
    out = tmp_path_factory.mktemp("gen-embed") / "out"
    spec = JobSpec.from_dict(
        {
            "name": "gen-embed",
            "input": {"path": str(path)},
            "prompt": {"template": "{{ text }}"},
            "models": [
                {"name": "gen", "path": str(tiny_model), "engine": ENGINE, "batch_size": 32},
                {
                    "name": "emb",
                    "path": str(tiny_model),
                    "task": "embed",
                    "engine": ENGINE,
                    "batch_size": 32,
                },
            ],
            "sampling": {"max_tokens": 6},
            "carryover": ["id", "text"],
            "output": {"path": str(out)},
        }
    )
    run_job(spec)
    return _read(out)


@pytest.fixture(scope="module")
def classify_and_score(table, tiny_model, classifier, tmp_path_factory, ray_local):
    from llm_batch.pipeline.run import run_job

    _, path = table
    out = tmp_path_factory.mktemp("classify-score") / "out"
    spec = JobSpec.from_dict(
        {
            "name": "classify-score",
            "input": {"path": str(path)},
            "prompt": {"template": "Review: {{ text }}\nSentiment:", "pair_column": "doc"},
            "models": [
                {"name": "clf", "path": str(classifier), "task": "classify", "engine": ENGINE},
                {"name": "sim", "path": str(tiny_model), "task": "score", "engine": ENGINE},
            ],
            "metrics": {"label_column": "label"},
            "carryover": ["id"],
            "output": {"path": str(out)},
        }
    )
    run_job(spec)
    return _read(out), json.loads((out / "_metrics.json").read_text())


def test_embeddings_equal_llm_embed_beside_a_generator(
    generate_and_embed, table, tiny_model, reference, reference_engines
):
    out = generate_and_embed
    data, _ = table
    assert out.column_names == [
        "row_id",
        "id",
        "text",
        "gen__generated_text",
        "gen__num_input_tokens",
        "gen__num_output_tokens",
        "gen__finish_reason",
        "gen__error",
        "emb__embedding",
        "emb__num_input_tokens",
        "emb__error",
    ]
    # Carryover intact, each row once.
    assert out.column("id").to_pylist() == list(range(N))
    assert out.column("text").to_pylist() == data.column("text").to_pylist()
    assert out.column("emb__error").null_count == N
    texts = data.column("text").to_pylist()
    assert out.column("gen__generated_text").to_pylist() == reference(texts, 6)

    embedding = out.column("emb__embedding").combine_chunks()
    assert embedding.type == pa.list_(pa.float32(), 128)
    got = embedding.values.to_numpy().reshape(N, 128)  # one buffer, no list per row
    expected = np.array(
        [o.outputs.embedding for o in reference_engines(tiny_model, **EMBED).embed(texts)],
        np.float32,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)  # normalized, as vLLM does
    lengths = [len(o.prompt_token_ids) for o in reference_engines(tiny_model, **EMBED).embed(texts)]
    assert out.column("emb__num_input_tokens").to_pylist() == lengths


def test_a_classifiers_probs_equal_llm_classify_and_its_metrics_the_file(
    classify_and_score, table, classifier, reference_engines
):
    out, metrics = classify_and_score
    data, _ = table
    prompts = [f"Review: {t}\nSentiment:" for t in data.column("text").to_pylist()]
    expected = [o.outputs.probs for o in reference_engines(classifier).classify(prompts)]
    probs = out.column("clf__probs").to_pylist()
    np.testing.assert_allclose(np.array(probs), np.array(expected), rtol=1e-5, atol=1e-6)
    labels = [LABELS[int(np.argmax(p))] for p in expected]
    assert out.column("clf__label").to_pylist() == labels

    m = metrics["metrics"]["clf"]
    truth = out.column("label").to_pylist()
    recomputed = recompute_labels(truth, labels)
    assert m["labels"]["rows"] == recomputed["rows"] == 81
    assert m["labels"]["accuracy"] == recomputed["accuracy"]
    assert m["labels"]["per_class"] == recomputed["per_class"]
    # The label's probability is the classifier's own, whose cross-entropy the file gives.
    probability = m["labels"]["probability"]
    assert probability["source"] == "the classifier's class probabilities"
    p_true = [p[LABELS.index(t)] for t, p in zip(truth, probs, strict=True) if t is not None]
    nll = float(np.mean(-np.log(np.maximum(p_true, 1e-6))))
    assert probability["rows"] == 81
    assert probability["cross_entropy"] == pytest.approx(nll, abs=1e-5)
    usage = m["token_usage"]
    assert usage["input_tokens"] == sum(out.column("clf__num_input_tokens").to_pylist())
    assert usage["output_tokens"] == 0
    assert "labels" not in metrics["metrics"]["sim"]  # a score predicts no label


def test_scores_equal_llm_score_over_the_pairs(
    classify_and_score, table, tiny_model, reference_engines
):
    out, _ = classify_and_score
    data, _ = table
    prompts = [f"Review: {t}\nSentiment:" for t in data.column("text").to_pylist()]
    docs = data.column("doc").to_pylist()
    scorer = reference_engines(tiny_model, **EMBED)
    expected = [o.outputs.score for o in scorer.score(prompts, docs)]
    assert out.column("sim__score").type == pa.float32()
    np.testing.assert_allclose(out.column("sim__score").to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_pooling_job_resumed_after_its_driver_is_killed_runs_each_row_once(tmp_path, tiny_model):
    rows = 1200
    path = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"id": list(range(rows)), "text": [f"row {i} of {rows}" for i in range(rows)]}),
        path,
        row_group_size=300,
    )
    job = tmp_path / "job.json"
    out = tmp_path / "out"
    job.write_text(
        json.dumps(
            {
                "name": "embed-resume",
                "input": {"path": str(path)},
                "prompt": {"template": "{{ text }}"},
                "model": {
                    "path": str(tiny_model),
                    "task": "embed",
                    "engine": ENGINE,
                    "batch_size": 16,
                    "max_batches_in_flight": 1,
                },
                "carryover": ["id"],
                "output": {"path": str(out), "rows_per_file": 16},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray
    first = _run_cli(job, env)
    group = first.pid  # the session leader's pid is the group id
    try:
        deadline = time.time() + 300
        while not (list(out.glob("part-*.parquet")) if out.exists() else []):
            assert time.time() < deadline, "the first run wrote nothing in 300 s"
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            time.sleep(0.05)
        # Held at once: embedding is fast, and the run must be cut before its end.
        for p in psutil.process_iter(["name"]):
            try:
                if "EngineCore" in (p.info["name"] or "") and os.getpgid(p.pid) == group:
                    p.send_signal(signal.SIGSTOP)
            except (ProcessLookupError, psutil.Error):
                continue
    finally:
        os.killpg(group, signal.SIGKILL)
        first.wait()
    _kill_leftovers(group)
    before = pads.dataset(str(out), format="parquet").count_rows()
    assert 0 < before < rows

    second = _run_cli(job, env)
    text, _ = second.communicate(timeout=600)
    assert second.returncode == 0, text[-3000:]
    done = pads.dataset(str(out), format="parquet").to_table()
    ids = done.column("id").to_pylist()
    assert sorted(ids) == list(range(rows)), "each row exactly once"
    assert done.column("error").null_count == rows
    assert done.column("embedding").type == pa.list_(pa.float32(), 128)
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["resumed_rows"] == before
    assert metrics["rows_done"] == rows
