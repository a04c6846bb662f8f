"""Re-running only failed rows: how a finished output folder is turned into an interrupted
run without its error rows (``pipeline/retry.py``), on files only (the run itself is
``test_retry_e2e.py``)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_batch.errors import JobSpecError
from llm_batch.pipeline.manifest import Manifest, new_run_id, part_name
from llm_batch.pipeline.retry import RETRY_NAME, failed_rows, finish_moves, prepare_retry
from llm_batch.pipeline.write import OWN_FILES, clear_output, committed_parts


def finished(folder: Path, parts: list[dict[str, list]]) -> Manifest:
    """A finished job's folder: its manifest and part files (no checkpoint)."""
    run = new_run_id()
    manifest = Manifest(job="j")
    manifest.add_run(run, "digest-1", OWN_FILES)
    folder.mkdir()
    for i, columns in enumerate(parts):
        pq.write_table(pa.table(columns), folder / part_name(run, i))
    manifest.files = sorted({*OWN_FILES, *(part_name(run, i) for i in range(len(parts)))})
    manifest.write(str(folder))
    return manifest


def ids(path: Path) -> list[int]:
    return sorted(pq.read_table(path).column("row_id").to_pylist())


def test_a_retry_keeps_good_rows_commits_them_and_marks_replaced_parts(tmp_path):
    out = tmp_path / "out"
    manifest = finished(
        out,
        [
            {"row_id": [0, 1, 2], "text": ["a", "b", "c"], "error": [None, None, None]},
            {"row_id": [3, 4, 5], "text": ["d", None, "f"], "error": [None, "too long", None]},
        ],
    )
    clean, dirty = sorted(p.name for p in out.glob("part-*"))
    assert failed_rows(str(out), [None]) == 1

    run = new_run_id()
    prepare_retry(str(out), manifest, run, digest="digest-2", model_names=[None])

    checkpoint = out / "_checkpoint"
    assert ids(checkpoint / clean) == [0, 1, 2]
    # The part with a failed row is pending (Ray Data deletes it on resume); its good rows
    # are in a copy of the retry's own, committed.
    assert (checkpoint / dirty.replace(".parquet", ".pending.parquet")).exists()
    copy = part_name(run, 900_000)
    assert pq.read_table(out / copy).to_pydict() == {
        "row_id": [3, 5],
        "text": ["d", "f"],
        "error": [None, None],
    }
    assert ids(checkpoint / copy) == [3, 5]
    assert not (out / RETRY_NAME).exists()
    # The run that resumes reads (and counts) exactly the kept rows.
    kept = [Path(p).name for p in committed_parts(str(out))]
    assert sorted(kept) == sorted([clean, copy])
    reread = Manifest.read(str(out))
    assert reread is not None
    assert reread.last_digest == "digest-2"
    assert reread.owns(copy)


def test_every_sample_of_a_prompt_goes_again_when_one_failed(tmp_path):
    out = tmp_path / "out"
    manifest = finished(
        out, [{"row_id": [0, 0, 1, 1], "a__error": [None, "x", None, None], "b__error": [None] * 4}]
    )
    assert failed_rows(str(out), ["a", "b"]) == 1
    run = new_run_id()
    prepare_retry(str(out), manifest, run, digest="d", model_names=["a", "b"])
    assert ids(out / part_name(run, 900_000)) == [1, 1]


def test_a_part_with_only_failed_rows_is_replaced_by_nothing(tmp_path):
    out = tmp_path / "out"
    manifest = finished(out, [{"row_id": [0, 1], "error": ["x", "y"]}])
    run = new_run_id()
    prepare_retry(str(out), manifest, run, digest="d", model_names=[None])
    assert not (out / part_name(run, 900_000)).exists()
    assert committed_parts(str(out)) == []


def test_a_retry_cut_short_before_its_checkpoint_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    manifest = finished(out, [{"row_id": [0, 1], "error": [None, "x"]}])
    before = sorted(p.name for p in out.iterdir())
    (out / RETRY_NAME / "checkpoint").mkdir(parents=True)  # what a cut-short retry leaves
    (out / RETRY_NAME / "part-0123456789ab-900000.parquet").write_bytes(b"half")
    finish_moves(str(out))  # no checkpoint in place: nothing is moved
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, RETRY_NAME])
    # The next retry starts over; a plain run clears it with the rest of the job's files.
    prepare_retry(str(out), manifest, new_run_id(), digest="d", model_names=[None])
    assert not (out / RETRY_NAME).exists()


def test_a_retry_cut_short_after_its_checkpoint_is_finished_by_the_resumed_run(tmp_path):
    out = tmp_path / "out"
    finished(out, [{"row_id": [0, 1], "error": [None, "x"]}])
    run = new_run_id()
    staging = out / RETRY_NAME
    (out / "_checkpoint").mkdir()
    staging.mkdir()
    copy = part_name(run, 900_000)
    pq.write_table(pa.table({"row_id": [0], "error": [None]}), staging / copy)
    finish_moves(str(out))
    assert (out / copy).exists()
    assert not staging.exists()


def test_clearing_a_folder_removes_a_retry_left_behind(tmp_path):
    out = tmp_path / "out"
    manifest = finished(out, [{"row_id": [0], "error": [None]}])
    (out / RETRY_NAME).mkdir()
    (out / RETRY_NAME / "x.parquet").write_bytes(b"x")
    clear_output(str(out), manifest)
    assert not (out / RETRY_NAME).exists()


def test_a_retry_needs_a_finished_output_with_the_same_model_names(tmp_path):
    with pytest.raises(JobSpecError, match="holds no output of llm-batch"):
        failed_rows(str(tmp_path), [None])
    out = tmp_path / "out"
    finished(out, [{"row_id": [0], "error": [None]}])
    with pytest.raises(JobSpecError, match=r"no column 'judge__error'.*models\[\]\.name"):
        failed_rows(str(out), ["judge"])
    (out / "_checkpoint").mkdir()  # an interrupted run: resumed, not prepared again
    assert failed_rows(str(out), [None]) is None
    manifest = Manifest.read(str(out))
    with pytest.raises(JobSpecError, match="did not finish and was of another job spec"):
        prepare_retry(str(out), manifest, new_run_id(), digest="d", model_names=[None])


def test_a_row_any_of_three_models_failed_goes_again(tmp_path):
    out = tmp_path / "out"
    errors = {f"{m}__error": [None, None, None] for m in "abc"}
    errors["c__error"] = [None, "x", None]
    finished(out, [{"row_id": [0, 1, 2], **errors}])
    assert failed_rows(str(out), ["a", "b", "c"]) == 1
