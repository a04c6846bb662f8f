"""Admission of a submitted job: everything checked before ``201``, nothing that needs an engine.

The body is resolved (model names from the catalog, relative paths against the
service's directory, since jobs run in Ray's working directories), confined to
the service's storage roots (``storage.py``), validated as a ``JobSpec`` and
planned (``plan_job``: the input exists, the columns the template and carryover
name are there). In cluster mode the paths must also be on storage every node of
the cluster reaches (``storage.SharedStorage``), checked before the input is read.
What one service admits from one key is an ``Admission``, built from its settings.
A key that is not an admin's may name no input or output in the service's data
directory, refused before anything there is read (whether a file exists is news too).

A model block written in the job (not one of the catalog's, which are the
operator's) may set only the ``vllm.EngineArgs`` fields of the allowlist
(``SAFE_ENGINE_ARGS`` and the operator's additions) in ``model.engine.extra_args``,
and at most ``max_replicas`` engine replicas. Engine arguments reach vLLM unchanged,
and some make it import or run code the submitter names (``trust_remote_code``,
``worker_cls``, ``logits_processors``...), open paths outside the storage roots
(``tokenizer``, ``download_dir``...) or replace what the job's own fields chose
(``model``).

Every refusal is a ``JobSpecError`` or ``InputError`` whose message names the field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from llm_batch.errors import InputError, JobSpecError
from llm_batch.job.paths import absolute_paths, map_models
from llm_batch.job.spec import EngineSpec, JobSpec, ReplicaRange
from llm_batch.service.catalog import ModelCatalog
from llm_batch.service.engine_args import SAFE_ENGINE_ARGS
from llm_batch.service.storage import SharedStorage, StorageRoots, is_hub_id

if TYPE_CHECKING:
    from llm_batch.service.settings import Settings

__all__ = [
    "SAFE_ENGINE_ARGS",
    "Admission",
    "Submission",
    "check_job",
    "check_webhook",
    "parse_job_text",
    "prepare_submission",
]


@dataclasses.dataclass(frozen=True)
class Submission:
    spec: JobSpec
    rows_total: int | None  # known up front for Parquet inputs


def _is_local(path: str) -> bool:
    return "://" not in path


@dataclasses.dataclass(frozen=True)
class Admission:
    """What a service admits from one submitter (``check_job``, ``prepare_submission``).

    With ``roots``, every input, output and local model path must lie under them
    (``storage.StorageRoots``; the catalog's models are allowed wherever they are)
    and the job keeps the resolved paths. With ``shared`` (cluster mode), its input,
    output and local model paths must be object storage or under a shared folder
    (the catalog's models are the operator's: not checked). With ``accumulators``,
    custom accumulators must be among them: naming one imports it in this process.
    With ``private``, the input and output may not lie in that folder. With
    ``engine_args`` and ``max_replicas``, the model blocks written in the job (not the
    catalog's) may set only those ``extra_args`` and at most that many replicas.
    """

    catalog: ModelCatalog
    base: Path  # relative paths resolve here
    roots: StorageRoots | None = None
    shared: SharedStorage | None = None
    accumulators: Collection[str] | None = None
    private: Path | None = None
    engine_args: Collection[str] | None = None
    max_replicas: int | None = None
    own: tuple[Path, ...] = ()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        catalog: ModelCatalog,
        base: Path,
        admin: bool,
        own: Sequence[Path] = (),
        roots: Sequence[str] = (),
    ) -> Admission:
        """What a service admits from a key, through either door. A key that is not an
        admin's may not name paths in the service's data directory: other keys' outputs,
        uploads and job files live there; ``own`` are the folders in it the service itself
        placed this submission's files in (an OpenAI batch's input and outputs, the key's
        own folder); ``roots`` are storage roots granted to this key alone."""
        return cls(
            catalog=catalog,
            base=base,
            roots=StorageRoots.of([*settings.roots(), *roots]),
            shared=settings.shared_storage(),
            accumulators=settings.accumulators(),
            private=None if admin else settings.data_dir,
            engine_args=settings.engine_args(),
            max_replicas=settings.max_replicas,
            own=tuple(own),
        )


def check_job(body: Any, admission: Admission) -> JobSpec:
    """The submitted job as a ``JobSpec``, after every check that reads neither its
    input nor its model; raises ``JobSpecError``."""
    if not isinstance(body, dict):
        raise JobSpecError(
            f"request body: expected a JSON object of job fields, got {type(body).__name__}"
        )
    catalog, base, roots = admission.catalog, admission.base, admission.roots
    written = _written_models(body)
    data = catalog.resolve(body)
    if roots is not None:  # on the paths as sent, so that refusals quote them
        roots = roots.with_models(catalog.folders())
        data = roots.confine_job(data, base=str(base))
    data = absolute_paths(data, base)
    spec = JobSpec.from_dict(data, source="job")
    if admission.private is not None:
        _check_private(spec, admission.private, admission.own)
    if admission.shared is not None:
        _check_shared(spec, admission.shared, catalog)
    if admission.accumulators is not None:
        for path in spec.metrics.accumulators:
            if path not in admission.accumulators:
                allowed = ", ".join(sorted(admission.accumulators)) or "none"
                raise JobSpecError(
                    f"metrics.accumulators: {path!r} is not an accumulator this service "
                    f"allows (allowed: {allowed}; the operator lists them in "
                    "LLM_BATCH_ALLOWED_ACCUMULATORS)"
                )
    for field, model in spec.named_models():
        if field not in written:
            continue  # the catalog's: the operator chose its engine and replicas
        if admission.engine_args is not None:
            _check_engine_args(field, model.engine.extra_args, admission.engine_args)
        if admission.max_replicas is not None:
            _check_replicas(field, model.replicas, admission.max_replicas)
    return spec


def prepare_submission(body: Any, admission: Admission) -> Submission:
    """Validate and plan a submitted job (``check_job``, then its input's columns and its
    model folder); raises ``JobSpecError`` / ``InputError``."""
    from llm_batch.pipeline.run import plan_job

    spec = check_job(body, admission)
    try:
        plan = plan_job(spec)
    except (pa.ArrowException, RecursionError, UnicodeDecodeError) as e:
        # What the reader does not expect of a hostile file (a value whose type changes
        # between lines, a line nested thousands deep) is still the input's fault: 422.
        raise InputError(
            f"input.path: {spec.input.path!r} cannot be read: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    if admission.roots is not None and _is_local(spec.input.path):
        admission.roots.check_files(plan.input_info.files, field="input.path")
    if admission.shared is not None and _is_local(spec.input.path):
        admission.shared.check_files(plan.input_info.files, field="input.path")
    return Submission(spec, plan.input_info.rows_total)


def _written_models(body: dict[str, Any]) -> set[str]:
    """The fields (``model``, ``models[i]``, ``stages[i].model`` ...) of the model blocks
    the job writes itself, rather than naming one of the catalog's."""
    fields: set[str] = set()

    def note(entry: Any, field: str) -> Any:
        if isinstance(entry, dict):
            fields.add(field)
        return entry

    map_models(body, note)
    return fields


def _check_private(spec: JobSpec, private: Path, own: Sequence[Path]) -> None:
    folder = os.path.realpath(private)
    placed = [os.path.realpath(p) for p in own]
    named = [("input.path", spec.input.path)]
    if spec.output is not None:
        named.append(("output.path", spec.output.path))
    for field, path in named:
        if "://" in path and not path.startswith("file://"):
            continue
        real = os.path.realpath(path.removeprefix("file://"))
        if any(os.path.commonpath([real, p]) == p for p in placed):
            continue
        if os.path.commonpath([real, folder]) == folder:
            raise JobSpecError(
                f"{field}: {path!r} is inside the service's data directory, which holds other "
                "keys' jobs and files; name a path in another storage root (or leave "
                "output unset: the service then chooses a folder of your own)"
            )


def _refused_engine_arg(args: dict[Any, Any], allowed: Collection[str], prefix: str) -> str | None:
    """The first key of ``args`` (dotted from the top) the allowlist does not cover."""
    for key, value in args.items():
        name = f"{prefix}{key}"
        if name in allowed:
            continue
        inner = f"{name}."
        if isinstance(value, dict) and any(a.startswith(inner) for a in allowed):
            refused = _refused_engine_arg(value, allowed, inner)
            if refused is None:
                continue
            return refused
        return name
    return None


def _check_engine_args(field: str, args: dict[str, Any], allowed: Collection[str]) -> None:
    refused = _refused_engine_arg(args, allowed, "")
    if refused is None:
        return
    hint = ""
    if refused in EngineSpec.model_fields and refused != "extra_args":
        hint = f"; set {field}.engine.{refused} instead"
    raise JobSpecError(
        f"{field}.engine.extra_args.{refused}: this service does not pass {refused!r} to "
        f"vLLM from a submitted job{hint} (allowed: {', '.join(sorted(allowed))}; the "
        "service's operator can allow more with LLM_BATCH_ALLOWED_ENGINE_ARGS)"
    )


def _check_replicas(field: str, replicas: int | ReplicaRange, limit: int) -> None:
    if isinstance(replicas, int):
        wanted, where = replicas, "replicas"
    else:
        wanted, where = replicas.max, "replicas.max"
    if wanted > limit:
        raise JobSpecError(
            f"{field}.{where}: {wanted} engine replicas is more than this service allows for "
            f"one model ({limit}; the service's operator sets LLM_BATCH_MAX_REPLICAS)"
        )


def _check_shared(spec: JobSpec, shared: SharedStorage, catalog: ModelCatalog) -> None:
    shared.check(spec.input.path, field="input.path", use="read")
    if spec.output is not None:  # else the service's data directory, shared by its settings
        shared.check(spec.output.path, field="output.path", use="write")
    # Confinement to the storage roots resolved the catalog's paths too: compare resolved.
    offered = {os.path.realpath(path) for path in catalog.folders()}
    for field, model in spec.named_models():
        loaded = [(f"{field}.path", model.path)] + (
            [(f"{field}.lora", model.lora)] if model.lora else []
        )
        for at, path in loaded:
            if is_hub_id(path) and not Path(path).exists():
                continue  # engines download it
            if _is_local(path) and os.path.realpath(path) in offered:
                continue
            shared.check(path, field=at, use="load")


def check_webhook(url: str, settings: Settings) -> None:
    """A job's ``notify.url``: http(s), to a host the operator allows, on a service that
    signs its webhooks. Raises ``JobSpecError`` naming the field."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobSpecError(f"notify.url: expected an http:// or https:// URL, got {url!r}")
    allowed = settings.allowed_webhook_hosts()
    host = parts.hostname.lower()
    netloc = f"{host}:{parts.port}" if parts.port else host
    if host not in allowed and netloc not in allowed:
        raise JobSpecError(
            f"notify.url: this service does not call {netloc!r} (the hosts it calls: "
            f"{', '.join(sorted(allowed)) or 'none'}; the operator lists them in "
            "LLM_BATCH_WEBHOOK_HOSTS)"
        )
    if not settings.webhook_secret:
        raise JobSpecError(
            "notify.url: this service has no webhook secret to sign its calls with (the "
            "operator sets LLM_BATCH_WEBHOOK_SECRET)"
        )


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
