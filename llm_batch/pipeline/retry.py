"""Re-running only a job's failed rows (``llm-batch run --retry-errors``, ``POST
/v1/jobs/{id}/retry``).

A finished job's folder is turned into one that an interrupted run would have left,
with every row that has an error taken out of it, and the run then resumes as any
interrupted run does (Ray Data checkpointing, ``run.claim_output``): the rows whose
ids are committed are skipped, the others (the failed ones) run again and are written
in new part files. The output ends with every input row exactly once.

How the folder is turned, so that a crash at any point loses and doubles nothing:

1. Everything new is written under ``_retry/`` first: each part file with failed rows
   is copied there without them (``part-<retry run>-9xxxxx.parquet``), and a checkpoint
   folder commits the row ids each kept part holds and marks each replaced part
   *pending* (Ray Data deletes the data file of a pending checkpoint when the run
   resumes). A crash here leaves the finished folder as it was; ``_retry/`` is cleared
   by the next retry or run.
2. ``_retry/checkpoint`` is renamed to ``_checkpoint`` (one rename): from here the
   folder is an interrupted run of the retry's spec.
3. The copies are moved into place. A crash here is finished by the resumed run
   (``finish_moves``) before Ray Data reads the checkpoint.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from llm_batch import columns
from llm_batch.errors import JobSpecError
from llm_batch.pipeline.fs import open_filesystem
from llm_batch.pipeline.manifest import MANIFEST_NAME, Manifest, part_name

__all__ = ["RETRY_NAME", "error_columns", "failed_rows", "finish_moves", "prepare_retry"]

logger = logging.getLogger(__name__)

RETRY_NAME = "_retry"
# Task numbers of the retry's copies: far above any write task of the run itself.
_COPY_TASKS = 900_000
_PENDING = ".pending.parquet"  # Ray Data's pending checkpoint suffix (checkpoint_writer)


def error_columns(model_names: list[str | None]) -> list[str]:
    """The error column of each of the job's models."""
    return [columns.model_column(name, columns.ERROR) for name in model_names]


def _failed_ids(table: pa.Table, errors: list[str]) -> pa.Array:
    """Row ids with an error in any model (a prompt's samples go again together)."""
    mask = functools.reduce(pc.or_, (pc.is_valid(table[c]) for c in errors))
    return pc.unique(table[columns.ROW_ID].filter(mask))


def _interrupted(fs: Any, base: str) -> bool:
    return bool(fs.get_file_info(f"{base}/_checkpoint").type != pafs.FileType.NotFound)


def _check(uri: str, manifest: Manifest | None) -> tuple[Any, str]:
    fs, path = open_filesystem(uri)
    base = path.rstrip("/")
    if not isinstance(fs, pafs.LocalFileSystem):
        raise JobSpecError(
            f"output.path: {uri!r}: retrying rows with errors needs the output on a file "
            "system (local, or a mount shared by the nodes); on object storage run the job "
            "again whole"
        )
    if manifest is None:
        raise JobSpecError(
            f"output.path: {uri!r} holds no output of llm-batch ({MANIFEST_NAME} is "
            "missing): run the job before retrying its rows with errors"
        )
    return fs, base


def failed_rows(uri: str, model_names: list[str | None]) -> int | None:
    """How many input rows of a finished job's output have an error (what a retry runs);
    None when the folder holds an interrupted run (``run_job`` resumes it, if it was of
    the same spec, or refuses)."""
    from llm_batch.pipeline.write import owned_parts

    errors = error_columns(model_names)
    fs, base = _check(uri, Manifest.read(uri))
    if _interrupted(fs, base):
        return None
    return sum(len(_failed_ids(_read(fs, part, errors), errors)) for part in owned_parts(uri))


