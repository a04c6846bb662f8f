"""The job specification: one pydantic model shared by the CLI, the REST API and the pipeline.

A spec is validated once at the boundary and is immutable after. What travels
into Ray actors is its plain ``model_dump()``, never the model object itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llm_batch import columns
from llm_batch.errors import JobSpecError

__all__ = [
    "EngineSpec",
    "InputSpec",
    "JobSpec",
    "Message",
    "ModelSpec",
    "OutputSpec",
    "PromptSpec",
    "SamplingSpec",
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    path: str = Field(description="Local path or URI (s3://, gs://, file://...) of a file or folder.")
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
        name = self.path.rstrip("/").lower()
        for ext, fmt in _EXTENSIONS.items():
            if name.endswith(ext) or name.endswith(ext + ".gz"):
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

    @model_validator(mode="after")
    def _one_kind(self) -> PromptSpec:
        if (self.template is None) == (self.messages is None):
            raise ValueError("set exactly one of prompt.template or prompt.messages")
        if self.messages is not None and not self.messages:
            raise ValueError("prompt.messages must hold at least one message")
        return self


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
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Other vllm.EngineArgs fields, passed unchanged."
    )

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class ModelSpec(_Strict):
    path: str = Field(description="Local model folder or Hugging Face id.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM engine arguments.")
    replicas: int = Field(default=1, ge=1, description="Engine actors (each owns one engine).")
    batch_size: int = Field(
        default=256, ge=1, description="Rows per batch handed to an engine actor."
    )
    max_batches_in_flight: int = Field(
        default=2,
        ge=1,
        description="Batches an engine actor works on at once, so the engine never waits "
        "for the next batch to arrive.",
    )


class SamplingSpec(_Strict):
    max_tokens: int = Field(default=16, gt=0, description="Most tokens generated per row.")
    temperature: float = Field(default=0.0, ge=0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Per-request sampling seed.")
    stop: list[str] | None = Field(default=None, description="Strings that end a generation.")
    ignore_eos: bool = Field(
        default=False, description="Keep generating past end-of-sequence (for benchmarks)."
    )

    @field_validator("stop")
    @classmethod
    def _stops_non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v


class OutputSpec(_Strict):
    path: str = Field(description="Folder (local path or URI) the Parquet files are written to.")


class JobSpec(_Strict):
    name: str = Field(default="job", min_length=1, max_length=200, description="A label.")
    input: InputSpec = Field(description="The prompt dataset.")
    prompt: PromptSpec = Field(description="How a row becomes a prompt.")
    model: ModelSpec = Field(description="The model and its engine.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling params.")
    carryover: list[str] = Field(
        default_factory=list, description="Input columns copied unchanged into the output."
    )
    output: OutputSpec | None = Field(
        default=None,
        description="Where the results go; the CLI defaults to out/<name>, the service to "
        "its data directory.",
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
            if name in columns.OUTPUT_COLUMNS or name.startswith(columns.INTERNAL_PREFIX):
                raise ValueError(
                    f"column {name!r} clashes with an output column the job writes "
                    f"({', '.join(columns.OUTPUT_COLUMNS)}); rename it in the input"
                )
            seen.add(name)
        return v

    @model_validator(mode="after")
    def _fits_model(self) -> JobSpec:
        mml = self.model.engine.max_model_len
        if mml is not None and self.sampling.max_tokens >= mml:
            raise ValueError(
                f"sampling.max_tokens={self.sampling.max_tokens} must be below "
                f"model.engine.max_model_len={mml}, leaving room for the prompt"
            )
        return self

    def with_output(self, path: str) -> JobSpec:
        """A copy of this spec writing to ``path``."""
        return self.model_copy(update={"output": OutputSpec(path=path)})

    @property
    def output_path(self) -> str:
        if self.output is None:
            raise JobSpecError("output.path: required field is missing")
        return self.output.path

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "job") -> JobSpec:
        if not isinstance(data, dict):
            raise JobSpecError(f"{source}: expected a mapping of job fields, got {type(data).__name__}")
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
