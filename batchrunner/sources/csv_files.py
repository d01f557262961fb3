"""CSV files: delimiters, headers, the schema guessed from the first block, streaming, counting.

Arrow reads the files one block (``block_bytes``) at a time on one thread, so that its
errors can name the line. Line numbers count records (header included, blank lines not),
which equals the line number unless the file has blank lines or values spanning lines. An
``id_column`` is always read as text, so that ``007`` stays ``007`` and 20-digit ids stay
exact. Types are pinned and widened as ``widening`` says.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv

from batchrunner.errors import InputError, clip, did_you_mean
from batchrunner.objectfiles import readable
from batchrunner.sources.batching import FileRows
from batchrunner.sources.columns import check_unique
from batchrunner.sources.encoding import UTF8, invalid_text
from batchrunner.sources.files import data_suffix
from batchrunner.sources.progress import ReadProgress
from batchrunner.sources.widening import (
    check_line_fits,
    log_widening,
    read_widening,
    widen_text,
)
from batchrunner.storage import InputPath

__all__ = [
    "CsvReader",
    "check_csv_headers",
    "check_csv_text",
    "csv_delimiters",
    "csv_schema",
    "read_csv_header",
]

_ESCAPED = re.compile("[\udc80-\udcff]")  # a byte surrogateescape kept: not valid text
_CSV_BAD_UTF8 = re.compile(
    r"In CSV column #(\d+): Row #(\d+): CSV conversion error to \w+: invalid UTF8"
)
_CSV_CONVERSION = re.compile(
    r"In CSV column #(\d+): Row #(\d+): CSV conversion error to (.+?): invalid value '(.*)'",
    re.DOTALL,
)


def csv_delimiters(
    paths: Sequence[InputPath], setting: str | None, tab_separated: bool
) -> dict[InputPath, str]:
    """Each file's delimiter: ``input.csv_delimiter``, else a tab for ``.tsv``, else a comma."""
    if setting is not None and len(setting) != 1:
        raise InputError(
            f"input.csv_delimiter must be one character, got {setting!r} (for tabs write '\\t')"
        )
    return {
        p: setting or ("\t" if tab_separated or data_suffix(p) == ".tsv" else ",") for p in paths
    }


def read_csv_header(path: InputPath, delimiter: str, encoding: str = UTF8) -> list[str] | None:
    """The column names on the file's first line; None for an empty file."""
    try:
        with (
            pa.input_stream(readable(path), compression="detect") as stream,
            io.TextIOWrapper(
                stream,
                encoding="utf-8-sig" if encoding == UTF8 else encoding,
                # Bad bytes further on are not the header's: they are found when read.
                errors="surrogateescape",
                newline="",
            ) as text,
        ):
            for row in csv.reader(text, delimiter=delimiter):
                if any(_ESCAPED.search(name) for name in row):
                    raise InputError(invalid_text(path, encoding, line=1))
                if row:
                    return row
    except (OSError, csv.Error, pa.ArrowInvalid) as exc:
        raise InputError(f"{path}: cannot read the CSV header: {exc}") from exc
    return None


def csv_schema(
    paths: list[InputPath],
    headers: dict[InputPath, list[str] | None],
    delimiters: dict[InputPath, str],
    id_column: str | None,
    block_bytes: int,
    encoding: str = UTF8,
) -> tuple[InputPath | None, pa.Schema]:
    """The schema Arrow infers from the first block of the first file with a header."""
    first = next((p for p in paths if headers[p] is not None), None)
    if first is None:
        return None, pa.schema([])
    bad_rows: list[Any] = []
    # The id is text whatever it looks like: "007" stays "007", long ids stay exact.
    types = {id_column: pa.string()} if id_column is not None else None
    try:
        with _open_csv(
            first, delimiters[first], block_bytes, bad_rows, encoding, column_types=types
        ) as reader:
            return first, reader.schema
    except UnicodeDecodeError as exc:
        raise InputError(invalid_text(first, encoding)) from exc
    except pa.ArrowInvalid as exc:
        check_line_fits(exc, first, block_bytes, row=None, first_line=2)
        message = f"{first}: cannot read as CSV: {exc}"
        raise InputError(_bad_row_or(message, first, bad_rows, delimiters[first])) from exc
    except OSError as exc:
        raise InputError(f"{first}: cannot read: {exc}") from exc


