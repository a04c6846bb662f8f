"""LoRA adapters on the real CPU engine: two adapters of the tiny model and the base beside
them, in one job's ``models``, share one engine (LoRA on, its limits the adapters'), and
each model's texts equal raw ``LLM.generate`` with its ``LoRARequest`` (the base: none).
The adapters are written offline by ``write_tiny_adapter``, as the tiny model is."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from llm_batch.job.spec import JobSpec

pytestmark = pytest.mark.e2e

ENGINE = {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True}
ROWS = 12


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model):
    from llm_batch.models.tiny import write_tiny_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        "fr": write_tiny_adapter(tiny_model, root / "fr", rank=8, seed=1),
        "de": write_tiny_adapter(tiny_model, root / "de", rank=16, seed=2),
    }


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, tiny_model, adapters, ray_local):
    from llm_batch.pipeline.run import run_job

    root = tmp_path_factory.mktemp("lora")
    table = pa.table({"id": list(range(ROWS)), "text": [f"Review {i}:" for i in range(ROWS)]})
    pq.write_table(table, root / "in.parquet")
    base = {"path": str(tiny_model), "engine": ENGINE, "batch_size": 4}
    spec = JobSpec.from_dict(
        {
            "name": "adapters",
            "input": {"path": str(root / "in.parquet")},
            "prompt": {"template": "{{ text }}"},
            "models": [
                {"name": "fr", **base, "lora": str(adapters["fr"])},
                {"name": "plain", **base},
                {"name": "de", **base, "lora": str(adapters["de"])},
            ],
            "sampling": {"max_tokens": 8, "temperature": 0.0},
            "carryover": ["id", "text"],
            "output": {"path": str(root / "out")},
        }
    )
    snaps: list[dict] = []
    run_job(spec, on_progress=snaps.append, progress_interval=0.5)
    out = pads.dataset(str(root / "out"), format="parquet").to_table().sort_by("id")
    metrics = json.loads((root / "out" / "_metrics.json").read_text())
    return {"out": out, "metrics": metrics}


def test_adapters_of_one_base_share_one_engine(adapted):
    metrics = adapted["metrics"]
    assert metrics["engine_starts"] == 1
    assert {e["actor_id"] for e in metrics["engines"]} == {metrics["engines"][0]["actor_id"]}
    assert set(metrics["models"]) == {"fr", "plain", "de"}
    assert all(m["rows_done"] == ROWS for m in metrics["models"].values())
    # The columns in the order the job lists its models, though one engine appended them.
    names = [c for c in adapted["out"].column_names if c.endswith("__generated_text")]
    assert names == ["fr__generated_text", "plain__generated_text", "de__generated_text"]


def test_each_adapter_equals_raw_vllm_with_its_lora_request(
    adapted, tiny_model, adapters, reference_engines
):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    out = adapted["out"]
    prompts = out.column("text").to_pylist()
    llm = reference_engines(tiny_model, enable_lora=True, max_loras=2, max_lora_rank=16)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    requests = {
        "fr": LoRARequest("fr", 1, str(adapters["fr"])),
        "de": LoRARequest("de", 2, str(adapters["de"])),
        "plain": None,
    }
    texts = {}
    for name, request in requests.items():
        raw = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        texts[name] = [o.outputs[0].text for o in raw]
        assert out.column(f"{name}__generated_text").to_pylist() == texts[name], name
    assert texts["fr"] != texts["de"] != texts["plain"]  # the adapters do change the output
