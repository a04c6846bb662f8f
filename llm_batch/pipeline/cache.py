"""The response cache: a row's generation kept across runs and jobs, keyed by what made it.

A row's key is a digest of its *namespace* (the model's identity, the engine arguments
that change outputs and the job's sampling block) and the row itself (its rendered prompt
or chat messages, its sampling overrides and sample index). Only deterministic rows have
one: greedy (temperature 0) or seeded sampling, one sample per prompt. The rendered text
stands for its tokens: the tokenizer and chat template are files of the model, part of
its identity, so equal texts are equal tokens.

The model's identity is every file of its folder by name, size, first bytes (a
safetensors file's header, which lists every tensor's name, shape and offsets) and slices
spread over the rest (``model_identity``), not a hash of gigabytes.

Layout, under the cache's root (a local folder or an object-storage URI)::

    <root>/<namespace>/_about.json           what the namespace is (for `llm-batch cache info`)
    <root>/<namespace>/b-<run>-<n>.parquet   one batch's new entries, written as it ends
    <root>/<namespace>/r-<run>-<n>.parquet   a run's entries, merged when the run ends

Entries are Parquet rows (key, the response's columns, when it was made), in row groups
of ``_ROW_GROUP`` rows. A worker keeps an index of the keys (read once, then as files
appear) and reads only the row groups its hits are in. Files are only ever added whole
(written aside, then renamed, or one object put), and a run's batch files are deleted
only after its merged file is written: a reader never sees half an entry, and an entry
lost with a crashed worker is a cache miss, never a wrong answer. Nothing but the files
of this layout is ever deleted from the root.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llm_batch.pipeline.fs import open_filesystem
from llm_batch.pipeline.generation import BatchInputs, RowResult

__all__ = [
    "CACHE_DIR_ENV",
    "CacheConfig",
    "ResponseCache",
    "clear",
    "default_root",
    "info",
    "model_identity",
    "namespace",
]

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "LLM_BATCH_CACHE_DIR"
ABOUT = "_about.json"
_ROW_GROUP = 1024
_REFRESH_S = 10.0  # how often a worker looks for files other workers added
_NAMESPACE = re.compile(r"^[0-9a-f]{32}$")
_OWN_FILE = re.compile(r"^[br]-[\w.-]+\.parquet$")
_HEADER_BYTES = 1 << 20  # the start of a file read for the model's identity
_SAMPLES, _SAMPLE_BYTES = 16, 64 << 10  # and slices of the rest: 1 MiB more per file

SCHEMA = pa.schema(
    [
        ("key", pa.binary(16)),
        ("text", pa.string()),
        ("input_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("logprobs", pa.string()),  # OpenAI's shape, as JSON
        ("latency", pa.float64()),
        ("created", pa.timestamp("s", tz="UTC")),
    ]
)


def default_root(output_uri: str) -> str:
    """Where a job's cache is when its spec names none: ``$LLM_BATCH_CACHE_DIR``; for an
    output on object storage, ``.llm-batch-cache`` beside the output folder (the same
    storage, reachable from every node); else the user's cache folder."""
    given = os.environ.get(CACHE_DIR_ENV)
    if given:
        return given
    if "://" in output_uri and not output_uri.startswith("file://"):
        parent = output_uri.rstrip("/").rsplit("/", 1)[0]
        return parent + "/.llm-batch-cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "llm_batch" / "responses")


def model_identity(path: str) -> str | None:
    """A digest of a model: each file of its folder by name, size and content, where a
    large file's content is its first bytes (a safetensors header in full) and
    ``_SAMPLES`` slices spread over the rest. Headers and sizes alone would take a
    fine-tuned checkpoint for its base (the same tensors, shapes and offsets); training
    moves weights all over a file, which the slices see. A hub id is its snapshot in the
    local Hugging Face cache. None when the files cannot be read here (a model on object
    storage, or only on other nodes): such a model has no identity to key a cache on.
    Computed again when a file's size or modification time changes (a model retrained in
    place, seen by a long-lived process), though neither is part of the identity."""
    root = _local_folder(path)
    if root is None:
        return None
    files = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        parts = file.relative_to(root).parts
        if any(part.startswith(".") for part in parts):
            continue  # .cache/, .git/: not the model
        stat = file.stat()
        files.append(("/".join(parts), stat.st_size, stat.st_mtime_ns))
    return _identity(str(root), tuple(files))


