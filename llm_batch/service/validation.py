"""Admission of a submitted job: everything checked before ``201``, nothing that needs an engine.

The body is resolved (model names from the catalog, relative paths against the
service's directory, since jobs run in Ray's working directories), validated
as a ``JobSpec`` and planned (``plan_job``: the input exists, the columns the
template and carryover name are there). Every refusal is a ``JobSpecError`` or
``InputError`` whose message names the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llm_batch.errors import JobSpecError
from llm_batch.job.spec import JobSpec
from llm_batch.service.catalog import ModelCatalog

__all__ = ["Submission", "absolute_paths", "prepare_submission"]


@dataclasses.dataclass(frozen=True)
class Submission:
    spec: JobSpec
    rows_total: int | None  # known up front for Parquet inputs


def _is_local(path: str) -> bool:
    return "://" not in path


def absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a raw job mapping whose local input/output paths are absolute, and whose
    model paths are too when they name a folder that exists under ``base`` (a relative
    path that does not is taken for a model hub id)."""
    out = dict(data)

    def fix(block: Any, *, must_exist: bool) -> Any:
        if not isinstance(block, dict) or not isinstance(block.get("path"), str):
            return block
        path = block["path"]
        if not _is_local(path) or Path(path).expanduser().is_absolute():
            return {**block, "path": str(Path(path).expanduser())} if _is_local(path) else block
        candidate = base / path
        if must_exist and not candidate.exists():
            return block
        return {**block, "path": str(candidate.resolve())}

    out["input"] = fix(out.get("input"), must_exist=False)
    if out.get("output") is not None:
        out["output"] = fix(out["output"], must_exist=False)
    if "model" in out:
        out["model"] = fix(out["model"], must_exist=True)
    if isinstance(out.get("models"), list):
        out["models"] = [fix(m, must_exist=True) for m in out["models"]]
    return {k: v for k, v in out.items() if k in data}


def prepare_submission(body: Any, *, catalog: ModelCatalog, base: Path) -> Submission:
    """Validate and plan a submitted job; raises ``JobSpecError`` / ``InputError``."""
    from llm_batch.pipeline.run import plan_job

    if not isinstance(body, dict):
        raise JobSpecError(
            f"request body: expected a JSON object of job fields, got {type(body).__name__}"
        )
    data = absolute_paths(catalog.resolve(body), base)
    spec = JobSpec.from_dict(data, source="job")
    plan = plan_job(spec)
    return Submission(spec, plan.input_info.rows_total)
