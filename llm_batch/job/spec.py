"""The job specification: one pydantic model shared by the CLI, the REST API and the pipeline.

A spec is validated once at the boundary and is immutable after. What travels
into Ray actors is its plain ``model_dump()``, never the model object itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llm_batch import columns
from llm_batch.errors import JobSpecError

__all__ = [
    "CacheSpec",
    "EngineSpec",
    "MetricsSpec",
    "NotifySpec",
    "NamedModelSpec",
    "POOLING_TASKS",
    "PoolingSpec",
    "StructuredSpec",
    "InputSpec",
    "JobSpec",
    "Message",
    "ModelSpec",
    "OutputSpec",
    "PromptSpec",
    "SamplingSpec",
    "StageSpec",
    "Step",
    "format_of",
    "format_validation_error",
]

InputFormat = Literal["parquet", "jsonl", "csv"]
_EXTENSIONS: dict[str, InputFormat] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
}


def format_of(name: str) -> InputFormat | None:
    """The input format a file or folder name's extension says (``.gz`` allowed), if any."""
    name = name.rstrip("/").lower()
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return fmt
    return None


# A name that prefixes output columns (a model's, a stage's).
_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    path: str = Field(
        description="Local path or URI (s3://, gs://, file://...) of a file or folder."
    )
    format: InputFormat | None = Field(
        default=None, description="parquet | jsonl | csv; inferred from the extension when absent."
    )
    columns: list[str] | None = Field(
        default=None,
        description="Extra columns to read besides those the template and carryover need.",
    )

    @property
    def resolved_format(self) -> InputFormat:
        if self.format is not None:
            return self.format
        fmt = format_of(self.path)
        if fmt is not None:
            return fmt
        raise JobSpecError(
            f"input.format: cannot infer the format of {self.path!r} from its extension; "
            "set input.format to parquet, jsonl or csv"
        )


class Message(_Strict):
    role: Literal["system", "user", "assistant"] = Field(description="Chat role.")
    content: str = Field(description="A Jinja template over the row's columns.")


