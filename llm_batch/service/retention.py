"""The retention sweep: what has expired is deleted, and only what the service wrote.

One background thread; every ``retention_sweep_seconds``:

    files    uploads past ``expires_after`` and batch output files past their batch's
             ``output_expires_after``: their bytes are deleted; the record stays, so
             that ``GET`` answers 404 saying the file expired
    outputs  a job's service-placed output (no ``output.path`` given) past
             ``output.retain_days`` (or ``LLM_BATCH_RETENTION_DAYS``) after the job
             ended: the files its manifest (``_llm_batch.json``) lists are deleted, then
             the manifest, the status file and the folder if nothing else is left in it;
             a file the manifest does not list is never touched

A folder a job named itself has no expiry: the service never deletes it. Batches
past their completion window are the batch runner's (``openai/runner.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from llm_batch.service.settings import Settings
from llm_batch.service.store import TERMINAL, Job, JobStore, StoredFile, utcnow

__all__ = ["RetentionSweep", "delete_output"]

logger = logging.getLogger(__name__)


def delete_output(folder: str) -> list[str]:
    """Delete what the job's manifest says it wrote in ``folder`` (a local folder of the
    data directory), then the manifest and the job's status file; the folder goes only
    when that leaves it empty. Returns the names deleted."""
    from llm_batch.pipeline.driver import STATUS_NAME
    from llm_batch.pipeline.manifest import MANIFEST_NAME, Manifest
    from llm_batch.pipeline.write import clear_output

    manifest = Manifest.read(folder)
    if manifest is None:
        return []
    removed = clear_output(folder, manifest)
    for name in (MANIFEST_NAME, STATUS_NAME):
        path = Path(folder) / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    with contextlib.suppress(OSError):
        os.rmdir(folder)  # only when empty: anything else there stays
    return removed


class RetentionSweep:
    def __init__(self, store: JobStore, settings: Settings):
        self._sessions = sessionmaker(store.engine, expire_on_commit=False)
        self.settings = settings
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llm-batch-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.wait(self.settings.retention_sweep_seconds):
            try:
                self.sweep()
            except Exception:
                logger.exception("retention sweep failed; retrying")

    def sweep(self) -> tuple[int, int]:
        """One pass; returns (files, job outputs) deleted."""
        now = utcnow()
        with self._sessions() as s:
            files = list(
                s.scalars(select(StoredFile).where(StoredFile.expires_at <= now).limit(500))
            )
            jobs = list(
                s.scalars(
                    select(Job)
                    .where(
                        Job.expires_at <= now,
                        Job.expired_at.is_(None),
                        Job.status.in_(TERMINAL),
                    )
                    .limit(100)
                )
            )
        gone_files = 0
        for row in files:
            path = self.settings.file_path(row.owner, row.id)
            if path.is_file():
                path.unlink()
                gone_files += 1
                logger.info("file %s expired: deleted", row.id)
        for job in jobs:
            removed = delete_output(job.output_path)
            logger.info("job %s's output expired: deleted %d files", job.id, len(removed))
            with self._sessions() as s, s.begin():
                s.execute(update(Job).where(Job.id == job.id).values(expired_at=utcnow()))
        return gone_files, len(jobs)
