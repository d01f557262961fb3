"""Column types of CSV and JSON lines: pinned from the first block, widened when a value won't fit.

Arrow guesses the types of a text format from the first block it reads; batchrunner then
pins them for every later block and file, so that all batches share one schema. When a later
value does not fit its column, the column is widened to the narrowest type that holds it
(null -> the value's type, int -> float -> text, timestamp -> finer timestamp -> text), a
warning is logged, and the file is read again from its start, skipping the rows already
handed out (``read_widening``). What a value widens to is decided by pure functions:
``widen_text`` for a CSV text, ``widen_value`` for a parsed JSON value. JSON numbers and
text (or objects and scalars) in one field have no common Arrow type: no widening, an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import InputError, clip
from batchrunner.sources.batching import FileRows
from batchrunner.sources.encoding import UTF8, invalid_text
from batchrunner.storage import InputPath

__all__ = [
    "castable",
    "check_line_fits",
    "describe_type",
    "describe_value",
    "log_widening",
    "read_widening",
    "widen_text",
    "widen_value",
]

# The tabular source's logger: one name to configure, whichever of its modules logs.
logger = logging.getLogger("batchrunner.sources.tabular")


# -- a line longer than the read block ----------------------------------------------------

_STRADDLING = "straddling object straddles two block boundaries"


def check_line_fits(
    error: Exception, path: InputPath, block_bytes: int, *, row: int | None, first_line: int
) -> None:
    """Raise an InputError naming the setting when ``error`` is Arrow's "straddling object"
    (a line longer than the read block). ``row``: the rows of the file read before it (None:
    while the first block was sampled); ``first_line``: the file's line of its first row."""
    if _STRADDLING not in str(error):
        return
    size = _mib(block_bytes)
    if row is None:
        where = f"{path}: a line in the first {size} is longer than input.block_size ({size})"
    else:
        where = (
            f"{path}, row {row + 1} (line {row + first_line}): the line is longer than "
            f"input.block_size ({size}), the most that is read at once"
        )
    raise InputError(
        f"{where}; set input.block_size above the longest line's size (in bytes, e.g. "
        f"block_size = {block_bytes * 4} in [input], or --set input.block_size={block_bytes * 4})"
    ) from error


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB" if size >= 1 << 20 else f"{size / 1024:g} KiB"


# -- reading a file again, wider ----------------------------------------------------------


