"""What a job wrote in its output folder, known for sure: the manifest ``_llm_batch.json``.

A job only ever deletes or replaces files it wrote itself. The manifest, written
before anything else goes into the folder, records the job, every run (a random
run id each) and the files those runs wrote; each Parquet part file also carries
its run's id in its name (``part-<run id>-<task>.parquet``), so a run that was cut
short still owns the files it left. A file is the job's only when the manifest says
so; any other file is foreign and is never touched:

- a folder holding foreign files is refused (``OutputFolder.check``), unless the job
  says ``output.mode: overwrite``, which deletes the foreign Parquet files only;
- an output folder that is, contains or lies inside the input is refused.

``{"format": 1, "job": name, "runs": [{"run_id", "spec_digest", "started_at"}],
"files": [names relative to the folder; "dir/" for a folder]}``
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from llm_batch.errors import JobSpecError
from llm_batch.pipeline.fs import open_filesystem

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "OutputFolder",
    "check_apart",
    "is_part_file",
    "new_run_id",
    "part_name",
]

MANIFEST_NAME = "_llm_batch.json"
_FORMAT = 1
# part-<12 hex run id>-<6 digit task>.parquet, and its hidden in-progress twin.
_PART = re.compile(r"^\.?part-(?P<run>[0-9a-f]{12})-\d{6}\.parquet(\.[0-9a-f]{8}\.inprogress)?$")
_SHOWN = 3  # foreign files named in a refusal


def is_part_file(name: str) -> bool:
    """A complete part file of some run (its name only: ownership is ``Manifest.owns``)."""
    return not name.startswith(".") and _PART.match(name) is not None


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def part_name(run_id: str, task_index: int) -> str:
    """A part file's name: deterministic per write task of a run, as checkpointing needs."""
    return f"part-{run_id}-{task_index:06d}.parquet"


@dataclasses.dataclass
class Manifest:
    job: str
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)

    @property
    def run_ids(self) -> set[str]:
        return {str(r.get("run_id")) for r in self.runs}

    @property
    def last_digest(self) -> str | None:
        return str(self.runs[-1].get("spec_digest")) if self.runs else None

    def owns(self, name: str) -> bool:
        """Whether ``name`` (relative to the folder, ``/``-separated) was written by a run
        this manifest records."""
        if name == MANIFEST_NAME or name in self.files:
            return True
        if any(f.endswith("/") and name.startswith(f) for f in self.files):
            return True
        base = name.rsplit("/", 1)[-1]
        if "/" not in name:
            found = _PART.match(base)
            if found is not None:
                return found.group("run") in self.run_ids
            # A temporary twin of a file it lists (".<name>.<anything>").
            return any(base.startswith(f".{f}.") for f in self.files if "/" not in f)
        return False

    def add_run(self, run_id: str, spec_digest: str, files: list[str]) -> None:
        self.runs.append({"run_id": run_id, "spec_digest": spec_digest, "started_at": time.time()})
        self.add_files(files)

    def add_files(self, files: list[str]) -> None:
        self.files = sorted(set(self.files) | set(files))

    def forget(self, names: list[str]) -> None:
        gone = set(names)
        self.files = [f for f in self.files if f not in gone]

    def as_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "job": self.job, "runs": self.runs, "files": self.files}

    @classmethod
    def read(cls, uri: str) -> Manifest | None:
        """The manifest of the output folder ``uri``, or None when it has none. One that
        does not parse is an error: the folder's files cannot be told apart."""
        fs, path = open_filesystem(uri)
        target = f"{path.rstrip('/')}/{MANIFEST_NAME}"
        try:
            with fs.open_input_stream(target) as f:
                raw = f.read()
        except (FileNotFoundError, OSError):
            return None
        try:
            data = json.loads(raw)
            return cls(
                job=str(data["job"]),
                runs=[dict(r) for r in data["runs"]],
                files=[str(f) for f in data["files"]],
            )
        except (ValueError, KeyError, TypeError) as e:
            raise JobSpecError(
                f"output.path: {uri!r} holds a {MANIFEST_NAME} that llm-batch cannot read "
                f"({type(e).__name__}); choose another output folder"
            ) from None

    def write(self, uri: str) -> None:
        """Write atomically: a temporary name, then a rename (in place on object stores,
        where an upload becomes visible only when complete)."""
        fs, path = open_filesystem(uri)
        base = path.rstrip("/")
        fs.create_dir(base, recursive=True)
        final = f"{base}/{MANIFEST_NAME}"
        local = isinstance(fs, pafs.LocalFileSystem)
        target = f"{base}/.{MANIFEST_NAME}.{uuid.uuid4().hex[:8]}.tmp" if local else final
        with fs.open_output_stream(target) as f:
            f.write(json.dumps(self.as_dict(), indent=1).encode())
        if local:
            fs.move(target, final)


