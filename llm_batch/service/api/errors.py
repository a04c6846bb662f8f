"""The one place errors become HTTP status codes; every error body is ``{"detail": str}``.

JobSpecError, InputError   422  the submission is invalid (the message names the field)
JobNotFound                404
FileExpired                404  (an expired upload or job output; the message says so)
OutputFileNotFound         404
JobConflict                409
ServiceUnavailable         503
EngineUnavailable          503
other LLMBatchError        400

Before any route: a body over ``max_request_bytes`` is 413, a JSON body that is not
UTF-8 or nests deeper than ``max_json_depth`` is 422 (``api/limits.py``, same shapes).

The OpenAI-compatible routes (``/v1/files``, ``/v1/batches``) raise ``OpenAIError``
instead, answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from llm_batch.errors import EngineUnavailable, InputError, JobSpecError, LLMBatchError
from llm_batch.service.errors import (
    FileExpired,
    JobConflict,
    JobNotFound,
    OutputFileNotFound,
    ServiceUnavailable,
)

__all__ = ["OpenAIError", "install_error_handlers", "status_code_for"]

logger = logging.getLogger(__name__)

_CODES: list[tuple[type[LLMBatchError], int]] = [
    (JobSpecError, 422),
    (InputError, 422),
    (JobNotFound, 404),
    (FileExpired, 404),
    (OutputFileNotFound, 404),
    (JobConflict, 409),
    (ServiceUnavailable, 503),
    (EngineUnavailable, 503),
]


def status_code_for(error: LLMBatchError) -> int:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return 400


async def _llm_batch_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LLMBatchError)
    return JSONResponse({"detail": str(exc)}, status_code=status_code_for(exc))


async def _request_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own checks (a body that is not JSON, a bad query parameter):
    # one line per problem naming where it is, like the job spec's messages.
    assert isinstance(exc, RequestValidationError)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            lines.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', '')}")
        else:
            lines.append(f"{loc}: {err.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(lines)}, status_code=422)


class OpenAIError(HTTPException):
    """An error of the OpenAI-compatible routes, in OpenAI's shape and with its ``type``."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
    ):
        super().__init__(status_code=status_code, detail=message)
        self.message, self.param, self.code, self.type = message, param, code, type


async def _openai_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    body = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    # The openai client retries 409s (and 5xx) unless told not to; a conflict here is final.
    headers = {"x-should-retry": "false"} if exc.status_code < 500 else None
    return JSONResponse({"error": body}, status_code=exc.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LLMBatchError, _llm_batch_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(OpenAIError, _openai_error)
