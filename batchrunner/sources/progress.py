"""How far a CSV or JSON-lines read has gone, in bytes: the row count's estimate while the
exact count is not known (a text file's rows are known only once it is read through).

Arrow reads each file through a ``_CountingFile`` that counts the file's own bytes (before
decompression, so that they compare with its size); ``ReadProgress`` keeps the files' sizes
and, per file, the rows Arrow parsed from them. The rows parsed, scaled by the input's size
over the bytes read, estimate its rows: progress lines then show a total and an ETA while
the service, not the reading, is the bottleneck.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchrunner.objectfiles import CODECS, open_object
from batchrunner.storage import InputPath, ObjectPath

__all__ = ["ReadProgress"]


class ReadProgress:
    """Bytes read of a list of files, and rows parsed from them (see the module's doc).

    Arrow reads ahead of what it has parsed (tens of blocks), so the bytes that count are
    those of the blocks parsed: each read Arrow makes is one block (``block_size`` bytes of
    text), and each record batch it yields is one block parsed. The text's position at the
    end of each block read is noted (``_marks``); the position after the last block parsed
    is how far the rows counted reach.
    """

    def __init__(self, paths: Sequence[InputPath]) -> None:
        self._offsets: dict[InputPath, int] = {}
        total = 0
        for path in paths:
            self._offsets[path] = total
            total += _size(path)
        self.total_bytes = total
        self._path: InputPath | None = None  # the file being read
        self._marks: list[int] = []  # its position at the end of each block read
        self._blocks = 0  # its blocks parsed
        self._blocks_stream: _Blocks
        self._rows = 0  # its rows parsed
        self._rows_before = 0  # rows of the files before it

    def open(self, path: InputPath) -> Any:
        """``path``'s bytes for Arrow (decompressed if its name says so), counted as read."""
        if path != self._path:
            if self._path is not None:
                self._rows_before += self._rows
            self._path, self._rows = path, 0
        self._marks, self._blocks = [], 0  # (a re-read starts the file again)
        raw = _CountingFile(
            open_object(path) if isinstance(path, ObjectPath) else pa.OSFile(os.fspath(path))
        )
        codec = CODECS.get(Path(os.fspath(path)).suffix.lower())
        text = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), codec) if codec else raw
        self._blocks_stream = _Blocks(text, raw, self._marks)
        return pa.PythonFile(self._blocks_stream, mode="r")

    def _reached(self) -> int:
        """The file's bytes the parsed blocks came from: the text's position after the last
        block parsed; for a compressed file scaled by the compression seen so far (the
        decompressor reads the file in chunks of its own)."""
        text = self._marks[min(self._blocks, len(self._marks)) - 1]
        stream = self._blocks_stream
        if stream.compressed and stream.text_position:
            return round(text * stream.raw.position / stream.text_position)
        return text

    def parsed(self, path: InputPath, rows: int) -> None:
        """Arrow parsed one more block of ``path``; ``rows`` of it are parsed so far."""
        if path == self._path:
            self._blocks += 1
            self._rows = max(self._rows, rows)

    def estimated_rows(self) -> int | None:
        """The input's rows, extrapolated from the bytes parsed; None before any was."""
        if self._path is None or not self._blocks or not self._marks:
            return None
        reached = self._offsets[self._path] + self._reached()
        rows = self._rows_before + self._rows
        if not rows or not reached:
            return None
        if reached >= self.total_bytes:
            return rows
        return round(rows * self.total_bytes / reached)


class _CountingFile(io.RawIOBase):
    """A file's bytes, passed through, counting them (``position``)."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        size = len(data)
        buffer[:size] = data
        self.position += size
        return size

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Blocks(io.RawIOBase):
    """The text Arrow reads, one block a call: after each, the text's position is noted."""

    def __init__(self, text: Any, raw: _CountingFile, marks: list[int]) -> None:
        super().__init__()
        self._text = text
        self.raw = raw
        self.compressed = text is not raw
        self.text_position = 0
        self._marks = marks

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.compressed:
            data = self._text.read(len(buffer))
            size = len(data)
            buffer[:size] = data
        else:
            size = self.raw.readinto(buffer)
        if size:
            self.text_position += size
            self._marks.append(self.text_position)
        return size

    def close(self) -> None:
        self._text.close()
        super().close()


def _size(path: InputPath) -> int:
    if isinstance(path, ObjectPath):
        return path.stat().st_size
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
