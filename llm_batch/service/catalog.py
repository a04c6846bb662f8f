"""The models a service offers by name (``llm-batch serve --models FILE``).

The file maps a name to a ``model:`` block of the job format::

    reviews-tiny:
      path: models/reviews-tiny        # relative to this file
      engine: {max_model_len: 512, dtype: bfloat16}

A submitted job may then say ``model: reviews-tiny``, or list the name among
``models:`` (it becomes that entry's column prefix). ``warm: true`` in a block (not
part of the job format) asks the service to start that model's engine pool with the
service and keep it up, not only while jobs use it. ``adapters:`` (not part of the job
format either) lists LoRA adapters of the model, each offered by its own name::

    reviews-tiny:
      path: models/reviews-tiny
      adapters: {reviews-fr: adapters/fr, reviews-de: adapters/de}

``model: reviews-fr`` is then the base model's block with ``lora: adapters/fr``; jobs
(and OpenAI batches) of a model's adapters share one engine pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llm_batch.errors import JobSpecError
from llm_batch.job.paths import map_models
from llm_batch.job.spec import ModelSpec, format_validation_error

__all__ = ["ModelCatalog"]


class ModelCatalog:
    def __init__(
        self, models: dict[str, dict[str, Any]] | None = None, *, warm: list[str] | None = None
    ):
        self._models = dict(models or {})
        self.warm = list(warm or [])

    @classmethod
    def from_file(cls, path: str | Path | None) -> ModelCatalog:
        if path is None:
            return cls()
        p = Path(path)
        source = f"models file {str(p)!r}"
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobSpecError(f"{source} does not exist") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise JobSpecError(f"{source} cannot be read: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise JobSpecError(f"{source}: expected a mapping of model names to model blocks")
        models = {}
        warm = []
        for name, block in data.items():
            if not isinstance(block, dict):
                raise JobSpecError(f"{source}: {name}: expected a model block (path, engine, ...)")
            block = dict(block)
            keep_warm = block.pop("warm", False)
            if not isinstance(keep_warm, bool):
                raise JobSpecError(f"{source}: {name}.warm: expected true or false")
            if keep_warm:
                warm.append(name)
            adapters = block.pop("adapters", None) or {}
            if not isinstance(adapters, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in adapters.items()
            ):
                raise JobSpecError(
                    f"{source}: {name}.adapters: expected a mapping of names to folders"
                )
            block["path"] = _near(p, block.get("path"))
            try:
                ModelSpec.model_validate(block)
            except ValidationError as e:
                raise JobSpecError(format_validation_error(e, source=f"{source}: {name}")) from None
            models[name] = block
            for adapter, folder in adapters.items():
                if adapter in data or adapter in models:
                    raise JobSpecError(
                        f"{source}: {name}.adapters.{adapter}: the name is taken by another model"
                    )
                models[adapter] = {**block, "lora": _near(p, folder)}
        return cls(models, warm=warm)

    @property
    def names(self) -> list[str]:
        """Every name offered: the models and their adapters."""
        return sorted(self._models)

    def folders(self) -> list[str]:
        """The model and adapter folders (or hub ids) the catalog names: the operator's,
        loadable wherever they are."""
        blocks = self._models.values()
        return [str(b[k]) for b in blocks for k in ("path", "lora") if b.get(k)]

    def block(self, name: str, *, field: str) -> dict[str, Any]:
        if name not in self._models:
            offered = ", ".join(self.names) or "none: start the service with --models FILE"
            raise JobSpecError(
                f"{field}: {name!r} is not a model this service offers (offered: {offered})"
            )
        return dict(self._models[name])

    def resolve(self, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` with every model given by name replaced by its block (an entry of a
        ``models`` list keeps the name as its own)."""

        def block(entry: Any, field: str) -> Any:
            if not isinstance(entry, str):
                return entry
            found = self.block(entry, field=field)
            return {"name": entry, **found} if field.endswith("]") else found

        return map_models(data, block)


def _near(models_file: Path, path: Any) -> Any:
    """A path of the models file: relative to the file when it names something there."""
    if not isinstance(path, str) or not path or Path(path).is_absolute():
        return path
    local = models_file.parent / path
    return str(local.resolve()) if local.exists() else path
