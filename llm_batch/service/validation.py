"""Admission of a submitted job: everything checked before ``201``, nothing that needs an engine.

The body is resolved (model names from the catalog, relative paths against the
service's directory, since jobs run in Ray's working directories), confined to
the service's storage roots (``storage.py``), validated as a ``JobSpec`` and
planned (``plan_job``: the input exists, the columns the template and carryover
name are there). In cluster mode the paths must also be on storage every node of
the cluster reaches (``storage.SharedStorage``), checked before the input is read.
Every refusal is a ``JobSpecError`` or
``InputError`` whose message names the field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pyarrow as pa

from llm_batch.errors import InputError, JobSpecError
from llm_batch.job.spec import JobSpec
from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.storage import SharedStorage, StorageRoots, is_hub_id

__all__ = ["Submission", "absolute_paths", "parse_job_text", "prepare_submission"]


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


def prepare_submission(
    body: Any,
    *,
    catalog: ModelCatalog,
    base: Path,
    roots: StorageRoots | None = None,
    shared: SharedStorage | None = None,
    accumulators: Collection[str] | None = None,
) -> Submission:
    """Validate and plan a submitted job; raises ``JobSpecError`` / ``InputError``.

    With ``roots``, every input, output and local model path must lie under them
    (``storage.StorageRoots``; the catalog's models are allowed wherever they are)
    and the job keeps the resolved paths. With ``shared`` (cluster mode), its input,
    output and local model paths must be object storage or under a shared folder
    (the catalog's models are the operator's: not checked). With ``accumulators``,
    custom accumulators must be among them: naming one imports it in this process.
    """
    from llm_batch.pipeline.run import plan_job

    if not isinstance(body, dict):
        raise JobSpecError(
            f"request body: expected a JSON object of job fields, got {type(body).__name__}"
        )
    data = catalog.resolve(body)
    if roots is not None:  # on the paths as sent, so that refusals quote them
        offered = [catalog.block(name, field="model").get("path", "") for name in catalog.names]
        roots = roots.with_models(offered)
        data = roots.confine_job(data, base=str(base))
    data = absolute_paths(data, base)
    spec = JobSpec.from_dict(data, source="job")
    if shared is not None:
        _check_shared(spec, shared, catalog)
    if accumulators is not None:
        for path in spec.metrics.accumulators:
            if path not in accumulators:
                allowed = ", ".join(sorted(accumulators)) or "none"
                raise JobSpecError(
                    f"metrics.accumulators: {path!r} is not an accumulator this service "
                    f"allows (allowed: {allowed}; the operator lists them in "
                    "LLM_BATCH_ALLOWED_ACCUMULATORS)"
                )
    try:
        plan = plan_job(spec)
    except (pa.ArrowException, RecursionError, UnicodeDecodeError) as e:
        # What the reader does not expect of a hostile file (a value whose type changes
        # between lines, a line nested thousands deep) is still the input's fault: 422.
        raise InputError(
            f"input.path: {spec.input.path!r} cannot be read: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    if roots is not None and _is_local(spec.input.path):
        roots.check_files(plan.input_info.files, field="input.path")
    if shared is not None and _is_local(spec.input.path):
        shared.check_files(plan.input_info.files, field="input.path")
    return Submission(spec, plan.input_info.rows_total)


def _check_shared(spec: JobSpec, shared: SharedStorage, catalog: ModelCatalog) -> None:
    shared.check(spec.input.path, field="input.path", use="read")
    if spec.output is not None:  # else the service's data directory, shared by its settings
        shared.check(spec.output.path, field="output.path", use="write")
    # Confinement to the storage roots resolved the catalog's paths too: compare resolved.
    offered = {
        os.path.realpath(str(catalog.block(name, field="model").get("path", "")))
        for name in catalog.names
    }
    for field, model in spec.named_models():
        if is_hub_id(model.path) and not Path(model.path).exists():
            continue  # engines download it
        if _is_local(model.path) and os.path.realpath(model.path) in offered:
            continue
        shared.check(model.path, field=f"{field}.path", use="load")


def parse_job_text(raw: bytes, *, max_depth: int) -> Any:
    """A job file's text (YAML, or JSON, which is YAML too) as submitted in a request body.

    Safe YAML without anchors and aliases (a few bytes of aliases can stand for billions
    of nodes) and nested at most ``max_depth`` levels, like a JSON body.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise JobSpecError("request body: YAML aliases (*name) are not accepted")
            self.depth += 1
            if self.depth > max_depth:
                raise JobSpecError(
                    f"request body: the job nests deeper than {max_depth} levels (max_json_depth)"
                )
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobSpecError(f"request body is not UTF-8 text: {e.reason}") from None
    loader = Loader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise JobSpecError(f"request body is not valid YAML or JSON: {e}") from None
    finally:
        loader.dispose()