class _RowCounter:
    """Rows a reader has produced, readable after it failed."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows = 0


class _Handed(Exception):
    """A reader failed after handing out ``rows`` rows of its file (internal)."""

    def __init__(self, rows: int, cause: Exception) -> None:
        super().__init__(str(cause))
        self.rows = rows
        self.cause = cause


def read_widening(
    path: InputPath,
    columns: int,
    open_reader: Callable[[], Any],
    widen: Callable[[Exception, int], None],
    gave_up: str,
    *,
    encoding: str = UTF8,
    block_bytes: int,
    first_line: int,
) -> FileRows:
    """Stream one file, widening its column types and reading it again while values don't fit.

    ``open_reader()`` opens the file with the current types (None: the file has no rows).
    When reading fails, ``widen(error, rows)`` widens what ``error`` is about (``rows``: the
    rows this attempt read before it) or raises an ``InputError``; the file is then read again
    and the rows already handed out are skipped. ``columns`` bounds the attempts (a column
    widens a few times at most); past them the error says ``gave_up``. A line longer than
    ``block_bytes`` is an error naming its row and line (``first_line``: the first row's).
    """
    handed_out = 0  # rows of this file already yielded, kept across re-reads
    for _attempt in range(4 * columns + 2):
        counter = _RowCounter()
        reader = None
        try:
            reader = open_reader()
            if reader is None:
                return
            yield from _rows_after(reader, handed_out, counter)
            return
        except _Handed as handed:
            handed_out = handed.rows
            check_line_fits(
                handed.cause, path, block_bytes, row=counter.rows, first_line=first_line
            )
            widen(handed.cause, counter.rows)
        except pa.ArrowInvalid as exc:
            check_line_fits(exc, path, block_bytes, row=counter.rows, first_line=first_line)
            widen(exc, counter.rows)
        except UnicodeDecodeError as exc:  # transcoding, or checking UTF-8 (see encoding)
            raise InputError(invalid_text(path, encoding)) from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc}") from exc
        finally:
            if reader is not None:
                reader.close()
    raise InputError(f"{path}: {gave_up}")


def _rows_after(reader: Any, handed_out: int, counter: _RowCounter) -> FileRows:
    """The reader's batches past the first ``handed_out`` rows (those went out before a
    re-read), numbered within the file. A read error becomes ``_Handed`` carrying how many
    rows went out, so the re-read can skip them."""
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:
            raise _Handed(max(handed_out, counter.rows), exc) from exc
        file_row = counter.rows
        counter.rows += batch.num_rows
        if counter.rows <= handed_out:
            continue
        if file_row < handed_out:
            batch = batch.slice(handed_out - file_row)
            file_row = handed_out
        yield file_row, batch


def log_widening(
    path: InputPath, where: str, name: str, value: Any, old: pa.DataType, new: pa.DataType
) -> None:
    """Warn that column ``name`` is read as ``new`` from here on (``where``: the line)."""
    logger.warning(
        "%s, %s: column %r holds %s, which the type read so far (%s) cannot hold; "
        "reading the column as %s from here on (this re-reads the file once)",
        path,
        where,
        name,
        clip(repr(value)),
        old,
        new,
    )


# -- what a value widens to ---------------------------------------------------------------


def widen_text(current: pa.DataType, value: str) -> pa.DataType | None:
    """The narrowest type wider than ``current`` that can read the CSV text ``value``."""
    if pa.types.is_null(current):
        candidates = [pa.int64(), pa.float64(), pa.string()]
    elif pa.types.is_integer(current):
        candidates = [pa.float64(), pa.string()]
    elif pa.types.is_timestamp(current) and current.unit != "ns":
        candidates = [pa.timestamp("ns", current.tz), pa.string()]
    elif pa.types.is_string(current) or pa.types.is_large_string(current):
        candidates = []  # text holds any text; bytes that are not text are an error
    elif pa.types.is_binary(current):
        candidates = []
    else:
        candidates = [pa.string()]
    for candidate in candidates:
        if castable([value], pa.string(), candidate):
            return candidate
    return None


def castable(values: list[Any], source: pa.DataType, target: pa.DataType) -> bool:
    """Whether Arrow casts ``values`` of type ``source`` to ``target`` (none: the types)."""
    try:
        pc.cast(pa.array(values, source), target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def widen_value(current: pa.DataType, value: Any) -> pa.DataType | None:
    """The type a JSON column of type ``current`` needs to also hold ``value``; None when
    no Arrow type holds both (numbers and text, objects and scalars)."""
    if value is None:
        return current
    if pa.types.is_null(current):
        return _json_value_type(value)
    if isinstance(value, bool):
        return current if pa.types.is_boolean(current) else None
    if isinstance(value, int):
        return current if pa.types.is_integer(current) or pa.types.is_floating(current) else None
    if isinstance(value, float):
        if pa.types.is_floating(current):
            return current
        return pa.float64() if pa.types.is_integer(current) else None
    if isinstance(value, str):
        if pa.types.is_string(current) or pa.types.is_large_string(current):
            return current
        if pa.types.is_timestamp(current) or pa.types.is_date(current):
            return current if castable([value], pa.string(), current) else pa.string()
        return None
    if isinstance(value, list) and (pa.types.is_list(current) or pa.types.is_large_list(current)):
        item: pa.DataType | None = current.value_type
        for element in value:
            item = widen_value(item, element)
            if item is None:
                return None
        return current if item == current.value_type else pa.list_(item)
    if isinstance(value, dict) and pa.types.is_struct(current):
        fields = []
        for field in current:
            widened = widen_value(field.type, value.get(field.name))
            if widened is None:
                return None
            fields.append(pa.field(field.name, widened))
        widened_struct = pa.struct(fields)
        return current if widened_struct == current else widened_struct
    return None


def _json_value_type(value: Any) -> pa.DataType | None:
    try:
        return pa.array([value]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None


# -- saying what a column or value holds --------------------------------------------------


def describe_type(kind: pa.DataType) -> str:
    """What a column of type ``kind`` holds, in words: "numbers", "text", "objects"..."""
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return "numbers"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    if pa.types.is_boolean(kind):
        return "true/false"
    if pa.types.is_struct(kind):
        return "objects"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return "arrays"
    return str(kind)


def describe_value(value: Any) -> str:
    """A parsed JSON value's kind and (clipped) text: ``a number (2.5)``."""
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "text"}
    kind = kinds.get(type(value), "an object" if isinstance(value, dict) else "an array")
    if value is None:
        kind = "null"
    return f"{kind} ({clip(orjson.dumps(value).decode())})"
