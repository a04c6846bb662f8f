"""Errors of the job service, extending the package's tree (``llm_batch.errors``).

    LLMBatchError
    ├── JobNotFound          no job has this id                         → 404
    ├── JobConflict          the request contradicts the job's state    → 409
    │                        (cancel a finished job, reuse an Idempotency-Key)
    ├── ServiceUnavailable   the database or Ray cannot be reached      → 503
    │                        (``llm_batch.errors``: Ray's Jobs API raises it too)
    ├── FileRefused          an upload the Files API does not take      → 400
    │                        (``param`` and ``code`` say which field and why)
    ├── FileExpired          a file or job output past its expiry       → 404
    ├── OutputFileNotFound   a name the job's output does not hold      → 404
    └── SettingsError        the service cannot start with these settings
                             (the message names the variable)

Only the API layer turns these into HTTP status codes.
"""

from __future__ import annotations

import datetime as dt

from llm_batch.errors import LLMBatchError, ServiceUnavailable

__all__ = [
    "FileExpired",
    "FileRefused",
    "JobConflict",
    "OutputFileNotFound",
    "JobNotFound",
    "ServiceUnavailable",
    "SettingsError",
]


class JobNotFound(LLMBatchError, LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class JobConflict(LLMBatchError):
    pass


class SettingsError(LLMBatchError):
    pass


class FileRefused(LLMBatchError):
    def __init__(self, message: str, *, param: str, code: str):
        super().__init__(message)
        self.param = param
        self.code = code


class FileExpired(LLMBatchError, LookupError):
    def __init__(self, what: str, when: dt.datetime):
        super().__init__(f"{what} expired at {when.isoformat(timespec='seconds')} and was deleted")
        self.what = what


class OutputFileNotFound(LLMBatchError, LookupError):
    def __init__(self, job_id: str, name: str):
        super().__init__(
            f"job {job_id} wrote no file {name!r} (GET /v1/jobs/{job_id}/files lists its files)"
        )