class PromptSpec(_Strict):
    template: str | None = Field(
        default=None, description="A Jinja template over the row's columns, for completion models."
    )
    messages: list[Message] | None = Field(
        default=None,
        description="Chat messages whose contents are Jinja templates; rendered with the "
        "model's own chat template.",
    )
    messages_column: str | None = Field(
        default=None,
        min_length=1,
        description="A column holding each row's whole conversation (a list of "
        "{role, content} structs, or its JSON text), taken as is (no Jinja) and rendered "
        "with the model's own chat template.",
    )
    template_pair: str | None = Field(
        default=None,
        description="task score: the second text of each row's pair, a Jinja template "
        "(the first is prompt.template).",
    )
    pair_column: str | None = Field(
        default=None,
        min_length=1,
        description="task score: a column holding the second text of each row's pair, taken as is.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Chat prompts: keyword arguments for the model's chat template, e.g. "
        "{enable_thinking: false} for a reasoning model.",
    )
    group_by_prefix: bool = Field(
        default=True,
        description="Batch rows whose prompts share a prefix together (within each read block "
        "of up to 4,096 rows), so that they reach the same engine at the same time and its "
        "prefix cache serves them; the output's row order follows.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> PromptSpec:
        kinds = [self.template, self.messages, self.messages_column]
        if sum(kind is not None for kind in kinds) != 1:
            raise ValueError(
                "set exactly one of prompt.template or prompt.messages (or prompt.messages_column)"
            )
        if self.messages is not None and not self.messages:
            raise ValueError("prompt.messages must hold at least one message")
        if self.template_pair is not None and self.pair_column is not None:
            raise ValueError("set one of prompt.template_pair or prompt.pair_column, not both")
        if self.chat_template_kwargs is not None and self.template is not None:
            raise ValueError(
                "prompt.chat_template_kwargs: applies to chat prompts (prompt.messages or "
                "prompt.messages_column), not to prompt.template"
            )
        if self.paired and self.template is None:
            raise ValueError(
                "prompt.template_pair and prompt.pair_column pair with prompt.template "
                "(a score job's texts are not chat messages)"
            )
        return self

    @property
    def paired(self) -> bool:
        return self.template_pair is not None or self.pair_column is not None

    @property
    def field(self) -> str:
        """The field that names the prompt's columns, for messages that point at it."""
        if self.template is not None:
            return "prompt.template"
        return "prompt.messages" if self.messages is not None else "prompt.messages_column"


class EngineSpec(_Strict):
    max_model_len: int | None = Field(
        default=None, gt=0, description="Longest prompt plus generation, in tokens."
    )
    dtype: str = Field(default="auto", description="Weights dtype: auto, bfloat16, float16, ...")
    enforce_eager: bool = Field(
        default=False, description="Skip graph capture/compilation: faster start, slower steps."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica (tensor).")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica (stages).")
    max_num_seqs: int | None = Field(
        default=None, gt=0, description="Most sequences the engine batches at once."
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Fraction of accelerator memory for the engine (vLLM's default when unset).",
    )
    kv_cache_space_gb: float | None = Field(
        default=None,
        gt=0,
        description="CPU engine only: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE).",
    )
    seed: int = Field(default=0, description="Engine seed.")
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU engine only: compute threads, on the first cores this process may "
        "use (default: vLLM's own binding, every core but one, kept for the rest of the job).",
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Other vllm.EngineArgs fields, passed unchanged."
    )

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class ReplicaRange(_Strict):
    min: int = Field(ge=1, description="Fewest engine actors.")
    max: int = Field(ge=1, description="Most engine actors.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.max < self.min:
            raise ValueError(f"replicas.max={self.max} must be at least replicas.min={self.min}")
        return self


Task = Literal["generate", "embed", "classify", "score"]
POOLING_TASKS: tuple[Task, ...] = ("embed", "classify", "score")


class PoolingSpec(_Strict):
    normalize: bool | None = Field(
        default=None,
        description="embed and score: L2-normalize embeddings (vLLM's default: yes).",
    )
    dimensions: int | None = Field(
        default=None,
        gt=0,
        description="embed and score: cut embeddings to this size (Matryoshka models only).",
    )
    pooling_type: Literal["LAST", "MEAN", "CLS"] | None = Field(
        default=None,
        description="How a sequence's hidden states become one vector (vLLM's default for "
        "the model when unset).",
    )


class ModelSpec(_Strict):
    path: str = Field(description="Local model folder or Hugging Face id.")
    task: Task = Field(
        default="generate",
        description="generate: text. embed: an `embedding` vector per row. classify: "
        "`probs` over the model's labels and the top `label`. score: the `score` of each "
        "row's pair (prompt.template_pair or prompt.pair_column).",
    )
    pooling: PoolingSpec | None = Field(
        default=None, description="embed, classify and score: vLLM's pooling options."
    )
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM engine arguments.")
    lora: str | None = Field(
        default=None,
        min_length=1,
        description="A LoRA adapter of this model (a PEFT folder or hub id): the entries of a "
        "job's models (or of a stage's) that share the base model and engine arguments share "
        "one engine, each request carrying its adapter.",
    )
    reasoning_parser: str | None = Field(
        default=None,
        min_length=1,
        description="A reasoning model's vLLM reasoning parser (deepseek_r1, qwen3, ...): the "
        "output is split into `reasoning_text` and the answer, `generated_text`; structured "
        "outputs and label metrics apply to the answer.",
    )
    replicas: Annotated[int, Field(ge=1)] | ReplicaRange = Field(
        default=1,
        description="Engine actors (each owns one engine): a number, or {min, max} to "
        "let the pool grow and shrink with the work.",
    )
    accelerator_type: str | None = Field(
        default=None,
        description="Run engines only on nodes with this accelerator (Ray's "
        "accelerator_type:<T> resource), e.g. H100.",
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="STRICT_PACK",
        description="Placement-group strategy for a replica's GPUs when it has several.",
    )
    device: Literal["auto", "gpu", "cpu"] = Field(
        default="auto",
        description="auto: GPUs when the cluster has any, else the CPU engine.",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Rows per batch handed to an engine actor. Unset: 256 on the CPU engine, "
        "1024 on GPUs, so that the batches in flight cover the sequences vLLM runs at once "
        "(its max_num_seqs: 256 on CPU, up to 1024 on a GPU).",
    )
    max_batch_retries: int = Field(
        default=10,
        ge=0,
        description="A batch that was in an engine when it died (the actor killed, out of "
        "memory, its node lost; Ray restarts the actor) is retried alone on its engine, up "
        "to this many times; one that keeps killing it then becomes error rows and the job "
        "goes on. A pool whose engines keep dying with no batch completing fails the job.",
    )
    max_batches_in_flight: int = Field(
        default=4,
        ge=1,
        description="Batches an engine actor works on at once, so the engine never waits "
        "for the next batch to arrive: one running, the rest queued in the engine, enough "
        "that the queue does not drain while Ray brings the next one.",
    )

    @model_validator(mode="after")
    def _pooling_for_pooling_tasks(self) -> ModelSpec:
        if self.lora is not None and self.task != "generate":
            raise ValueError(f"lora: applies to task generate, not {self.task}; remove it")
        if self.reasoning_parser is not None and self.task != "generate":
            raise ValueError(
                f"reasoning_parser: applies to task generate, not {self.task}; remove it"
            )
        if self.pooling is not None and self.task == "generate":
            raise ValueError(
                "pooling: applies to task embed, classify or score, not generate; "
                "set task or remove pooling"
            )
        if (
            self.pooling is not None
            and self.task == "classify"
            and (self.pooling.dimensions is not None or self.pooling.normalize is not None)
        ):
            raise ValueError(
                "pooling.dimensions and pooling.normalize apply to embeddings "
                "(task embed or score), not to classify"
            )
        return self

    @property
    def pools(self) -> bool:
        """The model runs as a pooling model (vLLM's pooling runner), not a generator."""
        return self.task in POOLING_TASKS


class NamedModelSpec(ModelSpec):
    name: str = Field(
        pattern=_NAME_PATTERN,
        description="Prefix of this model's output columns (<name>__generated_text ...).",
    )


class StructuredSpec(_Strict):
    choice: list[str] | None = Field(default=None, description="The output is one of these.")
    regex: str | None = Field(default=None, description="The output matches this expression.")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="The output is JSON valid against this schema."
    )
    parse: bool = Field(
        default=False,
        description="json_schema only: also write the parsed value as a typed struct column "
        "(`parsed`, or `<model>__parsed`).",
    )
    any_whitespace: bool = Field(
        default=False,
        description="json_schema only: let the model put free whitespace between JSON tokens. "
        "Off by default (vLLM's disable_any_whitespace): a weak model can otherwise spend "
        "every token on whitespace.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredSpec:
        kinds = [k for k in ("choice", "regex", "json_schema") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "set exactly one of structured.choice, structured.regex or structured.json_schema"
            )
        if self.choice is not None and (
            not self.choice or len(set(self.choice)) != len(self.choice)
        ):
            raise ValueError("structured.choice must list distinct values")
        if self.parse and self.json_schema is None:
            raise ValueError("structured.parse needs structured.json_schema")
        if self.any_whitespace and self.json_schema is None:
            raise ValueError("structured.any_whitespace needs structured.json_schema")
        if self.regex is not None:
            import re

            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"structured.regex does not compile: {e}") from None
        if self.json_schema is not None and self.parse:
            from llm_batch.job.jsonschema import arrow_type_for_schema

            arrow_type_for_schema(self.json_schema)  # raises on what Parquet cannot hold
        return self


class SamplingSpec(_Strict):
    """vLLM's ``SamplingParams``, with its own ranges (a value it would refuse is refused here,
    naming the field, before any engine starts)."""

    max_tokens: int = Field(default=16, gt=0, description="Most tokens generated per row.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=-1, description="Sample from the k likeliest (0, -1: all).")
    min_p: float = Field(
        default=0.0, ge=0, le=1, description="Drop tokens below this share of the likeliest's."
    )
    presence_penalty: float = Field(
        default=0.0, ge=-2, le=2, description="Penalize tokens already generated (once each)."
    )
    frequency_penalty: float = Field(
        default=0.0, ge=-2, le=2, description="Penalize tokens by how often they were generated."
    )
    repetition_penalty: float = Field(
        default=1.0,
        gt=0,
        allow_inf_nan=False,
        description="Above 1 discourages tokens of the prompt and the output so far.",
    )
    min_tokens: int = Field(
        default=0, ge=0, description="Tokens generated before a stop or EOS may end the row."
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, description="Token ids that end a generation."
    )
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="Token id -> bias added to its logit (-100 to 100)."
    )
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="Words never generated."
    )
    include_stop_str_in_output: bool = Field(
        default=False, description="Keep the stop string at the end of the text."
    )
    skip_special_tokens: bool = Field(
        default=True, description="Leave special tokens out of the text."
    )
    seed: int | None = Field(default=None, description="Per-request sampling seed.")
    stop: list[str] | None = Field(default=None, description="Strings that end a generation.")
    ignore_eos: bool = Field(
        default=False, description="Keep generating past end-of-sequence (for benchmarks)."
    )
    n: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Samples per prompt, each an output row with its `sample_index`.",
    )
    structured: StructuredSpec | None = Field(
        default=None, description="Constrain the output: a choice list, a regex or a JSON schema."
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="Log-probabilities of the top-k tokens at each step, in `logprobs`.",
    )
    overrides_column: str | None = Field(
        default=None,
        description="A struct (or JSON string) column of per-row overrides of these fields.",
    )

    @field_validator("stop")
    @classmethod
    def _stops_non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _min_below_max(self) -> SamplingSpec:
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"sampling.min_tokens={self.min_tokens} must be at most "
                f"sampling.max_tokens={self.max_tokens}"
            )
        return self