def _read(fs: Any, path: str, errors: list[str], *, whole: bool = False) -> pa.Table:
    with fs.open_input_file(path) as f:
        schema = pq.read_schema(f)
        missing = [c for c in [columns.ROW_ID, *errors] if c not in schema.names]
        if missing:
            raise JobSpecError(
                f"models: {_name(path)} has no column {missing[0]!r}: a retry keeps "
                "the job's model names (models[].name), so that its rows replace the old ones"
            )
        return pq.read_table(f, columns=None if whole else [columns.ROW_ID, *errors])


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _write_ids(fs: Any, path: str, ids: pa.Array) -> None:
    with fs.open_output_stream(path) as stream:
        pq.write_table(pa.table({columns.ROW_ID: ids}), stream)


def prepare_retry(
    uri: str,
    manifest: Manifest | None,
    run_id: str,
    *,
    digest: str,
    model_names: list[str | None],
) -> Manifest:
    """Turn a finished job's folder into an interrupted run of the spec ``digest`` without
    its failed rows (see the module); returns the manifest, which records the run (its
    copies and ``_retry/`` are the folder's own) before anything is written."""
    from llm_batch.pipeline.write import OWN_FILES, owned_parts

    errors = error_columns(model_names)
    fs, base = _check(uri, manifest)
    assert manifest is not None
    if _interrupted(fs, base):
        raise JobSpecError(
            f"output.path: the last run in {uri!r} did not finish and was of another job "
            "spec: run that spec again to finish it, then retry its rows with errors"
        )
    manifest.add_run(run_id, digest, OWN_FILES)
    manifest.write(uri)
    staging = f"{base}/{RETRY_NAME}"
    if fs.get_file_info(staging).type != pafs.FileType.NotFound:
        fs.delete_dir(staging)  # an earlier retry that stopped before step 2
    checkpoint = f"{staging}/checkpoint"
    fs.create_dir(checkpoint, recursive=True)
    redo = 0
    copies: list[str] = []
    for part in owned_parts(uri):
        table = _read(fs, part, errors)
        failed = _failed_ids(table, errors)
        name = _name(part).removesuffix(".parquet")
        if len(failed) == 0:
            _write_ids(fs, f"{checkpoint}/{name}.parquet", pc.unique(table[columns.ROW_ID]))
            continue
        redo += len(failed)
        whole = _read(fs, part, errors, whole=True)
        kept = whole.filter(pc.invert(pc.is_in(whole[columns.ROW_ID], value_set=failed)))
        copy = part_name(run_id, _COPY_TASKS + len(copies))
        if kept.num_rows:
            with fs.open_output_stream(f"{staging}/{copy}") as stream:
                pq.write_table(kept, stream, compression="zstd")
            _write_ids(
                fs,
                f"{checkpoint}/{copy.removesuffix('.parquet')}.parquet",
                pc.unique(kept[columns.ROW_ID]),
            )
            copies.append(copy)
        # Pending: Ray Data deletes this part when the run resumes (its rows are redone or
        # in the copy).
        _write_ids(fs, f"{checkpoint}/{name}{_PENDING}", pa.array([], pa.int64()))
    fs.move(checkpoint, f"{base}/_checkpoint")
    finish_moves(uri)
    logger.info("retry: %d row(s) with errors run again in %s", redo, uri)
    return manifest


def finish_moves(uri: str) -> None:
    """Move the retry's copies into place (step 3), and clear ``_retry/``: called again by
    a resumed run, which finishes a retry cut short between its steps 2 and 3."""
    fs, path = open_filesystem(uri)
    base = path.rstrip("/")
    staging = f"{base}/{RETRY_NAME}"
    if fs.get_file_info(staging).type == pafs.FileType.NotFound:
        return
    if fs.get_file_info(f"{base}/_checkpoint").type == pafs.FileType.NotFound:
        return  # cut short before step 2: the folder is unchanged, the retry not started
    for f in fs.get_file_info(pafs.FileSelector(staging, recursive=False)):
        if f.type == pafs.FileType.File and f.base_name.endswith(".parquet"):
            fs.move(f.path, f"{base}/{f.base_name}")
    fs.delete_dir(staging)
