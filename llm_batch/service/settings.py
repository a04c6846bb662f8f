"""The service's settings: one pydantic-settings class, ``LLM_BATCH_`` environment variables.

Command-line flags of ``llm-batch serve`` are passed as keyword arguments and
win over the environment.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from llm_batch.service.storage import SharedStorage

__all__ = ["KeyGrant", "Settings"]


@dataclasses.dataclass(frozen=True)
class KeyGrant:
    """What one API key may do: see every key's jobs and files (``admin``), and read and
    write under ``roots`` besides the storage roots every key has."""

    admin: bool = False
    roots: tuple[str, ...] = ()

    def merge(self, *, admin: bool = False, roots: tuple[str, ...] = ()) -> KeyGrant:
        return KeyGrant(admin=self.admin or admin, roots=(*self.roots, *roots))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLM_BATCH_", extra="ignore", validate_by_name=True, frozen=True
    )

    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the HTTP server binds.")
    data_dir: Path = Field(
        default=Path("data"),
        description="Holds the SQLite database, each job's spec file and default outputs.",
    )
    db: str | None = Field(
        default=None,
        description="SQLAlchemy database URL (sqlite:///..., postgresql+psycopg://...); "
        "default: a SQLite file <data_dir>/llm_batch.db.",
    )
    models: Path | None = Field(
        default=None,
        description="YAML file mapping model names to `model:` blocks of the job format; "
        "a job may then say `model: <name>`.",
    )
    max_running_jobs: int = Field(
        default=8,
        ge=1,
        description="Jobs running at once; their requests meet in the shared engine pools.",
    )
    shared_engines: bool = Field(
        default=True,
        description="Run jobs on engine pools the service keeps warm and shares between jobs "
        "(Ray Serve); off: every job starts engines of its own, as `llm-batch run` does.",
    )
    engine_idle_seconds: float = Field(
        default=600.0,
        ge=0,
        description="An engine pool no job has used for this long is released (its GPUs "
        "freed); catalog models with `warm: true` are kept.",
    )
    small_job_rows: int = Field(
        default=500,
        ge=0,
        description="Jobs of at most this many rows (or, when the count is unknown before "
        "reading, JSONL/CSV inputs of at most small_job_bytes) run in the service's "
        "long-lived driver, paying no driver start of their own.",
    )
    small_job_bytes: int = Field(default=256 << 10, ge=0, description="See small_job_rows.")
    host_parallel_jobs: int = Field(
        default=2,
        ge=1,
        description="Small jobs the long-lived driver runs at once; more wait their turn, "
        "which on a small machine ends a burst of them sooner than running all together.",
    )
    api_keys: str | None = Field(
        default=None,
        description="Comma-separated API keys; when set (or api_keys_file), every route but "
        "/healthz needs `Authorization: Bearer <key>`.",
    )
    admin_api_keys: str | None = Field(
        default=None, description="Comma-separated API keys that see every key's jobs and files."
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A file of API keys, one per line; `<key> admin` marks an admin key; "
        "`#` starts a comment.",
    )
    retention_days: float | None = Field(
        default=None,
        gt=0,
        description="Days a job's service-placed output (no output.path) is kept after the "
        "job ends, unless the job says output.retain_days; unset: kept until deleted.",
    )
    retention_sweep_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between two passes of the sweep that deletes expired outputs "
        "and files and expires batches past their completion window.",
    )
    min_expires_after_seconds: int = Field(
        default=3600,
        ge=1,
        description="The least expires_after.seconds a file upload may ask (OpenAI's: 3600).",
    )
    completion_window_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Overrides every batch's completion_window (24h) in seconds; for tests.",
    )
    webhook_url: str | None = Field(
        default=None,
        description="Every job's and batch's end is POSTed here (job.succeeded, job.failed, "
        "job.cancelled, batch.completed, batch.failed, batch.cancelled, batch.expired), "
        "signed with webhook_secret (Standard Webhooks).",
    )
    webhook_secret: str | None = Field(
        default=None,
        description="The HMAC-SHA256 key of webhook signatures: `whsec_<base64>` as OpenAI "
        "and Standard Webhooks write it, or any other text used as it is. Required for "
        "webhooks.",
    )
    webhook_hosts: str | None = Field(
        default=None,
        description="Comma-separated host names (or host:port) a job's notify.url may "
        "name; unset: jobs may not ask for webhooks (webhook_url is the operator's and is "
        "not limited).",
    )
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LLM_BATCH_RAY_ADDRESS", "RAY_ADDRESS"),
        description="An existing Ray cluster (dashboard URL http://head:8265, ray://head:10001 "
        "or head:6379); unset: the service starts a local Ray head itself. Set, the service "
        "is in cluster mode: jobs' paths must be on storage every node reaches "
        "(shared_roots).",
    )
    ray_port: int = Field(default=6379, description="Local Ray head: GCS port.")
    ray_dashboard_port: int = Field(
        default=8265, description="Local Ray head: dashboard and Jobs API port."
    )
    ray_client_server_port: int = Field(default=10001, description="Local Ray head: client port.")
    ray_dashboard_agent_port: int = Field(
        default=52365, description="Local Ray head: dashboard agent HTTP port."
    )
    ray_num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="Logical CPUs of the local Ray head; default max(4, cores), because each "
        "CPU engine actor holds one for its life and reading/writing need more beside them.",
    )
    stop_ray_on_exit: bool = Field(
        default=True,
        description="On a clean shutdown, stop the local Ray head this service runs when no "
        "job is running on it (running jobs keep going and are followed again after a restart).",
    )
    poll_interval: float = Field(
        default=0.5, gt=0, description="Seconds between two scheduler passes."
    )
    progress_interval: float = Field(
        default=1.0, ge=0, description="Least seconds between two progress writes of one job."
    )
    metrics_finished_window: float = Field(
        default=900.0,
        ge=0,
        description="Seconds an ended job's own series stay in /metrics (running jobs always "
        "do); keeps the label cardinality to running and recently ended jobs.",
    )
    storage_roots: str | None = Field(
        default=None,
        description="Comma-separated local folders and URI prefixes (s3://bucket/prefix) "
        "that submitted jobs may read from and write to, besides the data directory (always "
        "allowed); any other input, output or local model path is refused with 422.",
    )
    shared_roots: str | None = Field(
        default=None,
        description="Comma-separated local folders every node of the Ray cluster mounts at "
        "the same path (NFS, a ReadWriteMany volume). In cluster mode (ray_address set) a "
        "job's input, output and local model paths must be object storage URIs (s3://, "
        "gs://, abfs://...) or lie under one of these, else the job is refused with 422; "
        "and the data directory must lie under one (the drivers read job specs there), "
        "else the service does not start. `/` declares everything shared (a cluster on "
        "one machine).",
    )
    allowed_accumulators: str | None = Field(
        default=None,
        description="Comma-separated import paths (package.module:Class) of custom "
        "accumulators that submitted jobs may name; others are refused before anything "
        "is imported.",
    )
    allowed_engine_args: str | None = Field(
        default=None,
        description="Comma-separated vllm.EngineArgs fields that submitted jobs may set in "
        "model.engine.extra_args, besides the tuning fields allowed by default "
        "(llm_batch.service.engine_args.SAFE_ENGINE_ARGS); `field.key` allows one key of "
        "a mapping-valued field. Any other is refused with 422: some fields make vLLM "
        "import or run code the job names (trust_remote_code, worker_cls, "
        "logits_processors...) or open paths outside the storage roots (tokenizer, "
        "download_dir...). Model blocks of the models file are not checked.",
    )
    max_replicas: int = Field(
        default=64,
        ge=1,
        description="Most engine replicas one model of a submitted job may ask for "
        "(`replicas`, or `replicas.max`); more is refused with 422. Model blocks of the "
        "models file are not checked.",
    )
    max_request_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body (uploads to /v1/files aside: max_upload_bytes); "
        "a larger one is answered with 413 as soon as the limit is passed.",
    )
    max_json_depth: int = Field(
        default=64,
        ge=2,
        description="Deepest nesting of arrays and objects in a JSON request body; deeper "
        "is answered with 422 before it is parsed.",
    )
    max_upload_bytes: int = Field(
        default=200 * 1024 * 1024,
        ge=1,
        description="Largest file `POST /v1/files` takes (OpenAI's batch limit: 200 MiB); "
        "a larger upload is cut off while it streams in and answered with 413.",
    )
    max_batch_requests: int = Field(
        default=50_000, ge=1, description="Most requests (lines) in one batch input file."
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        # Jobs run in Ray's working directories, not the service's: every path
        # handed to them must be absolute.
        return v.expanduser().resolve()

    @field_validator("models")
    @classmethod
    def _absolute_models(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser().resolve()

    @field_validator("storage_roots")
    @classmethod
    def _normalized_roots(cls, v: str | None) -> str | None:
        # Relative folders are taken from the directory the service starts in, now,
        # like data_dir; a bad entry stops the start with its name.
        from llm_batch.service.storage import parse_roots

        return ",".join(parse_roots(v)) or None

    @field_validator("allowed_engine_args")
    @classmethod
    def _engine_arg_names(cls, v: str | None) -> str | None:
        names = [n.strip() for n in (v or "").split(",") if n.strip()]
        for name in names:
            if not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"{name!r} is not a vllm.EngineArgs field name (or field.key)")
        return ",".join(names) or None

    @field_validator("shared_roots")
    @classmethod
    def _normalized_shared_roots(cls, v: str | None) -> str | None:
        # Resolved here, at start, like data_dir: what the service checks against later.
        from llm_batch.service.storage import parse_local_roots

        return ",".join(parse_local_roots(v)) or None

    @property
    def cluster_mode(self) -> bool:
        """Jobs run on a Ray cluster named by address, whose nodes may be other machines
        (rather than on the local head this service starts itself)."""
        return bool(self.ray_address)

    def shared_storage(self) -> SharedStorage | None:
        """In cluster mode, where a job's paths must be; None when jobs run on this machine."""
        from llm_batch.service.storage import SharedStorage

        if not self.cluster_mode:
            return None
        # Resolved once, when the settings were read (_normalized_shared_roots).
        folders = tuple(self.shared_roots.split(",")) if self.shared_roots else ()
        return SharedStorage(folders, cluster=str(self.ray_address))

    def check_cluster_storage(self) -> None:
        """Raises ``SettingsError`` when, in cluster mode, the data directory is not on a
        shared folder: the cluster's job drivers read each job's spec from it, and jobs
        without an output path and OpenAI batches (their inputs and outputs) live in it."""
        shared = self.shared_storage()
        if shared is None or shared.covers(str(self.data_dir)):
            return
        from llm_batch.service.errors import SettingsError

        raise SettingsError(
            f"LLM_BATCH_DATA_DIR {str(self.data_dir)!r} is not under a folder of "
            f"LLM_BATCH_SHARED_ROOTS ({', '.join(shared.folders) or 'unset'}), but jobs run "
            f"on the Ray cluster at {self.ray_address}, whose job drivers read each job's "
            "spec from the data directory and write the default outputs and OpenAI batches "
            "there: mount it at the same path on every Ray node and list it (or a folder "
            "above it) in LLM_BATCH_SHARED_ROOTS, or unset RAY_ADDRESS to run jobs on a "
            "local Ray head"
        )

    def check_webhooks(self) -> None:
        """Raises ``SettingsError`` for webhooks that could not be signed."""
        if self.webhook_url and not self.webhook_secret:
            from llm_batch.service.errors import SettingsError

            raise SettingsError(
                "LLM_BATCH_WEBHOOK_URL is set but LLM_BATCH_WEBHOOK_SECRET is not: webhooks "
                "are signed; set a secret (whsec_<base64>, or any long random text)"
            )

    def roots(self) -> list[str]:
        """Where submitted jobs may read and write: the data directory, then storage_roots."""
        from llm_batch.service.storage import parse_roots

        return [str(self.data_dir), *parse_roots(self.storage_roots)]

    def accumulators(self) -> set[str]:
        """The custom accumulators submitted jobs may name."""
        return {a.strip() for a in (self.allowed_accumulators or "").split(",") if a.strip()}

    def engine_args(self) -> frozenset[str]:
        """The ``vllm.EngineArgs`` fields submitted jobs may set in ``engine.extra_args``."""
        from llm_batch.service.engine_args import SAFE_ENGINE_ARGS

        extra = (self.allowed_engine_args or "").split(",")
        return SAFE_ENGINE_ARGS | {name for name in extra if name}

    def keys(self) -> dict[str, KeyGrant]:
        """Configured API keys → what each may do (empty: no authentication).

        The keys file has one key per line: ``<key> [admin] [roots=/srv/a,s3://b/a]``;
        ``roots=`` grants that key storage roots besides ``storage_roots`` (everyone's).
        """
        keys: dict[str, KeyGrant] = {}
        for raw, admin in ((self.api_keys, False), (self.admin_api_keys, True)):
            for key in (raw or "").split(","):
                if key.strip():
                    keys[key.strip()] = keys.get(key.strip(), KeyGrant()).merge(admin=admin)
        if self.api_keys_file is not None:
            text = self.api_keys_file.read_text(encoding="utf-8")
            for number, line in enumerate(text.splitlines(), start=1):
                parts = line.split("#", 1)[0].split()
                if not parts:
                    continue
                grant = keys.get(parts[0], KeyGrant())
                for word in parts[1:]:
                    if word == "admin":
                        grant = grant.merge(admin=True)
                    elif word.startswith("roots="):
                        from llm_batch.service.storage import parse_roots

                        grant = grant.merge(roots=tuple(parse_roots(word.removeprefix("roots="))))
                    else:
                        from llm_batch.service.errors import SettingsError

                        raise SettingsError(
                            f"{self.api_keys_file}:{number}: unknown word {word!r} after the "
                            "key; expected `admin` or `roots=<folder or URI>,...`"
                        )
                keys[parts[0]] = grant
        return keys

    def allowed_webhook_hosts(self) -> set[str]:
        return {h.strip().lower() for h in (self.webhook_hosts or "").split(",") if h.strip()}

    def home(self, owner: str | None) -> Path:
        """A key's own folder of the data directory: its uploads (``files/``), its jobs'
        default outputs (``outputs/``) and its batches (``batches/``). Without keys
        (``owner`` None) the data directory itself."""
        return self.data_dir if owner is None else self.data_dir / "keys" / owner

    @property
    def database_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir / 'llm_batch.db'}"

    @property
    def num_cpus(self) -> int:
        return self.ray_num_cpus or max(4, os.cpu_count() or 1)

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    def outputs_dir(self, owner: str | None = None) -> Path:
        """Jobs without ``output.path`` write to ``<this>/<job id>``."""
        return self.home(owner) / "outputs"

    def cache_dir(self, owner: str | None = None) -> Path:
        """The key's response cache (``pipeline/cache.py``): its jobs' stored responses."""
        return self.home(owner) / "cache"

    def files_dir(self, owner: str | None = None) -> Path:
        """The bytes of the Files API's files, one file per id."""
        return self.home(owner) / "files"

    def file_path(self, owner: str | None, file_id: str) -> Path:
        """Where a stored file's bytes are: the key's ``files/``, or the data directory's
        own ``files/`` for a file stored before keys had folders."""
        path = self.files_dir(owner) / file_id
        legacy = self.files_dir(None) / file_id
        return legacy if owner is not None and not path.exists() and legacy.exists() else path

    def batches_dir(self, owner: str | None = None) -> Path:
        """Each batch's converted input (Parquet) and outputs, one folder per batch."""
        return self.home(owner) / "batches"
