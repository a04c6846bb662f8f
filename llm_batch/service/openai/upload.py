"""A ``multipart/form-data`` upload streamed to disk as it arrives.

FastAPI's ``UploadFile`` parses the whole body before the route runs, so it can
neither refuse an oversized upload early nor avoid a second copy in a temporary
folder. This reads the request stream itself: the file part goes to a hidden
file in the destination folder chunk by chunk (written off the event loop), the
size is counted while it streams, and the upload is cut off (``UploadTooLarge``)
as soon as it passes the limit. The small text fields (``purpose``) are kept in
memory, a few KiB at most.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["Upload", "UploadInvalid", "UploadTooLarge", "receive_upload"]

_FIELD_LIMIT = 64 * 1024  # bytes of one text field
_FIELDS_LIMIT = 16
_MULTIPART_SLACK = 64 * 1024  # headers and boundaries around the file's own bytes


class UploadInvalid(ValueError):
    """The request is not a usable multipart upload (the message says why)."""


class UploadTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"the file is larger than this service's limit of {limit} bytes")
        self.limit = limit


@dataclasses.dataclass
class Upload:
    fields: dict[str, str]
    filename: str | None  # None: the request had no file part
    path: Path | None  # the hidden file holding its bytes; the caller renames or removes it
    size: int


class _Receiver:
    """The parser's callbacks: headers per part, field values, file bytes to write."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.path: Path | None = None
        self.size = 0
        self.pending: list[bytes] = []  # file bytes parsed but not yet written
        self._file: IO[bytes] | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._name = None
        self._is_file = False
        self._value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise UploadInvalid("a multipart part has no name in its Content-Disposition")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            if len(self.fields) >= _FIELDS_LIMIT:
                raise UploadInvalid(f"more than {_FIELDS_LIMIT} form fields")
            return
        if self._name != "file":
            raise UploadInvalid(f"unexpected file part {self._name!r}: send the file as `file`")
        if self.path is not None:
            raise UploadInvalid("send one file per request")
        self._is_file = True
        raw = options[b"filename"].decode("utf-8", "replace")
        # A name to show back, never a path to use: the bytes are stored under the file's id.
        self.filename = raw.replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
        self.path = self.folder / f".upload-{secrets.token_hex(8)}"
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in finish() / abort()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.size += end - start
            if self.size > self.max_bytes:
                raise UploadTooLarge(self.max_bytes)
            self.pending.append(data[start:end])
            return
        if len(self._value) + (end - start) > _FIELD_LIMIT:
            raise UploadInvalid(f"form field {self._name!r} is longer than {_FIELD_LIMIT} bytes")
        self._value += data[start:end]

    def on_part_end(self) -> None:
        if not self._is_file and self._name is not None:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def flush(self) -> None:
        """Write the pending file bytes (called in a worker thread)."""
        if self._file is not None and self.pending:
            self._file.write(b"".join(self.pending))
        self.pending.clear()

    def finish(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


async def receive_upload(request: Request, folder: Path, *, max_bytes: int) -> Upload:
    """Stream a multipart request's ``file`` part into a hidden file in ``folder``.

    Raises ``UploadInvalid`` for a request that is not a multipart upload and
    ``UploadTooLarge`` once the file passes ``max_bytes`` (without reading the rest
    when the declared Content-Length already says so); nothing is left on disk then.
    """
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadInvalid("expected a multipart/form-data request with `file` and `purpose`")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + _MULTIPART_SLACK:
        raise UploadTooLarge(max_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    receiver = _Receiver(folder, max_bytes)
    callbacks = cast("MultipartCallbacks", receiver.callbacks())
    parser = MultipartParser(params[b"boundary"], callbacks)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if receiver.pending:
                await anyio.to_thread.run_sync(receiver.flush)
        parser.finalize()
        await anyio.to_thread.run_sync(receiver.finish)
    except FormParserError as e:
        receiver.abort()
        raise UploadInvalid(f"the multipart body does not parse: {e}") from None
    except BaseException:
        receiver.abort()
        raise
    return Upload(receiver.fields, receiver.filename, receiver.path, receiver.size)