def check_csv_text(path: InputPath, schema: pa.Schema, names: list[str], encoding: str) -> None:
    """Raise an InputError for a read column Arrow inferred as binary: CSV holds text, so its
    first block holds bytes that are not valid ``encoding`` text (sent, they would go out as
    base64)."""
    for name in names:
        if pa.types.is_binary(schema.field(name).type):
            raise InputError(invalid_text(path, encoding, column=name))


def check_csv_headers(
    paths: list[InputPath],
    headers: dict[InputPath, list[str] | None],
    needed: list[str],
    first: InputPath,
) -> None:
    """Raise an InputError for the first file whose header lacks a ``needed`` column, or
    has one twice."""
    for path in paths:
        header = headers[path]
        if header is None:
            continue
        check_unique(header, needed, path)
        for name in needed:
            if name not in header:
                raise InputError(
                    f"{path}: no column {name!r} in the header, which {first} has; all files "
                    f"of one input need the same columns{did_you_mean(name, header)}"
                )


class CsvReader:
    """Reads CSV files as record batches of the read columns, in their pinned types.

    ``types`` maps each read column to its type (the schema's, at first); a value that does
    not fit widens it in place, for this and every later read.
    """

    def __init__(
        self,
        *,
        delimiters: dict[InputPath, str],
        headers: dict[InputPath, list[str] | None],
        types: dict[str, pa.DataType],
        block_bytes: int,
        encoding: str = UTF8,
        progress: ReadProgress | None = None,
    ) -> None:
        self._progress = progress
        self._delimiters = delimiters
        self._headers = headers
        self._types = types
        self._block_bytes = block_bytes
        self._encoding = encoding

    def read(self, path: InputPath, skip: int) -> FileRows:
        """(row number within the file, record batch), every row (``skip`` is ignored)."""
        bad_rows: list[Any] = []

        def open_reader() -> Any:
            if self._headers.get(path) is None:
                return None  # an empty file: no header, no rows
            bad_rows.clear()
            return _open_csv(
                path,
                self._delimiters[path],
                self._block_bytes,
                bad_rows,
                self._encoding,
                column_types=dict(self._types),
                include_columns=list(self._types),
                stream=None if self._progress is None else self._progress.open(path),
            )

        def widen(error: Exception, _rows: int) -> None:
            self._widen(path, error, bad_rows)

        gave_up = "column types kept changing while reading; giving up"
        return read_widening(
            path,
            len(self._types),
            open_reader,
            widen,
            gave_up,
            encoding=self._encoding,
            block_bytes=self._block_bytes,
            first_line=2,
        )

    def _widen(self, path: InputPath, exc: Exception, bad_rows: list[Any]) -> None:
        """Widen the column a conversion error names, or raise the error as an InputError."""
        if bad_rows:
            raise InputError(_bad_csv_row(path, bad_rows[0], self._delimiters[path])) from exc
        header = self._headers.get(path) or []
        bad_text = _CSV_BAD_UTF8.search(str(exc))
        if bad_text is not None:
            index = int(bad_text[1])
            column = header[index] if index < len(header) else f"#{index + 1}"
            at = int(bad_text[2])
            raise InputError(invalid_text(path, self._encoding, line=at, column=column)) from exc
        match = _CSV_CONVERSION.search(str(exc))
        name = header[int(match[1])] if match and int(match[1]) < len(header) else None
        if match is None or name not in self._types:
            raise InputError(f"{path}: {exc}") from exc
        line, value = match[2], match[4]
        current = self._types[name]
        widened = widen_text(current, value)
        if widened is None:
            raise InputError(
                f"{path}, line {line}: column {name!r} holds {clip(value)!r}, which cannot "
                f"be read as {current} like the rows before it; fix the value"
            ) from exc
        log_widening(path, f"line {line}", name, value, current, widened)
        self._types[name] = widened

    def count(self, path: InputPath) -> int:
        """The file's number of rows, read through."""
        header = self._headers.get(path)
        if not header:
            return 0
        bad_rows: list[Any] = []
        delimiter = self._delimiters[path]
        rows: int | None = None  # None: the first block is not read yet
        try:
            # One column, read as text: nothing to convert, nothing that can fail to convert.
            with _open_csv(
                path,
                delimiter,
                self._block_bytes,
                bad_rows,
                self._encoding,
                column_types={header[0]: pa.string()},
                include_columns=[header[0]],
            ) as reader:
                rows = 0
                for batch in reader:
                    rows += batch.num_rows
                return rows
        except UnicodeDecodeError as exc:
            raise InputError(invalid_text(path, self._encoding)) from exc
        except pa.ArrowInvalid as exc:
            check_line_fits(exc, path, self._block_bytes, row=rows, first_line=2)
            bad_text = _CSV_BAD_UTF8.search(str(exc))
            if bad_text is not None and not bad_rows:
                line, column = int(bad_text[2]), header[int(bad_text[1])]
                raise InputError(
                    invalid_text(path, self._encoding, line=line, column=column)
                ) from exc
            raise InputError(_bad_row_or(f"{path}: {exc}", path, bad_rows, delimiter)) from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc}") from exc


