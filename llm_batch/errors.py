"""Exceptions a user can act on.

    LLMBatchError            every error this package raises on purpose
    ├── JobSpecError         the job file or request is invalid (a field, a column, a template)
    ├── InputError           the input cannot be read (missing, unreadable, empty)
    ├── EngineUnavailable    vLLM is not installed or cannot start
    └── ServiceUnavailable   something the job depends on (Ray, the database) cannot be
                             reached now; trying again later may work

Row-level failures are not exceptions: they are data, in the ``error`` column.
Only the API layer turns these into HTTP status codes.
"""

from __future__ import annotations

__all__ = [
    "EngineUnavailable",
    "InputError",
    "JobSpecError",
    "LLMBatchError",
    "ServiceUnavailable",
]


class LLMBatchError(Exception):
    """Base class: the message is meant for the user, one line, naming what to fix."""


class JobSpecError(LLMBatchError, ValueError):
    pass


class InputError(LLMBatchError):
    pass


class EngineUnavailable(LLMBatchError):
    pass


class ServiceUnavailable(LLMBatchError):
    pass
