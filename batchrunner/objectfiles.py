"""An object opened for Arrow's readers, every read tried again on the store's transient
errors: what the CSV, JSON-lines and Parquet readers (and a manifest's lines) read a
bucket through.

Arrow's own input files leave some transient failures to the caller: the AWS SDK retries
a 503 SlowDown or a dropped connection itself, but not an error answer longer than the
range being read (Arrow reads a range into a buffer of its size, and a SlowDown's body
overflows a small one: "Failed to flush response stream"). A file's last read is often
that small, and so are a Parquet file's footer and column chunks. ``ObjectFile`` reads
the object by ranges at its own position, so that a failed range is simply asked for
again (``ObjectStore.retried``: the same attempts and backoff as an image's fetch),
whatever the reader was in the middle of; nothing read is lost or read twice.

``readable`` / ``seekable`` open a local file or an object alike: a local path is given
to Arrow as text, which opens it itself. ``retrying_filesystem`` is the store's filesystem
opening its files so, for Arrow's datasets.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from batchrunner.storage import ObjectPath, ObjectStore

__all__ = [
    "CODECS",
    "ObjectFile",
    "open_object",
    "readable",
    "retrying_filesystem",
    "seekable",
]

_T = TypeVar("_T")

# The extensions Arrow's compression="detect" decompresses, and its codec names.
CODECS = {".gz": "gzip", ".bz2": "bz2", ".lz4": "lz4", ".zst": "zstd"}


class ObjectFile(io.RawIOBase):
    """An object's bytes, random access, each range read tried again on a transient error
    (an ``OSError`` naming the URI when the store still fails)."""

    def __init__(self, path: ObjectPath) -> None:
        super().__init__()
        self.path = path
        store = path.store
        self._file = self._retried(lambda: store.filesystem.open_input_file(path.location))
        self._size: int = self._file.size()
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"{self.path}: cannot seek before the start")
        self._position = base + offset
        return self._position

    def read_buffer(self, size: int = -1) -> pa.Buffer:
        """Up to ``size`` bytes from the position (all that is left if negative), as an
        Arrow buffer (no copy); Arrow's ``PythonFile`` reads through this."""
        left = max(self._size - self._position, 0)
        wanted = left if size < 0 else min(size, left)
        if not wanted:
            return pa.py_buffer(b"")
        position = self._position
        data: pa.Buffer = self._retried(lambda: self._read_at(position, wanted))
        self._position += data.size
        return data

    def _read_at(self, position: int, size: int) -> pa.Buffer:
        # One ranged GET, into a buffer of its own; a failed one changes nothing.
        self._file.seek(position)
        return self._file.read_buffer(size)

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.read_buffer(size).to_pybytes()
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read_buffer(len(view))
        view[: data.size] = memoryview(data).cast("B")
        return int(data.size)

    def _retried(self, call: Callable[[], _T]) -> _T:
        try:
            return self.path.store.retried(call)
        except OSError as exc:
            raise OSError(self.path.store.explain(self.path, exc)) from None

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def open_object(path: ObjectPath) -> pa.NativeFile:
    """``path``'s raw bytes (not decompressed), random access, for Arrow."""
    return pa.PythonFile(ObjectFile(path), mode="r")


def readable(path: Path | ObjectPath) -> Any:
    """A local path as text (Arrow opens it, decompressing by extension), or an object's
    stream, decompressed by its key's extension: for the CSV and JSON-lines readers."""
    if isinstance(path, ObjectPath):
        codec = CODECS.get(path.suffix.lower())
        raw = open_object(path)
        return pa.CompressedInputStream(raw, codec) if codec else raw
    return os.fspath(path)


def seekable(path: Path | ObjectPath) -> Any:
    """A local path as text, or an object opened for random access: for Parquet."""
    return open_object(path) if isinstance(path, ObjectPath) else os.fspath(path)


def retrying_filesystem(store: ObjectStore, scheme: str = "s3") -> pafs.PyFileSystem:
    """``store``'s filesystem with its files opened as ``ObjectFile``s: for Arrow's
    datasets (``inspect`` of an output in a bucket), whose reads are then tried again too."""
    return pafs.PyFileSystem(_RetryingReads(store, scheme))


class _RetryingReads(pafs.FileSystemHandler):  # type: ignore[misc]
    """Everything as ``store``'s filesystem does it, but files opened as ``ObjectFile``."""

    def __init__(self, store: ObjectStore, scheme: str) -> None:
        self.store = store
        self.scheme = scheme

    def __reduce__(self) -> tuple[Any, ...]:
        return (_RetryingReads, (self.store, self.scheme))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RetryingReads) and other.store is self.store

    def __hash__(self) -> int:
        return id(self.store)

    @property
    def _fs(self) -> pafs.S3FileSystem:
        return self.store.filesystem

    def get_type_name(self) -> str:
        return "batchrunner-retrying-s3"

    def normalize_path(self, path: str) -> str:
        return str(self._fs.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return list(self._fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return list(self._fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to empty every bucket of the store")

    def delete_file(self, path: str) -> None:
        self._fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return open_object(self._locate(path))

    def open_input_file(self, path: str) -> pa.NativeFile:
        return open_object(self._locate(path))

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self._fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self._fs.open_append_stream(path, metadata=metadata)

    def _locate(self, path: str) -> ObjectPath:
        return self.store.locate(f"{self.scheme}://{path.lstrip('/')}")
