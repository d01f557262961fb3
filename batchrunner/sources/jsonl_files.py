"""JSON-lines files: the schema guessed from the first block, streaming, counting, bad lines.

Arrow parses the files block by block but cannot say which line it failed on; when it fails,
``scan_jsonl`` reads the file again line by line to name the line, and to find the fields
whose type must widen (see ``widening``). Fields that first appear after the first block are
not read: the schema is the first block's.
"""

from __future__ import annotations

import io
import re
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.json as pjson

from batchrunner.errors import InputError
from batchrunner.sources.batching import FileRows
from batchrunner.sources.encoding import (
    UTF8,
    find_invalid_text,
    has_replacement,
    invalid_text,
    open_text,
)
from batchrunner.sources.progress import ReadProgress
from batchrunner.sources.widening import (
    check_line_fits,
    describe_type,
    describe_value,
    log_widening,
    read_widening,
    widen_value,
)
from batchrunner.storage import InputPath

__all__ = ["JsonlReader", "jsonl_schema", "scan_jsonl"]

_ORJSON_POSITION = re.compile(r": line \d+ column (\d+) \(char \d+\)$")
_EMPTY_JSON = "Empty JSON stream"
_COUNT_FIELD = "\x00batchrunner-count"  # a field no row has: JSON rows counted, nothing built


def jsonl_schema(
    paths: list[InputPath], block_bytes: int, encoding: str = UTF8
) -> tuple[InputPath | None, pa.Schema]:
    """The schema Arrow infers from the first block of the first file with a row."""
    for path in paths:
        try:
            with _open_jsonl(path, block_bytes, None, encoding) as reader:
                schema = reader.schema
                if encoding == UTF8 and find_invalid_text(path, UTF8, limit=block_bytes):
                    raise InputError(invalid_text(path, encoding))
                return path, schema
        except UnicodeDecodeError as exc:
            raise InputError(invalid_text(path, encoding)) from exc
        except pa.ArrowInvalid as exc:
            if _EMPTY_JSON in str(exc):
                continue
            check_line_fits(exc, path, block_bytes, row=None, first_line=1)
            scan_jsonl(path, 0, None, encoding)  # raises with the line, if it is a line's fault
            raise InputError(f"{path}: cannot read JSON lines: {exc}") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc}") from exc
    return None, pa.schema([])


class JsonlReader:
    """Reads JSON-lines files as record batches of the read columns, in their pinned types.

    ``types`` maps each read column to its type (the schema's, at first); a value that does
    not fit widens it in place, for this and every later read.
    """

    def __init__(
        self,
        *,
        types: dict[str, pa.DataType],
        block_bytes: int,
        encoding: str = UTF8,
        progress: ReadProgress | None = None,
    ) -> None:
        self._progress = progress
        self._types = types
        self._block_bytes = block_bytes
        self._encoding = encoding

    def read(self, path: InputPath, skip: int) -> FileRows:
        """(row number within the file, record batch), every row (``skip`` is ignored)."""

        def open_reader() -> Any:
            schema = pa.schema([pa.field(name, kind) for name, kind in self._types.items()])
            try:
                stream = None if self._progress is None else self._progress.open(path)
                return _open_jsonl(path, self._block_bytes, schema, self._encoding, stream)
            except pa.ArrowInvalid as exc:
                if _EMPTY_JSON in str(exc):
                    return None
                raise

        def widen(error: Exception, rows: int) -> None:
            self._widen(path, error, rows)

        gave_up = "field types kept changing while reading; giving up"
        rows = read_widening(
            path,
            len(self._types),
            open_reader,
            widen,
            gave_up,
            encoding=self._encoding,
            block_bytes=self._block_bytes,
            first_line=1,
        )
        return rows if self._encoding != UTF8 else self._checked(path, rows)

    def _checked(self, path: InputPath, rows: FileRows) -> FileRows:
        """``rows``, refused at the first batch Arrow read bad UTF-8 into (as U+FFFD)."""
        checked = False  # the file was read again and holds U+FFFD itself: no more checks
        try:
            for file_row, batch in rows:
                if not checked and has_replacement(batch):
                    if find_invalid_text(path, UTF8) is not None:
                        raise InputError(invalid_text(path, UTF8))
                    checked = True
                yield file_row, batch
        finally:
            rows.close()

    def _widen(self, path: InputPath, exc: Exception, read_rows: int) -> None:
        """Find the line Arrow failed on; widen its fields or raise an InputError naming it."""
        found = scan_jsonl(path, read_rows, dict(self._types), self._encoding)
        if found is None:
            raise InputError(f"{path}: cannot read JSON lines: {exc}") from exc
        line, widenings = found
        for name, widened, value in widenings:
            log_widening(path, f"line {line}", name, value, self._types[name], widened)
            self._types[name] = widened

    def count(self, path: InputPath) -> int:
        """The file's number of rows, read through."""
        rows: int | None = None  # None: the first block is not read yet
        try:
            schema = pa.schema([(_COUNT_FIELD, pa.null())])
            with _open_jsonl(path, self._block_bytes, schema, self._encoding) as reader:
                rows = 0
                for batch in reader:
                    rows += batch.num_rows
                return rows
        except UnicodeDecodeError as exc:
            raise InputError(invalid_text(path, self._encoding)) from exc
        except pa.ArrowInvalid as exc:
            if _EMPTY_JSON in str(exc):
                return 0
            check_line_fits(exc, path, self._block_bytes, row=rows, first_line=1)
            scan_jsonl(path, 0, {}, self._encoding)  # raises with the line, if it is a line's fault
            raise InputError(f"{path}: cannot read JSON lines: {exc}") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc}") from exc