class StageSpec(_Strict):
    name: str = Field(
        pattern=_NAME_PATTERN,
        description="Prefix of this stage's output columns (<stage>__generated_text; with "
        "several models <stage>__<model>__generated_text).",
    )
    prompt: PromptSpec = Field(
        description="As the job's prompt; its templates see the row's input columns and every "
        "earlier stage's output columns, by their names in the output file."
    )
    model: ModelSpec | None = Field(default=None, description="The stage's model.")
    models: list[NamedModelSpec] | None = Field(
        default=None, description="Several models side by side in this stage (instead of model)."
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling params.")
    keep_if: str | None = Field(
        default=None,
        min_length=1,
        description="A Jinja expression over the row's columns after this stage (e.g. "
        "\"judge__generated_text == 'yes'\"): a row for which it is false skips the later "
        "stages and is still written, with `dropped_by` naming this stage.",
    )


@dataclasses.dataclass(frozen=True)
class Step:
    """One stage as the pipeline runs it. A job without ``stages`` is one step of no name
    whose fields are the job's own ``prompt``, ``sampling`` and ``model(s)``."""

    name: str | None
    field: str  # the spec path of its fields: "" or "stages[i]."
    prompt: PromptSpec
    sampling: SamplingSpec
    models: list[tuple[str, str | None, ModelSpec]]  # (spec path, column prefix, spec)
    keep_if: str | None = None

    def output_columns(self) -> list[str]:
        """The columns this step's models append, in order."""
        extra = []
        if self.sampling.structured is not None and self.sampling.structured.parse:
            extra.append(columns.PARSED)
        if self.sampling.logprobs is not None:
            extra.append(columns.LOGPROBS)
        out = []
        for _, name, model in self.models:
            reasoning = [columns.REASONING_TEXT] if model.reasoning_parser else []
            own = (
                columns.TASK_COLUMNS[model.task]
                if model.pools
                else (*columns.OUTPUT_COLUMNS, *reasoning, *extra)
            )
            out += [columns.model_column(name, c) for c in own]
        return out


class MetricsSpec(_Strict):
    label_column: str | None = Field(
        default=None,
        description="Ground-truth label column: accuracy, per-class precision/recall/F1 and "
        "the confusion matrix of each model's output against it; with structured.choice and "
        "sampling.logprobs, also cross-entropy and ROC-AUC of the label's probability.",
    )
    accumulators: list[str] = Field(
        default_factory=list,
        description="Your own accumulators, as import paths `package.module:ClassName`.",
    )


class OutputSpec(_Strict):
    path: str = Field(description="Folder (local path or URI) the Parquet files are written to.")
    mode: Literal["safe", "overwrite"] = Field(
        default="safe",
        description="safe: a folder holding files llm-batch did not write is refused. "
        "overwrite: its Parquet files are deleted and replaced; other files are kept. "
        "Either way the job's own earlier output there is replaced (or resumed).",
    )
    rows_per_file: int = Field(
        default=10_000,
        ge=1,
        description="Rows gathered before a Parquet file is written: smaller resumes with "
        "less redone after a fault and shows rows sooner, larger makes fewer files. A job of "
        "one batch that the service runs in its engine host writes one file per input file.",
    )
    retain_days: float | None = Field(
        default=None,
        gt=0,
        description="Service only, for an output the service places (no path given): days "
        "it is kept after the job ends, then deleted (default LLM_BATCH_RETENTION_DAYS; "
        "unset: kept). A folder you name is never deleted by the service.",
    )


class CacheSpec(_Strict):
    mode: Literal["read_write", "read", "write", "off"] = Field(
        default="read_write",
        description="The response cache (rows with deterministic sampling only: greedy or "
        "seeded, n 1): read_write takes stored responses and stores new ones; read only "
        "takes; write only stores; off neither.",
    )
    path: str | None = Field(
        default=None,
        description="The cache's folder or URI; default $LLM_BATCH_CACHE_DIR, else beside an "
        "object-storage output (.llm-batch-cache), else ~/.cache/llm_batch/responses. The "
        "service keeps one per key and refuses this field.",
    )


class NotifySpec(_Strict):
    url: str = Field(
        description="Service only: the job's end is POSTed here as a signed Standard "
        "Webhooks event (job.succeeded, job.failed, job.cancelled); its host must be one "
        "the service allows (LLM_BATCH_WEBHOOK_HOSTS)."
    )


class JobSpec(_Strict):
    name: str = Field(default="job", min_length=1, max_length=200, description="A label.")
    input: InputSpec = Field(description="The prompt dataset.")
    prompt: PromptSpec | None = Field(
        default=None, description="How a row becomes a prompt (a job without stages)."
    )
    model: ModelSpec | None = Field(default=None, description="The model and its engine.")
    models: list[NamedModelSpec] | None = Field(
        default=None,
        description="Several models in one pass over the data (instead of `model`); output "
        "columns are prefixed with each model's name.",
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling params.")
    stages: list[StageSpec] | None = Field(
        default=None,
        description="A chain run in one pass over the data (instead of prompt, model(s) and "
        "sampling): each stage's prompt sees the earlier stages' outputs, and its keep_if "
        "decides whether a row goes on.",
    )
    carryover: list[str] = Field(
        default_factory=list, description="Input columns copied unchanged into the output."
    )
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Accumulators.")
    output: OutputSpec | None = Field(
        default=None,
        description="Where the results go; the CLI defaults to out/<name>, the service to "
        "its data directory.",
    )
    notify: NotifySpec | None = Field(
        default=None, description="Service only: a webhook told when the job ends."
    )
    cache: CacheSpec = Field(
        default_factory=CacheSpec,
        description="The response cache across runs: rows generated before with the same "
        "model, engine arguments, sampling and prompt are not generated again.",
    )
    priority: int = Field(
        default=0, description="Queue order in the service: higher runs first, then oldest first."
    )

    @field_validator("carryover")
    @classmethod
    def _carryover_names(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in v:
            if name in seen:
                raise ValueError(f"column {name!r} is listed twice")
            if name.startswith(columns.INTERNAL_PREFIX):
                raise ValueError(
                    f"column {name!r} uses the reserved prefix {columns.INTERNAL_PREFIX}"
                )
            seen.add(name)
        return v

    @model_validator(mode="after")
    def _models(self) -> JobSpec:
        if self.stages is not None:
            self._check_stages()
        else:
            if self.prompt is None:
                raise ValueError("prompt: required field is missing (or give `stages`)")
            _check_model_choice(self.model, self.models, "")
        written = [columns.ROW_ID, *self.output_columns()]
        label = self.metrics.label_column
        kept = [("carryover", c) for c in self.carryover]
        kept += [("metrics.label_column", label)] if label else []  # written too
        for field, name in kept:
            if name in written:
                raise ValueError(
                    f"{field}: column {name!r} clashes with an output column the job writes "
                    f"({', '.join(written)}); rename it in the input, or name the model "
                    "(models: [{name: ...}]) to prefix its columns"
                )
        for step in self.steps:
            self._check_tasks(step)
            for field, _, model in step.models:
                mml = model.engine.max_model_len
                if model.pools:
                    continue  # nothing generated: the whole length is the prompt's
                if mml is not None and step.sampling.max_tokens >= mml:
                    raise ValueError(
                        f"{step.field}sampling.max_tokens={step.sampling.max_tokens} must be "
                        f"below {field}.engine.max_model_len={mml}, leaving room for the prompt"
                    )
        return self

    def _check_stages(self) -> None:
        assert self.stages is not None
        given = [f for f in ("prompt", "model", "models") if getattr(self, f) is not None]
        if self.sampling != SamplingSpec():
            given.append("sampling")
        if given:
            raise ValueError(
                f"{given[0]}: a job with stages sets it in each stage (stages[i].{given[0]})"
            )
        if not self.stages:
            raise ValueError("stages: list at least one stage")
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stages: names must be unique, {', '.join(dupes)} repeats")
        for i, stage in enumerate(self.stages):
            _check_model_choice(stage.model, stage.models, f"stages[{i}].")
            if i and stage.sampling.n > 1:
                raise ValueError(
                    f"stages[{i}].sampling.n: only the first stage may ask for several "
                    "samples per row (each then goes through the later stages)"
                )
            if stage.keep_if is not None:
                from llm_batch.pipeline.prompts import expression_variables

                expression_variables(stage.keep_if, field=f"stages[{i}].keep_if")
        with_choices = [
            f"stages[{i}]"
            for i, s in enumerate(self.stages)
            if s.sampling.structured is not None and s.sampling.structured.choice
        ]
        if self.metrics.label_column and len(with_choices) > 1:
            raise ValueError(
                f"metrics.label_column: {with_choices[0]} and {with_choices[1]} both choose "
                "labels; the label metrics of a staged job read one stage's choices"
            )

    def _check_tasks(self, step: Step) -> None:
        """What pooling models (embed, classify, score) take and refuse."""
        models = [(f, m) for f, _, m in step.models]
        pooling = [(f, m) for f, m in models if m.pools]
        sampling, prompt, at = step.sampling, step.prompt, step.field
        # Refused when it says anything: a stored spec spells out the default block.
        if pooling and len(pooling) == len(models) and sampling != SamplingSpec():
            field, model = pooling[0]
            raise ValueError(
                f"{at}sampling: does not apply to pooling models ({field}.task is "
                f"{model.task}); remove the sampling block"
            )
        if pooling and sampling.n > 1:
            field, model = pooling[0]
            raise ValueError(
                f"{at}sampling.n: {field} (task {model.task}) writes one output per row; "
                "sampling.n must be 1 in a job with a pooling model"
            )
        if pooling and prompt.template is None:
            field, model = pooling[0]
            raise ValueError(
                f"{at}{prompt.field}: {field} (task {model.task}) takes text; "
                f"use {at}prompt.template"
            )
        scorers = [f for f, m in models if m.task == "score"]
        if scorers and not prompt.paired:
            raise ValueError(
                f"{at}prompt.template_pair: {scorers[0]} (task score) scores pairs of texts; "
                f"set {at}prompt.template_pair or {at}prompt.pair_column for the second text"
            )
        if prompt.paired and not scorers:
            field = "prompt.template_pair" if prompt.template_pair else "prompt.pair_column"
            raise ValueError(f"{at}{field}: only a model with task score reads a pair")

    @property
    def steps(self) -> list[Step]:
        """The stages as the pipeline runs them (a job without ``stages`` is one)."""
        if self.stages is None:
            assert self.prompt is not None
            named: list[tuple[str, str | None, ModelSpec]] = []
            if self.models is not None:
                named = [(f"models[{i}]", m.name, m) for i, m in enumerate(self.models)]
            elif self.model is not None:
                named = [("model", None, self.model)]
            return [Step(None, "", self.prompt, self.sampling, named)]
        steps = []
        for i, stage in enumerate(self.stages):
            at = f"stages[{i}]."
            if stage.models is not None:
                models: list[tuple[str, str | None, ModelSpec]] = [
                    (f"{at}models[{j}]", f"{stage.name}__{m.name}", m)
                    for j, m in enumerate(stage.models)
                ]
            else:
                models = [(f"{at}model", stage.name, stage.model)] if stage.model else []
            steps.append(Step(stage.name, at, stage.prompt, stage.sampling, models, stage.keep_if))
        return steps

    @property
    def samples_per_row(self) -> int:
        """Output rows per input row: the (first) stage's sampling.n."""
        return self.steps[0].sampling.n

    def sampling_of(self, model_name: str | None) -> SamplingSpec:
        """The sampling block that applies to a model (by its column prefix)."""
        for step in self.steps:
            if any(prefix == model_name for _, prefix, _ in step.models):
                return step.sampling
        raise KeyError(model_name)

    def output_columns(self) -> list[str]:
        """The columns the job appends after the carryover columns, in order."""
        out = [columns.SAMPLE_INDEX] if self.samples_per_row > 1 else []
        for step in self.steps:
            out += step.output_columns()
        if self.stages is not None:
            out.append(columns.DROPPED_BY)
        return out

    @property
    def model_specs(self) -> list[ModelSpec]:
        """Each model's spec, in the order of ``model_names``."""
        return [m for _, m in self.named_models()]

    def named_models(self) -> list[tuple[str, ModelSpec]]:
        """(field path, spec) of each model of each stage: ``model``, ``models[i]``,
        ``stages[i].model``, ``stages[i].models[j]``."""
        return [(field, m) for step in self.steps for field, _, m in step.models]

    @property
    def model_names(self) -> list[str | None]:
        """Column prefixes: None for a single-model job, else each model's name (in a
        staged job, its stage's name, or ``<stage>__<model>``)."""
        return [name for step in self.steps for _, name, _ in step.models]

    def digest(self) -> str:
        """A short digest of the whole job: equal digests run the very same job."""
        import hashlib

        # Who is told, how long the service keeps it, whether rows come from the response
        # cache and the order rows are batched in change nothing in the output's rows.
        data = self.model_dump(
            mode="json",
            exclude={
                "notify": True,
                "cache": True,
                "prompt": {"group_by_prefix"},
                "stages": {"__all__": {"prompt": {"group_by_prefix"}}},
            },
        )
        if data.get("output"):
            data["output"].pop("retain_days", None)
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_output(self, path: str) -> JobSpec:
        """A copy of this spec writing to ``path`` (other output settings kept)."""
        output = (self.output or OutputSpec(path=path)).model_copy(update={"path": path})
        return self.model_copy(update={"output": output})

    @property
    def output_path(self) -> str:
        if self.output is None:
            raise JobSpecError("output.path: required field is missing")
        return self.output.path

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "job") -> JobSpec:
        if not isinstance(data, dict):
            raise JobSpecError(
                f"{source}: expected a mapping of job fields, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise JobSpecError(format_validation_error(e, source=source)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> JobSpec:
        """Load a job from a YAML or JSON file; errors name the file and the field."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise JobSpecError(f"job file {str(p)!r} does not exist") from None
        except UnicodeDecodeError as e:
            raise JobSpecError(f"job file {str(p)!r} is not UTF-8 text: {e.reason}") from None
        try:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise JobSpecError(f"job file {str(p)!r} does not parse: {e}") from None
        return cls.from_dict(data, source=f"job file {str(p)!r}")


def _check_model_choice(
    model: ModelSpec | None, models: list[NamedModelSpec] | None, at: str
) -> None:
    if (model is None) == (models is None):
        raise ValueError(f"set exactly one of `{at}model` (one model) or `{at}models` (a list)")
    if models is not None:
        if not models:
            raise ValueError(f"{at}models: list at least one model")
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{at}models: names must be unique, {', '.join(dupes)} repeats")


def format_validation_error(error: ValidationError, *, source: str = "job") -> str:
    """One line per problem, each naming the field (``sampling.max_tokens``) and the fix."""
    lines = []
    for err in error.errors():
        loc = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the README's job format)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return f"{source} is invalid: " + "; ".join(lines)
