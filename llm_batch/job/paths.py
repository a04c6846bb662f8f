"""A job's local paths, made absolute where the job is written, before it runs elsewhere.

A job file says ``input.path: prompts/examples/reviews.parquet``, relative to where it
is submitted from; its driver runs in Ray's working directory or on another machine.
The CLI (``run --address``, ``submit``) and the service make them absolute first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_batch.errors import JobSpecError

__all__ = ["absolute_paths", "load_job_mapping", "map_models"]


def _is_local(path: str) -> bool:
    return "://" not in path


def map_models(data: dict[str, Any], fix: Callable[[Any, str], Any]) -> dict[str, Any]:
    """A copy of a raw job mapping with ``fix(entry, field)`` applied to each model entry
    (a block, or a catalog model's name) wherever a job names one: ``model``,
    ``models[i]``, ``stages[i].model``, ``stages[i].models[j]``."""

    def scope(block: dict[str, Any], at: str) -> dict[str, Any]:
        out = dict(block)
        if out.get("model") is not None:
            out["model"] = fix(out["model"], f"{at}model")
        if isinstance(out.get("models"), list):
            out["models"] = [fix(m, f"{at}models[{i}]") for i, m in enumerate(out["models"])]
        return out

    out = scope(data, "")
    if isinstance(out.get("stages"), list):
        out["stages"] = [
            scope(s, f"stages[{i}].") if isinstance(s, dict) else s
            for i, s in enumerate(out["stages"])
        ]
    return out


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

    def fix_model(block: Any, _: str) -> Any:
        block = fix(block, must_exist=True)
        if isinstance(block, dict) and isinstance(block.get("lora"), str):
            block = {**block, "lora": fix({"path": block["lora"]}, must_exist=True)["path"]}
        return block

    out = map_models(out, fix_model)
    return {k: v for k, v in out.items() if k in data}


def load_job_mapping(path: str | Path) -> dict[str, Any]:
    """A job file (YAML or JSON) as a mapping, its relative local paths made absolute
    against the current directory; raises ``JobSpecError`` naming the file."""
    import yaml

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
    if not isinstance(data, dict):
        raise JobSpecError(f"job file {str(p)!r}: expected a mapping of job fields")
    return absolute_paths(data, Path.cwd())
