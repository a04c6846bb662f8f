"""Where a job submitted over the network may read and write: the service's storage roots.

A job names paths that the service's Ray workers then open with the service's
rights: its input, its output folder (where a resumed job also deletes part
files), and a local model folder. The service takes them only under its storage
roots: its data directory, always, and the folders and URI prefixes of
``LLM_BATCH_STORAGE_ROOTS`` (``/srv/datasets,s3://bucket/prefix``).

- A local path is resolved first (``~``, ``..`` and every symlink:
  ``os.path.realpath``) and compared with the roots component by component; the
  job keeps the resolved path, so what was checked is what is opened. The files
  of an input folder are checked one by one after listing (a symlink inside a
  root can point out of it).
- A ``file://`` URI is a local path like any other.
- Any other URI must start with a URI root: same scheme, same bucket or host,
  and the root's prefix as whole path segments. A URI with a query or fragment
  is refused (pyarrow takes filesystem options such as ``endpoint_override``
  from the query), and so is one with ``.`` or ``..`` segments. Schemes that no
  root names (``hdfs://``, ``http://``, ``mock://``...) are refused.
- A model path that reads as a Hugging Face hub id (``org/name``) is not a path
  and is not checked; models offered by the service's catalog (``--models``)
  are the operator's choice and are allowed wherever they live.

In cluster mode (the service's ``RAY_ADDRESS`` names a Ray cluster) a job's paths
must also be where every node of that cluster can reach them (``SharedStorage``):
a URI of any scheme but ``file://`` (object storage: ``s3://``, ``gs://``,
``abfs://``...), or a local path under one of ``LLM_BATCH_SHARED_ROOTS``, the
folders the operator declares mounted at the same path on every node. A path on
the service's own disk would be opened by a driver or an engine on another machine,
which finds nothing there (or writes where nobody reads).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from llm_batch.errors import JobSpecError
from llm_batch.job.paths import map_models

__all__ = ["SharedStorage", "StorageRoots", "is_hub_id", "parse_local_roots", "parse_roots"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Hugging Face repo ids: `name` or `namespace/name`, word characters, dots and dashes.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _scheme(path: str) -> str | None:
    match = _SCHEME.match(path)
    return match.group(1).lower() if match else None


def is_hub_id(path: str) -> bool:
    """Whether a model path reads as a hub id rather than a local path."""
    return bool(_HUB_ID.match(path)) and ".." not in path and not os.path.isabs(path)


def _file_uri_path(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{uri!r}: a file:// URI must not name a host")
    if parts.query or parts.fragment:
        raise ValueError(f"{uri!r}: a URI must not carry a query or fragment (? or #)")
    return unquote(parts.path)


def _uri_parts(uri: str) -> tuple[str, str, tuple[str, ...]]:
    """(scheme, bucket or host, path segments) of a URI; raises ValueError for a URI that
    could mean something else than it shows."""
    parts = urlsplit(uri)
    if parts.query or parts.fragment:
        raise ValueError(f"{uri!r}: a URI must not carry a query or fragment (? or #)")
    if not parts.netloc:
        raise ValueError(f"{uri!r}: a URI needs a bucket or host after the scheme")
    segments = tuple(s for s in unquote(parts.path).split("/") if s)
    if any(s in (".", "..") for s in segments):
        raise ValueError(f"{uri!r}: a URI must not contain '.' or '..' segments")
    return parts.scheme.lower(), parts.netloc, segments


def _realpath(path: str) -> str:
    if "\x00" in path:
        raise ValueError("the path contains a NUL byte")
    try:
        return os.path.realpath(os.path.expanduser(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r} cannot be resolved: {e}") from None


def _entries(raw: str | None) -> list[str]:
    return [entry.strip() for entry in (raw or "").split(",") if entry.strip()]


def _normalized_root(entry: str) -> str:
    """One entry of a roots setting as ``parse_roots`` keeps it."""
    scheme = _scheme(entry)
    if scheme == "file":
        entry, scheme = _file_uri_path(entry), None
    if scheme is None:
        return _realpath(entry)
    scheme, netloc, segments = _uri_parts(entry)
    return "/".join([f"{scheme}://{netloc}", *segments])


def parse_roots(raw: str | None) -> list[str]:
    """The entries of the ``storage_roots`` setting, normalized: local folders resolved
    (``realpath``), ``file://`` roots as local folders, URI roots without a trailing
    slash. Raises ValueError naming a bad entry."""
    return [_normalized_root(entry) for entry in _entries(raw)]


def parse_local_roots(raw: str | None) -> list[str]:
    """Comma-separated local folders (or ``file://`` URIs), each resolved (``realpath``),
    as ``parse_roots`` reads them, without repeats. Raises ValueError naming an entry that
    is a URI of another scheme."""
    roots: list[str] = []
    for entry in _entries(raw):
        if _scheme(entry) not in (None, "file"):
            raise ValueError(
                f"{entry!r} is a URI; list local folders here (object storage URIs are "
                "reachable from every node anyway)"
            )
        roots.append(_normalized_root(entry))
    return list(dict.fromkeys(roots))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _link_out(files: Iterable[str], folders: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of the files listed in an input folder whose target (a symlink's) lies
    under none of ``folders``: (its name, its resolved path). Object-store keys have no
    symlinks and are not looked at."""
    for name in files:
        if _scheme(name) is not None or not os.path.isabs(name):
            continue
        real = _realpath(name)
        if not any(_under(real, root) for root in folders):
            return name, real
    return None


@dataclasses.dataclass(frozen=True)
class StorageRoots:
    """The roots one service allows; ``check`` and ``confine_job`` raise ``JobSpecError``."""

    local: tuple[str, ...]
    uris: tuple[tuple[str, str, tuple[str, ...]], ...]
    models: tuple[str, ...] = ()  # catalog model folders: allowed for model paths only

    @classmethod
    def of(cls, roots: Iterable[str]) -> StorageRoots:
        """From normalized roots (the data directory, then ``parse_roots``)."""
        local: list[str] = []
        uris: list[tuple[str, str, tuple[str, ...]]] = []
        for root in roots:
            if _scheme(root) is None:
                local.append(_realpath(root))
            else:
                uris.append(_uri_parts(root))
        return cls(tuple(dict.fromkeys(local)), tuple(dict.fromkeys(uris)))

    def with_models(self, paths: Iterable[str]) -> StorageRoots:
        """These roots, also allowing the given model folders (the catalog's) as model paths."""
        folders = [_realpath(p) for p in paths if _scheme(p) is None and not is_hub_id(p)]
        return dataclasses.replace(self, models=tuple(dict.fromkeys([*self.models, *folders])))

    def describe(self) -> str:
        uris = ["/".join([f"{s}://{n}", *segs]) for s, n, segs in self.uris]
        return ", ".join([*self.local, *uris])

    def _refuse(self, field: str, path: str, why: str) -> JobSpecError:
        return JobSpecError(
            f"{field}: {path!r} {why} (allowed: {self.describe()}; the service's operator "
            "can add folders or URI prefixes with LLM_BATCH_STORAGE_ROOTS)"
        )

    def check(self, path: str, *, field: str, base: str, model: bool = False) -> str:
        """``path`` as the job should keep it (a local path resolved, a ``file://`` URI as
        its local path) when it lies under a root; else ``JobSpecError`` naming ``field``."""
        scheme = _scheme(path)
        try:
            if scheme is not None and scheme != "file":
                if not any(s == scheme for s, _, _ in self.uris):
                    raise self._refuse(
                        field, path, f"uses the URI scheme {scheme!r}, which no root has"
                    )
                got_scheme, netloc, segments = _uri_parts(path)
                for root_scheme, root_netloc, root_segments in self.uris:
                    if (root_scheme, root_netloc) == (got_scheme, netloc) and (
                        segments[: len(root_segments)] == root_segments
                    ):
                        return path
                raise self._refuse(field, path, "is outside the storage roots")
            local = _file_uri_path(path) if scheme == "file" else path
            real = _realpath(os.path.join(base, os.path.expanduser(local)))
        except JobSpecError:
            raise
        except ValueError as e:
            raise JobSpecError(f"{field}: {e}") from None
        allowed = self.local + (self.models if model else ())
        if any(_under(real, root) for root in allowed):
            return real
        shown = "" if real == local else f" (it resolves to {real!r})"
        raise self._refuse(field, path, f"is outside the storage roots{shown}")

    def check_files(self, files: Iterable[str], *, field: str) -> None:
        """The files found in an input folder: each one's target must lie under a root."""
        outside = _link_out(files, self.local)
        if outside is not None:
            name, real = outside
            raise self._refuse(field, name, f"is a link to {real!r}, outside the storage roots")

    def confine_job(self, data: dict[str, Any], *, base: str) -> dict[str, Any]:
        """A copy of a raw job mapping whose input, output and local model paths are
        checked and resolved (relative ones against ``base``). Blocks that are not
        mappings with a string ``path`` are left for the job's own validation to name."""
        out = dict(data)

        def fix(block: Any, field: str, *, model: bool = False) -> Any:
            if not isinstance(block, dict) or not isinstance(block.get("path"), str):
                return block
            path = block["path"]
            if model and is_hub_id(path) and not os.path.exists(os.path.join(base, path)):
                return block  # a hub id, not a path (as ``absolute_paths`` decides)
            return {
                **block,
                "path": self.check(path, field=f"{field}.path", base=base, model=model),
            }

        if "input" in out:
            out["input"] = fix(out["input"], "input")
        if out.get("output") is not None:
            out["output"] = fix(out["output"], "output")

        def fix_model(block: Any, field: str) -> Any:
            block = fix(block, field, model=True)
            lora = block.get("lora") if isinstance(block, dict) else None
            if isinstance(lora, str) and not (
                is_hub_id(lora) and not os.path.exists(os.path.join(base, lora))
            ):
                # An adapter is loaded as the model is: from under a root, or the catalog's.
                checked = self.check(lora, field=f"{field}.lora", base=base, model=True)
                block = {**block, "lora": checked}
            return block

        return map_models(out, fix_model)


_NODES_CANNOT = {"read": "read it", "write": "write there", "load": "load it"}


@dataclasses.dataclass(frozen=True)
class SharedStorage:
    """Where every node of the Ray cluster the service runs jobs on sees the same files:
    object storage (any URI but ``file://``) and the local ``folders`` the operator
    declares shared (``LLM_BATCH_SHARED_ROOTS``). ``check`` raises ``JobSpecError``."""

    folders: tuple[str, ...]  # resolved (realpath)
    cluster: str  # the cluster's address, for messages

    @classmethod
    def of(cls, folders: Iterable[str], *, cluster: str) -> SharedStorage:
        """From folders as written (each resolved here); the ``shared_roots`` setting holds
        them resolved already (``Settings.shared_storage``)."""
        return cls(tuple(dict.fromkeys(_realpath(f) for f in folders)), cluster)

    def covers(self, path: str) -> bool:
        """Whether a local path (resolved here) lies under a shared folder."""
        real = _realpath(path)
        return any(_under(real, root) for root in self.folders)

    def check(
        self, path: str, *, field: str, use: Literal["read", "write", "load"] = "read"
    ) -> None:
        """Nothing when ``path`` is object storage or under a shared folder; else
        ``JobSpecError`` naming ``field``. ``use`` (read, write, load) says what the
        nodes would fail to do with it."""
        scheme = _scheme(path)
        if scheme is not None and scheme != "file":
            return
        try:
            local = _file_uri_path(path) if scheme == "file" else path
            if self.covers(local):
                return
        except ValueError as e:
            raise JobSpecError(f"{field}: {e}") from None
        raise self._refuse(field, f"{path!r} is", use)

    def check_files(self, files: Iterable[str], *, field: str) -> None:
        """The files found in a shared input folder: a symlink among them may point to a
        folder that is not shared."""
        outside = _link_out(files, self.folders)
        if outside is not None:
            name, real = outside
            raise self._refuse(field, f"{name!r} links to {real!r}, which is", "read")

    def _refuse(
        self, field: str, shown: str, use: Literal["read", "write", "load"]
    ) -> JobSpecError:
        shared = ", ".join(self.folders) or "none declared"
        return JobSpecError(
            f"{field}: {shown} on the service's machine only, but jobs run on the Ray cluster "
            f"at {self.cluster}, whose nodes cannot {_NODES_CANNOT[use]}; use an object "
            "storage URI (s3://, gs://, abfs://...) or a path under a folder every node "
            f"mounts (shared folders: {shared}; the service's operator declares them in "
            "LLM_BATCH_SHARED_ROOTS)"
        )
