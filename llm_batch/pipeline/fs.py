"""Local paths and URIs as one thing: the pyarrow filesystem behind either."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = ["open_filesystem"]


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a local path or URI."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), uri
