"""Text encodings of CSV and JSON-lines input: other encodings read right, bad text refused.

Text input is UTF-8 unless ``input.encoding`` says otherwise (``latin-1``, ``gbk``,
``utf-16``, any name Python's codecs know). Arrow transcodes another encoding as it reads
(``ReadOptions.encoding`` for CSV, ``transcoding_input_stream`` for JSON lines). Text that
is not valid in the input's encoding is never sent in some other form: Arrow's CSV reader
reads a column of such bytes as binary (which would go out as base64) and its JSON reader
replaces them with U+FFFD, so batchrunner checks, and ``invalid_text`` names the line and
the byte that is wrong. In UTF-8 JSON lines, a U+FFFD in what Arrow read
(``has_replacement``, one vectorized pass over the text) makes batchrunner read the file
again to look for bad bytes: a U+FFFD that is in the file is let through.
"""

from __future__ import annotations

import codecs
import io
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import InputError
from batchrunner.objectfiles import readable
from batchrunner.storage import InputPath

__all__ = [
    "UTF8",
    "check_encoding",
    "find_invalid_text",
    "has_replacement",
    "invalid_text",
    "open_text",
]

UTF8 = "utf-8"


def check_encoding(name: str) -> str:
    """The codec's canonical name for ``input.encoding``, or an InputError naming it."""
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise InputError(
            f"input.encoding: unknown encoding {name!r}; use a name such as 'utf-8', "
            "'latin-1', 'cp1252', 'gbk' or 'utf-16'"
        ) from None


def _bytes_of(path: InputPath) -> Any:
    """``path``'s bytes as a stream (decompressed if its name says so; a file or an object)."""
    source = readable(path)
    return pa.input_stream(source, compression="detect") if isinstance(source, str) else source


def open_text(path: InputPath, encoding: str, stream: Any = None) -> Any:
    """``path`` (decompressed if its name says so; a file or an object) as UTF-8 bytes:
    transcoded from ``encoding`` (a ``UnicodeDecodeError`` at bytes not valid in it), or as
    it is. ``stream``: ``path``'s bytes, already opened (see ``progress``)."""
    if stream is None:
        stream = _bytes_of(path)
    if encoding != UTF8:
        return pa.transcoding_input_stream(stream, encoding, UTF8)
    return stream


def has_replacement(batch: pa.RecordBatch) -> bool:
    """Whether any text in ``batch`` (nested too) or its field names holds U+FFFD, the
    character Arrow's JSON reader puts in place of bytes that are not UTF-8: a sign worth
    reading the file again for (``find_invalid_text``). One vectorized pass per text column."""
    if any(REPLACEMENT in name for name in batch.schema.names):
        return True
    return any(_array_has_replacement(column) for column in batch.columns)


REPLACEMENT = "\ufffd"


def _array_has_replacement(array: pa.Array) -> bool:
    kind = array.type
    types = pa.types
    if types.is_string(kind) or types.is_large_string(kind):
        return bool(pc.any(pc.match_substring(array, REPLACEMENT)).as_py())
    if types.is_struct(kind):
        if any(REPLACEMENT in field.name for field in kind):
            return True
        return any(_array_has_replacement(child) for child in array.flatten())
    if types.is_list(kind) or types.is_large_list(kind):
        return _array_has_replacement(array.flatten())
    return False


def find_invalid_text(
    path: InputPath, encoding: str, *, limit: int | None = None
) -> tuple[int, int, bytes] | None:
    """The first line of ``path`` that is not valid ``encoding`` text: (line number from 1,
    byte column from 1, the bytes that are wrong); None when every line is valid.

    Reads the file a line at a time (up to about ``limit`` bytes, when given): after a read
    failed, to say where, or on a first block. Decoded in large pieces first (Python's C
    codec, GB/s); a line at a time only when a piece is found wrong.
    """
    if _valid(path, encoding, limit):
        return None
    if encoding.startswith(("utf-16", "utf-32")):  # a line is not a run of bytes to \n
        with _bytes_of(path) as stream:
            try:
                codecs.decode(stream.read(), encoding)
            except UnicodeDecodeError as exc:
                return 1, exc.start + 1, exc.object[exc.start : exc.end]
        return None
    with io.BufferedReader(_bytes_of(path)) as lines:
        seen = 0
        for number, line in enumerate(lines, start=1):
            seen += len(line)
            if limit is not None and seen > limit:
                break
            try:
                codecs.decode(line, encoding)
            except UnicodeDecodeError as exc:
                return number, exc.start + 1, exc.object[exc.start : exc.end]
    return None


def _valid(path: InputPath, encoding: str, limit: int | None) -> bool:
    decoder = codecs.getincrementaldecoder(encoding)()
    read = 0
    with _bytes_of(path) as stream:
        while True:
            piece = stream.read(1 << 20)
            read += len(piece)
            try:
                decoder.decode(piece, final=not piece)
            except UnicodeDecodeError:
                return False
            if not piece or (limit is not None and read >= limit):
                return True


def invalid_text(
    path: InputPath, encoding: str, *, line: int | None = None, column: str | None = None
) -> str:
    """The message for a file holding text that is not valid ``encoding``: the line (found
    by reading the file again when not given), the CSV ``column`` if known, the wrong bytes,
    and what to do."""
    wrong = ""
    if line is None:
        found = find_invalid_text(path, encoding)
        if found is not None:
            line, byte, bad = found
            wrong = f" (byte {byte}: {bad.hex(' ')})"
    place = "" if line is None else f", line {line}"
    if column is not None:
        place += f", column {column!r}"
    return f"{path}{place}: text that is not valid {encoding}{wrong}; " + (
        "if the file is in another encoding, say which with input.encoding (e.g. "
        "'latin-1', 'cp1252', 'gbk', 'utf-16'), else fix the line"
        if encoding == UTF8
        else f"check input.encoding ({encoding!r}) or fix the line"
    )