def _open_csv(
    path: InputPath,
    delimiter: str,
    block_bytes: int,
    bad_rows: list[Any],
    encoding: str,
    *,
    column_types: dict[str, pa.DataType] | None = None,
    include_columns: list[str] | None = None,
    stream: Any = None,
) -> Any:
    def record(row: Any) -> str:
        bad_rows.append(row)
        return "error"

    return pcsv.open_csv(
        readable(path) if stream is None else stream,
        # One thread: Arrow then numbers the rows, so that errors can name the line.
        # "utf8", Arrow's own name: read as it is, not transcoded; bad bytes are then found
        # by Arrow's checks (see check_csv_text and CsvReader._widen).
        read_options=pcsv.ReadOptions(
            use_threads=False,
            block_size=block_bytes,
            encoding="utf8" if encoding == UTF8 else encoding,
        ),
        parse_options=pcsv.ParseOptions(
            delimiter=delimiter, newlines_in_values=True, invalid_row_handler=record
        ),
        convert_options=pcsv.ConvertOptions(
            column_types=column_types or {}, include_columns=include_columns or []
        ),
    )


def _bad_row_or(message: str, path: InputPath, bad_rows: list[Any], delimiter: str) -> str:
    """The first bad row's message when Arrow failed on one, else ``message``; a row Arrow
    could not even decode for its handler (bad text in it) is told from Arrow's error."""
    if bad_rows:
        return _bad_csv_row(path, bad_rows[0], delimiter)
    ragged = _CSV_RAGGED.search(message)
    if ragged is None:
        return message
    line, expected, actual, text = ragged.groups()
    return (
        f"{path}, line {line}: expected {expected} columns, got {actual}: {clip(text)!r}, "
        f"and text in it is not valid utf-8; fix the line (a value holding "
        f"{delimiter!r} must be quoted)"
    )


# Arrow's message for a row with too many or too few fields (its line, counting the header).
_CSV_RAGGED = re.compile(r"Row #(\d+): Expected (\d+) columns, got (\d+): (.*)", re.DOTALL)


def _bad_csv_row(path: InputPath, row: Any, delimiter: str) -> str:
    where = f"{path}, line {row.number}" if row.number is not None else str(path)
    return (
        f"{where}: expected {row.expected_columns} columns, got {row.actual_columns}: "
        f"{clip(row.text)!r}; fix the line (a value holding {delimiter!r} must be quoted)"
    )