def _local_folder(path: str) -> Path | None:
    root = Path(path).expanduser()
    if root.is_dir():
        return root
    if "://" in path:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local cache, or not a hub id
        return None


@functools.lru_cache(maxsize=64)
def _identity(root: str, files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for rel, size, _ in files:
        digest.update(f"{rel}\0{size}\0".encode())
        with (Path(root) / rel).open("rb") as f:
            head = f.read(8)
            if rel.endswith(".safetensors") and len(head) == 8:
                # The header: every tensor's name, dtype, shape and offsets.
                head += f.read(min(int.from_bytes(head, "little"), _HEADER_BYTES))
            head += f.read(_HEADER_BYTES)
            digest.update(hashlib.sha256(head).digest())
            base = f.tell()
            if size > base:
                for k in range(_SAMPLES):
                    f.seek(base + k * (size - base) // _SAMPLES)
                    digest.update(hashlib.sha256(f.read(_SAMPLE_BYTES)).digest())
    return digest.hexdigest()


def namespace(model: dict[str, Any], sampling: dict[str, Any], *, device: str) -> str | None:
    """The part of every row's key a job's model and sampling make: equal namespaces give
    equal outputs for equal rows. In it: the model's identity, the device kind its engines
    run on (``gpu`` or ``cpu``: kernels differ) and the engine arguments that change
    outputs (dtype, ``max_model_len``, tensor and pipeline parallelism, every extra
    argument: quantization, ...); not those that only change speed (batch sizes, memory,
    replicas). None when the model has no identity (``model_identity``)."""
    engine = model.get("engine") or {}
    identity = model_identity(str(model["path"]))
    adapter = model_identity(str(model["lora"])) if model.get("lora") else None
    if identity is None or (model.get("lora") and adapter is None):
        return None
    parts = {
        "model": identity,
        "device": device,
        "tensor_parallel_size": engine.get("tensor_parallel_size", 1),
        "pipeline_parallel_size": engine.get("pipeline_parallel_size", 1),
        "task": model.get("task") or "generate",
        "dtype": engine.get("dtype"),
        "max_model_len": engine.get("max_model_len"),
        "extra_args": engine.get("extra_args") or {},
        "lora": adapter,  # the adapter's files, as the model's
        "sampling": {k: v for k, v in sampling.items() if k != "overrides_column"},
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """What an engine stage needs of a job's cache (plain, to pickle into workers).
    ``warm``: the namespace had entries when the job started, so its engine may never be
    needed and starts at the first miss."""

    root: str
    namespace: str
    mode: str
    run: str
    warm: bool = False

    @property
    def reads(self) -> bool:
        return self.mode in ("read_write", "read")

    @property
    def writes(self) -> bool:
        return self.mode in ("read_write", "write")


def deterministic(sampling: dict[str, Any], overrides: dict[str, Any]) -> bool:
    """Whether a row's output is fixed by its prompt: greedy or seeded, one sample."""
    if sampling.get("n", 1) != 1:
        return False
    temperature = overrides.get("temperature", sampling.get("temperature", 0.0))
    seed = overrides.get("seed", sampling.get("seed"))
    return not temperature or seed is not None


def row_keys(ns: str, inputs: BatchInputs, sampling: dict[str, Any]) -> list[bytes | None]:
    """Each row's cache key, or None: a row that failed to render, random sampling."""
    from llm_batch.pipeline.engine_args import row_overrides

    keys: list[bytes | None] = []
    for i in range(len(inputs)):
        if inputs.render_errors[i] is not None:
            keys.append(None)
            continue
        try:
            overrides = row_overrides(inputs.overrides[i])
        except (ValueError, TypeError):
            keys.append(None)  # the engine stage reports it
            continue
        if not deterministic(sampling, overrides):
            keys.append(None)
            continue
        prompt = inputs.prompts[i]
        content = (
            "p:" + prompt
            if prompt is not None
            else "m:" + json.dumps(inputs.messages[i], sort_keys=True, default=str)
        )
        digest = hashlib.blake2b(digest_size=16)
        for part in (
            ns,
            content,
            json.dumps(overrides, sort_keys=True, default=str),
            str(inputs.samples[i]),
        ):
            digest.update(part.encode())
            digest.update(b"\0")
        keys.append(digest.digest())
    return keys


class _Namespace:
    """One namespace's folder as a worker sees it: an index of its keys (file and row),
    refreshed when files are added or removed, and the row groups read lately."""

    def __init__(self, root: str, ns: str):
        self.fs, base = open_filesystem(root)
        self.dir = base.rstrip("/") + "/" + ns
        self.index: dict[bytes, tuple[str, int]] = {}
        self.groups: dict[str, list[int]] = {}  # file -> first row of each row group
        self.listed_at = -1e18
        self.read: collections.OrderedDict[tuple[str, int], pa.Table] = collections.OrderedDict()
        self.lock = threading.Lock()

    def files(self) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True))
        except OSError:
            return []
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File and _OWN_FILE.match(i.path.rsplit("/", 1)[-1])
        )

    def refresh(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.listed_at < _REFRESH_S:
            return
        files = self.files()
        self.listed_at = time.monotonic()
        if set(self.groups) - set(files):  # some were merged away: index again
            self.index.clear()
            self.groups.clear()
            self.read.clear()
        for path in files:
            if path in self.groups:
                continue
            try:
                parquet = pq.ParquetFile(path, filesystem=self.fs)
                keys = parquet.read(columns=["key"]).column("key").to_pylist()
            except (OSError, pa.ArrowException):
                continue  # gone meanwhile (merged), or not ours to read
            starts, at = [], 0
            for g in range(parquet.metadata.num_row_groups):
                starts.append(at)
                at += parquet.metadata.row_group(g).num_rows
            self.groups[path] = starts
            for row, key in enumerate(keys):
                self.index.setdefault(key, (path, row))

    def get(self, keys: list[bytes]) -> dict[bytes, dict[str, Any]]:
        """The stored entries of those of ``keys`` the cache holds."""
        where: dict[tuple[str, int], list[tuple[bytes, int]]] = collections.defaultdict(list)
        for key in keys:
            found = self.index.get(key)
            if found is None:
                continue
            path, row = found
            group = bisect.bisect_right(self.groups[path], row) - 1
            where[(path, group)].append((key, row - self.groups[path][group]))
        out: dict[bytes, dict[str, Any]] = {}
        for (path, group), wanted in where.items():
            table = self.read.get((path, group))
            if table is None:
                try:
                    table = pq.ParquetFile(path, filesystem=self.fs).read_row_group(group)
                except (OSError, pa.ArrowException):
                    self.listed_at = -1e18  # merged away meanwhile: a miss, and look again
                    continue
                self.read[(path, group)] = table
                while len(self.read) > 64:
                    self.read.popitem(last=False)
            else:
                self.read.move_to_end((path, group))
            rows = table.take(pa.array([r for _, r in wanted])).to_pylist()
            for (key, _), entry in zip(wanted, rows, strict=True):
                if entry["key"] == key:  # the file is as indexed
                    out[key] = entry
        return out


_OPEN: collections.OrderedDict[tuple[str, str], _Namespace] = collections.OrderedDict()
_OPEN_LOCK = threading.Lock()
_OPEN_KEPT = 16  # namespaces a long-lived worker keeps indexed


def _open(root: str, ns: str) -> _Namespace:
    with _OPEN_LOCK:
        found = _OPEN.get((root, ns))
        if found is None:
            found = _OPEN[(root, ns)] = _Namespace(root, ns)
            while len(_OPEN) > _OPEN_KEPT:
                _OPEN.popitem(last=False)
        else:
            _OPEN.move_to_end((root, ns))
        return found


@dataclasses.dataclass
class Lookup:
    """One batch against the cache: the rows it answered, and the rest (``misses``) for the
    engine; ``merge`` puts the engine's results for the misses back in row order."""

    keys: list[bytes | None]
    hits: dict[int, RowResult]
    misses: list[int]

    def merge(self, generated: list[RowResult]) -> list[RowResult]:
        out: list[RowResult | None] = [self.hits.get(i) for i in range(len(self.keys))]
        for i, result in zip(self.misses, generated, strict=True):
            out[i] = result
        assert all(r is not None for r in out)
        return out  # type: ignore[return-value]


class ResponseCache:
    """A job's side of the cache, in an engine stage (one per worker and job)."""

    def __init__(self, config: CacheConfig, sampling: dict[str, Any]):
        self.config = config
        self.sampling = sampling
        self._store = _open(config.root, config.namespace)
        # A worker serves job after job (the service's): each run looks at the folder
        # afresh once, for what runs since its last look stored.
        self._looked = False

    def lookup(self, inputs: BatchInputs) -> Lookup:
        keys = row_keys(self.config.namespace, inputs, self.sampling)
        hits: dict[int, RowResult] = {}
        wanted = [k for k in keys if k is not None]
        if self.config.reads and wanted:
            store = self._store
            with store.lock:
                store.refresh(force=not self._looked)
                self._looked = True
                found = store.get(wanted)
            for i, key in enumerate(keys):
                entry = found.get(key) if key is not None else None
                if entry is not None:
                    hits[i] = _result(entry)
        misses = [i for i in range(len(keys)) if i not in hits]
        return Lookup(keys=keys, hits=hits, misses=misses)

    def store(self, lookup: Lookup, results: list[RowResult]) -> None:
        """Keep the new deterministic results of a batch (not errors, not aborted ones)."""
        if not self.config.writes:
            return
        rows: dict[bytes, RowResult] = {}
        for i in lookup.misses:
            key, result = lookup.keys[i], results[i]
            if key is None or result.error is not None or result.finish_reason == "abort":
                continue
            if result.text is None:
                continue  # a pooling model's output is not cached
            if result.deduplicated or key in self._store.index:
                continue  # stored by the batch of the row it copied, or before
            rows.setdefault(key, result)
        if not rows:
            return
        now = int(time.time())
        table = pa.table(
            {
                "key": list(rows),
                "text": [r.text for r in rows.values()],
                "input_tokens": [r.input_tokens for r in rows.values()],
                "output_tokens": [r.output_tokens for r in rows.values()],
                "finish_reason": [r.finish_reason for r in rows.values()],
                "logprobs": [
                    None if r.logprobs is None else json.dumps(r.logprobs) for r in rows.values()
                ],
                "latency": [r.latency for r in rows.values()],
                "created": [now] * len(rows),
            },
            schema=SCHEMA,
        )
        store = self._store
        try:
            _put(store, f"b-{self.config.run}-{uuid.uuid4().hex[:12]}.parquet", table)
        except OSError as e:  # the cache is an aid: a job never fails for it
            logger.warning("response cache %s: not written (%s)", store.dir, e)


def _result(entry: dict[str, Any]) -> RowResult:
    logprobs = entry.get("logprobs")
    return RowResult(
        text=entry["text"],
        input_tokens=entry["input_tokens"],
        output_tokens=entry["output_tokens"],
        finish_reason=entry["finish_reason"],
        logprobs=None if logprobs is None else json.loads(logprobs),
        latency=entry["latency"],
        cached=True,
    )


def _put(store: _Namespace, name: str, table: pa.Table) -> None:
    """Write a whole file: aside then renamed on a local disk, one object on a store."""
    path = store.dir + "/" + name
    store.fs.create_dir(store.dir, recursive=True)
    if isinstance(store.fs, pafs.LocalFileSystem):
        tmp = store.dir + "/." + name + ".tmp"
        pq.write_table(table, tmp, filesystem=store.fs, row_group_size=_ROW_GROUP)
        store.fs.move(tmp, path)
    else:
        pq.write_table(table, path, filesystem=store.fs, row_group_size=_ROW_GROUP)


def describe(config: CacheConfig, model: dict[str, Any], sampling: dict[str, Any]) -> None:
    """Write the namespace's ``_about.json`` (which model, engine and sampling) if missing."""
    store = _open(config.root, config.namespace)
    path = store.dir + "/" + ABOUT
    try:
        if store.fs.get_file_info(path).type == pafs.FileType.File:
            return
        store.fs.create_dir(store.dir, recursive=True)
        about = {
            "namespace": config.namespace,
            "model": model.get("path"),
            "engine": model.get("engine"),
            "sampling": sampling,
            "created": int(time.time()),
        }
        with store.fs.open_output_stream(path) as f:
            f.write(json.dumps(about, indent=1, default=str).encode())
    except OSError as e:
        logger.warning("response cache %s: %s", store.dir, e)


def is_warm(root: str, ns: str) -> bool:
    """Whether the namespace holds any entry (a job may then need no engine at all)."""
    return bool(_open(root, ns).files())


def merge_run(config: CacheConfig) -> None:
    """Merge a run's batch files into one (fewer files to index), then delete them."""
    if not config.writes:
        return
    store = _open(config.root, config.namespace)
    mine = [p for p in store.files() if p.rsplit("/", 1)[-1].startswith(f"b-{config.run}-")]
    if len(mine) < 2:
        return
    try:
        tables = [pq.read_table(p, filesystem=store.fs, schema=SCHEMA) for p in mine]
        table = pa.concat_tables(tables)
        # Two batches in flight at once may both have stored a key: keep it once.
        seen: set[bytes] = set()
        first: list[int] = []
        for i, key in enumerate(table.column("key").to_pylist()):
            if key not in seen:
                seen.add(key)
                first.append(i)
        if len(first) < table.num_rows:
            table = table.take(pa.array(first, pa.int64()))
        _put(store, f"r-{config.run}-{uuid.uuid4().hex[:12]}.parquet", table)
        for p in mine:
            store.fs.delete_file(p)
    except Exception as e:  # noqa: BLE001 - the cache is an aid: the job has succeeded
        logger.warning("response cache %s: batch files not merged (%s)", store.dir, e)


def info(root: str) -> list[dict[str, Any]]:
    """Each namespace of a cache: its model, entries, files, bytes, oldest and newest."""
    fs, base = open_filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return []
    out = []
    for d in sorted(infos, key=lambda i: i.path):
        name = d.path.rstrip("/").rsplit("/", 1)[-1]
        if d.type != pafs.FileType.Directory or not _NAMESPACE.match(name):
            continue
        store = _Namespace(root, name)
        files = store.files()
        entries = size = 0
        times: list[float] = []
        for path in files:
            with contextlib.suppress(OSError, pa.ArrowException):
                entries += pq.ParquetFile(path, filesystem=fs).metadata.num_rows
                file_info = fs.get_file_info(path)
                size += file_info.size or 0
                if file_info.mtime is not None:
                    times.append(file_info.mtime.timestamp())
        about: dict[str, Any] = {}
        with (
            contextlib.suppress(OSError, ValueError),
            fs.open_input_stream(store.dir + "/" + ABOUT) as f,
        ):
            about = json.loads(f.read())
        out.append(
            {
                "namespace": name,
                "model": about.get("model"),
                "entries": entries,
                "files": len(files),
                "bytes": size,
                "oldest": min(times) if times else None,
                "newest": max(times) if times else None,
            }
        )
    return out


def clear(root: str, *, older_than: float | None = None) -> dict[str, int]:
    """Delete the cache's files (only files of its own layout), or those last written more
    than ``older_than`` seconds ago; a namespace left empty goes too."""
    fs, base = open_filesystem(root)
    cutoff = None if older_than is None else time.time() - older_than
    removed = {"files": 0, "entries": 0, "bytes": 0}
    for ns in info(root):
        store = _Namespace(root, ns["namespace"])
        files = store.files()
        for path in files:
            file_info = fs.get_file_info(path)
            mtime = file_info.mtime.timestamp() if file_info.mtime is not None else 0.0
            if cutoff is not None and mtime >= cutoff:
                continue
            with contextlib.suppress(OSError, pa.ArrowException):
                removed["entries"] += pq.ParquetFile(path, filesystem=fs).metadata.num_rows
            fs.delete_file(path)
            removed["files"] += 1
            removed["bytes"] += file_info.size or 0
        if not store.files():
            about = store.dir + "/" + ABOUT
            with contextlib.suppress(OSError):
                if fs.get_file_info(about).type == pafs.FileType.File:
                    fs.delete_file(about)
                left = fs.get_file_info(pafs.FileSelector(store.dir, allow_not_found=True))
                if not left:
                    fs.delete_dir(store.dir)
    return removed