def scan_jsonl(
    path: InputPath, start_row: int, types: dict[str, pa.DataType] | None, encoding: str = UTF8
) -> tuple[int, list[tuple[str, pa.DataType, Any]]] | None:
    """Read the file line by line from row ``start_row`` (only after Arrow failed on it).

    Raises InputError for the first line that is not a JSON object, or whose field cannot
    join its column. Returns the first line with fields that need a wider type than
    ``types`` gives them: (line, [(field, wider type, value), ...]). With ``types=None``,
    types are inferred from the rows as they come (Arrow failed while inferring).
    """
    inferring = types is None
    known: dict[str, pa.DataType] = {} if types is None else dict(types)
    try:
        return _scan_lines(path, start_row, known, inferring, encoding)
    except UnicodeDecodeError as exc:
        raise InputError(invalid_text(path, encoding)) from exc


def _scan_lines(
    path: InputPath, start_row: int, known: dict[str, pa.DataType], inferring: bool, encoding: str
) -> tuple[int, list[tuple[str, pa.DataType, Any]]] | None:
    row = 0
    with io.BufferedReader(open_text(path, encoding)) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row += 1
            if row <= start_row:
                continue
            record = _parse_line(path, number, line)
            widenings = []
            for name in record if inferring else known:
                current = known.get(name, pa.null())
                value = record.get(name)
                widened = widen_value(current, value)
                if widened is None:
                    raise InputError(
                        f"{path}, line {number}: field {name!r} holds {describe_value(value)} "
                        f"here but {describe_type(current)} in earlier lines; one field needs "
                        f"one kind of value: make them agree (e.g. write them all as text)"
                    )
                if widened != current:
                    widenings.append((name, widened, value))
                    known[name] = widened
            if widenings and not inferring:
                return number, widenings
    return None


def _parse_line(path: InputPath, number: int, line: bytes) -> dict[str, Any]:
    """Line ``number`` as a JSON object, or an InputError that says how to fix it."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        position = _ORJSON_POSITION.sub(r" at column \1", str(exc))
        hint = (
            "; this looks like one JSON document, not JSON lines: convert it with "
            "`jq -c '.[]' IN.json > OUT.jsonl`"
            if number == 1 and line.lstrip().startswith(b"[")
            else "; JSON lines needs one whole object per line"
        )
        raise InputError(f"{path}, line {number}: not valid JSON ({position}){hint}") from None
    if not isinstance(record, dict):
        raise InputError(
            f"{path}, line {number}: expected a JSON object, got "
            f"{describe_value(record)}; JSON lines needs one object per line"
            + (
                " (a JSON array file converts with `jq -c '.[]' IN.json > OUT.jsonl`)"
                if isinstance(record, list)
                else ""
            )
        )
    return record


def _open_jsonl(
    path: InputPath,
    block_bytes: int,
    schema: pa.Schema | None,
    encoding: str,
    stream: Any = None,
) -> Any:
    """Arrow's streaming JSON reader over ``path`` (or ``stream``, its bytes, if given)."""
    parse = (
        pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        if schema is not None
        else pjson.ParseOptions()
    )
    return pjson.open_json(
        open_text(path, encoding, stream),
        # Errors are located by scan_jsonl, not by Arrow. (The streaming reader parses on
        # one thread whatever use_threads says.)
        read_options=pjson.ReadOptions(use_threads=True, block_size=block_bytes),
        parse_options=parse,
    )