@dataclasses.dataclass
class OutputFolder:
    """An output folder as a job finds it: its manifest (if llm-batch wrote there
    before) and the files no manifest accounts for."""

    uri: str
    manifest: Manifest | None
    files: list[str]  # every file, relative to the folder
    foreign: list[str]

    @classmethod
    def inspect(cls, uri: str) -> OutputFolder:
        fs, path = open_filesystem(uri)
        base = path.rstrip("/")
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            return cls(uri, None, [], [])
        if info.type != pafs.FileType.Directory:
            raise JobSpecError(
                f"output.path: {uri!r} is a file; the output is a folder of Parquet files"
            )
        manifest = Manifest.read(uri)
        files = sorted(
            f.path[len(base) + 1 :]
            for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if f.type == pafs.FileType.File
        )
        foreign = [f for f in files if manifest is None or not manifest.owns(f)]
        return cls(uri, manifest, files, foreign)

    @property
    def foreign_parquet(self) -> list[str]:
        return [f for f in self.foreign if f.rsplit("/", 1)[-1].endswith(".parquet")]

    def check(self, *, mode: str, will_write: list[str]) -> None:
        """Refuse a folder holding files llm-batch did not write, unless ``mode`` is
        ``overwrite`` and the only ones in the way are Parquet files; never one where a
        foreign file has the name of a file the job writes (``will_write``)."""
        if not self.foreign:
            return
        clash = [f for f in self.foreign if f in will_write or f.split("/", 1)[0] in will_write]
        if clash:
            raise JobSpecError(
                f"output.path: {self.uri!r} holds {_names(clash)}, which llm-batch did not "
                "write and would replace; choose an empty or new folder"
            )
        if mode == "overwrite":
            return
        raise JobSpecError(
            f"output.path: {self.uri!r} holds {len(self.foreign)} file(s) llm-batch did not "
            f"write ({_names(self.foreign)}); choose an empty or new folder, or set "
            "output.mode: overwrite to replace its Parquet files (other files are kept)"
        )


def _names(files: list[str]) -> str:
    shown = ", ".join(files[:_SHOWN])
    return shown + (f" and {len(files) - _SHOWN} more" if len(files) > _SHOWN else "")


def _location(path: str) -> tuple[str, str]:
    """(scheme, normalized path) of a local path or URI, for comparing folders."""
    if "://" in path and not path.startswith("file://"):
        scheme, rest = path.split("://", 1)
        return scheme.lower(), "/" + rest.strip("/")
    local = os.path.realpath(os.path.expanduser(path.removeprefix("file://")))
    return "file", local.rstrip("/") or "/"


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_apart(input_path: str, output_path: str) -> None:
    """Refuse an output folder that is, contains or lies inside the input: a run
    would read its own output, or replace the input with it."""
    (si, i), (so, o) = _location(input_path), _location(output_path)
    if si != so:
        return
    if i == o:
        why = "is the input"
    elif _within(o, i):
        why = "lies inside the input"
    elif _within(i, o):
        why = "contains the input"
    else:
        return
    raise JobSpecError(
        f"output.path: {output_path!r} {why} ({input_path!r}); choose an output folder "
        "apart from the input"
    )
