"""Staged jobs without an engine: the spec's checks, what the plan reads and carries, and
the step between two stages (which rows stop, with what ``dropped_by``, and the next
stage's prompts rendered from the earlier stage's columns)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_batch import columns
from llm_batch.errors import JobSpecError
from llm_batch.job.spec import JobSpec
from llm_batch.pipeline.run import next_stage, plan_job


def staged(tmp_path, **changes) -> dict:
    job = {
        "name": "chain",
        "input": {"path": str(tmp_path / "in.parquet")},
        "stages": [
            {
                "name": "draft",
                "prompt": {"template": "Write about {{ topic }}."},
                "model": {"path": "m"},
            },
            {
                "name": "judge",
                "prompt": {"template": "Is this good? {{ draft__generated_text }}"},
                "model": {"path": "m"},
                "sampling": {"structured": {"choice": ["yes", "no"]}},
                "keep_if": "judge__generated_text == 'yes'",
            },
            {
                "name": "rewrite",
                "prompt": {"template": "Rewrite for {{ audience }}: {{ draft__generated_text }}"},
                "model": {"path": "m"},
            },
        ],
        "carryover": ["id"],
    }
    job.update(changes)
    return job


@pytest.fixture
def data(tmp_path):
    pq.write_table(
        pa.table({"id": [1, 2], "topic": ["a", "b"], "audience": ["kids", "cooks"], "x": [0, 0]}),
        tmp_path / "in.parquet",
    )
    return tmp_path


def test_columns_are_prefixed_by_stage_and_dropped_by_comes_last(data):
    spec = JobSpec.from_dict(staged(data))
    out = spec.output_columns()
    assert out[:2] == ["draft__generated_text", "draft__num_input_tokens"]
    assert "judge__generated_text" in out and "rewrite__error" in out
    assert out[-1] == "dropped_by"
    assert spec.model_names == ["draft", "judge", "rewrite"]
    assert [f for f, _ in spec.named_models()] == [
        "stages[0].model",
        "stages[1].model",
        "stages[2].model",
    ]


def test_several_models_in_a_stage_are_named_stage_then_model(data):
    job = staged(data)
    job["stages"][1] = {
        **job["stages"][1],
        "model": None,
        "models": [{"name": "a", "path": "m"}, {"name": "b", "path": "m"}],
        "keep_if": "judge__a__generated_text == 'yes'",
    }
    spec = JobSpec.from_dict(job)
    assert spec.model_names == ["draft", "judge__a", "judge__b", "rewrite"]
    assert "judge__b__generated_text" in spec.output_columns()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"prompt": {"template": "x"}}, "prompt: a job with stages sets it in each stage"),
        ({"sampling": {"max_tokens": 5}}, "sampling: a job with stages sets it in each stage"),
        ({"stages": []}, "stages: list at least one stage"),
    ],
)
def test_job_level_fields_beside_stages_are_refused(data, change, says):
    with pytest.raises(JobSpecError, match=says):
        JobSpec.from_dict(staged(data, **change))


def test_stage_refusals_name_the_stage_field(data):
    job = staged(data)
    job["stages"][2]["name"] = "draft"
    with pytest.raises(JobSpecError, match="stages: names must be unique, draft repeats"):
        JobSpec.from_dict(job)
    job = staged(data)
    job["stages"][1]["sampling"]["n"] = 2
    with pytest.raises(JobSpecError, match=r"stages\[1\].sampling.n: only the first stage"):
        JobSpec.from_dict(job)
    job = staged(data)
    job["stages"][1]["keep_if"] = "judge__generated_text =="
    with pytest.raises(JobSpecError, match=r"stages\[1\].keep_if: expression syntax error"):
        JobSpec.from_dict(job)
    job = staged(data)
    del job["stages"][0]["model"]
    with pytest.raises(JobSpecError, match=r"stages\[0\].model"):
        JobSpec.from_dict(job)


def test_a_carryover_column_named_dropped_by_is_refused(data):
    with pytest.raises(JobSpecError, match="carryover: column 'dropped_by' clashes"):
        JobSpec.from_dict(staged(data, carryover=["dropped_by"]))


def test_plan_reads_and_carries_what_later_stages_read(data):
    spec = JobSpec.from_dict(staged(data, output={"path": str(data / "out")}))
    plan = plan_job(spec)
    assert plan.read_columns == ["id", "topic", "audience"]  # not x
    assert "audience" in plan.carried  # read by the third stage's template
    assert "audience" in plan.drop_before_write and columns.DROPPED in plan.drop_before_write


def test_plan_names_the_stage_whose_column_is_missing(data):
    job = staged(data, output={"path": str(data / "out")})
    job["stages"][2]["prompt"]["template"] = "{{ drfat__generated_text }}"
    with pytest.raises(JobSpecError, match=r"stages\[2\].prompt.template uses column 'drfat__"):
        plan_job(JobSpec.from_dict(job))
    job = staged(data, output={"path": str(data / "out")})
    job["stages"][1]["keep_if"] = "rewrite__generated_text == 'x'"  # a later stage's column
    with pytest.raises(JobSpecError, match=r"stages\[1\].keep_if uses column 'rewrite__"):
        plan_job(JobSpec.from_dict(job))


def _after_judge(**kwargs) -> pa.Table:
    batch = pa.table(
        {
            "row_id": [1, 2, 3, 4, 5],
            "audience": ["kids", "cooks", "kids", "cooks", "kids"],
            "draft__generated_text": ["d1", "d2", None, "d4", "d5"],
            "draft__error": [None, None, "boom", None, None],
            "judge__generated_text": ["yes", "no", None, "yes", None],
            "judge__error": [None, None, None, None, "engine said no"],
            columns.DROPPED: [None, None, "draft", None, None],
        }
    )
    args = {
        "stage": "judge",
        "models": ["judge"],
        "keep_if": "judge__generated_text == 'yes'",
        "field": "stages[1].keep_if",
        "prompt_json": '{"template": "For {{ audience }}: {{ draft__generated_text }}"}',
        "prompt_field": "stages[2].prompt",
        "drop": [],
    }
    return next_stage(batch, **{**args, **kwargs})


def test_rows_stop_where_keep_if_says_no_or_a_model_failed_them():
    out = _after_judge()
    # 1 kept; 2 judged no; 3 stopped earlier (stays "draft"); 4 kept; 5 failed in judge.
    assert out.column(columns.DROPPED).to_pylist() == [None, "judge", "draft", None, "judge"]
    assert out.column(columns.PROMPT).to_pylist() == [
        "For kids: d1",
        None,
        None,
        "For cooks: d4",
        None,
    ]
    assert out.column(columns.RENDER_ERROR).null_count == 5


def test_a_keep_if_that_cannot_be_evaluated_is_the_rows_error():
    out = _after_judge(keep_if="judge__generated_text > 3")  # str > int
    errors = out.column("judge__error").to_pylist()
    assert errors[0].startswith("keep_if 'judge__generated_text > 3' failed: TypeError")
    assert errors[4] == "engine said no"  # its own error kept
    assert out.column(columns.DROPPED).to_pylist()[:2] == ["judge", "judge"]


def test_after_the_last_stage_dropped_by_is_written_and_internals_go():
    out = _after_judge(prompt_json=None, prompt_field=None, drop=["audience", columns.DROPPED])
    assert out.column_names[-1] == "dropped_by"
    assert "audience" not in out.column_names and columns.DROPPED not in out.column_names
    assert out.column("dropped_by").to_pylist() == [None, "judge", "draft", None, "judge"]


class _Recorder:
    """Stands in for a Ray Dataset: notes the operators a pipeline chains."""

    def __init__(self) -> None:
        self.ops: list[str] = []

    def map_batches(self, fn, **kwargs) -> _Recorder:  # noqa: ANN001
        name = getattr(fn, "__name__", type(fn).__name__)
        members = (kwargs.get("fn_constructor_kwargs") or {}).get("members")
        self.ops.append(f"{name}{[m['name'] for m in members]}" if members else name)
        return self

    def repartition(self, **kwargs) -> _Recorder:
        self.ops.append("repartition")
        return self


def test_stages_chain_engines_and_the_steps_between_them(data, monkeypatch):
    from llm_batch.pipeline import run

    monkeypatch.setattr(run, "_cluster_gpus", lambda ttl=30.0: 0.0)
    spec = JobSpec.from_dict(staged(data, output={"path": str(data / "out")}))
    ds = run.engine_pools(_Recorder(), spec, plan_job(spec), tracker=None)
    assert ds.ops == [
        "EngineStage['draft']",
        "next_stage",
        "EngineStage['judge']",
        "next_stage",
        "EngineStage['rewrite']",
        "next_stage",  # the last: dropped_by written, internal columns dropped
    ]


def test_adapters_of_a_stage_share_one_engine_stage_in_the_stages_column_order(data, monkeypatch):
    from llm_batch.pipeline import run

    monkeypatch.setattr(run, "_cluster_gpus", lambda ttl=30.0: 0.0)
    (data / "fr").mkdir()
    (data / "fr" / "adapter_config.json").write_text('{"r": 8}')
    job = staged(data, output={"path": str(data / "out")})
    job["stages"][1] = {
        **job["stages"][1],
        "model": None,
        "models": [
            {"name": "a", "path": "m", "lora": str(data / "fr")},
            {"name": "other", "path": "m2"},
            {"name": "base", "path": "m"},
        ],
        "keep_if": None,
    }
    spec = JobSpec.from_dict(job)
    ds = run.engine_pools(_Recorder(), spec, plan_job(spec), tracker=None)
    assert ds.ops == [
        "EngineStage['draft']",
        "next_stage",
        "EngineStage['judge__a', 'judge__base']",  # one engine: the adapter and its base
        "EngineStage['judge__other']",
        "_reorder",  # judge__a, judge__other, judge__base: as the stage lists them
        "next_stage",
        "EngineStage['rewrite']",
        "next_stage",
    ]
