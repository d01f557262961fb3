"""Tabular input: CSV, Parquet and JSON lines, checked at open, then streamed as ``Batch``es.

This module owns ``open_tabular``, which puts the pieces together, and ``TabularSource``:

- ``open_tabular`` finds the files and their format (``files``), reads the schema (from the
  first file: ``csv_files``, ``parquet_files``, ``jsonl_files``) and checks, before anything
  is sent, that the columns the job names exist in every file (``columns``);
- ``TabularSource`` streams the files with the reader of their format, as Arrow record
  batches, never a whole file in memory; turns the rows into chunks of JSON-safe rows
  (``jsonsafe``), kept input and keys; and cuts them into batches of exactly ``size`` rows,
  across reader blocks and files (``batching``);
- the row keys: ``input.id_column`` as text, or the 0-based row number across the input.

Types of CSV and JSON-lines columns are guessed from the first block (``block_bytes``, 4 MiB)
of the first non-empty file, then pinned for every later block and file, and widened when a
later value does not fit (``widening``). Batches handed out before a widening keep the
narrower type (the JSON sent is right either way; ``kept`` columns may change type once,
e.g. int64 -> double).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import InputError
from batchrunner.items import Batch, KeyedRows
from batchrunner.sources.batching import CHUNK_ROWS, Chunk, FileRows, cut_batches, row_number_texts
from batchrunner.sources.columns import check_unique, read_columns, send_columns
from batchrunner.sources.csv_files import (
    CsvReader,
    check_csv_headers,
    check_csv_text,
    csv_delimiters,
    csv_schema,
    read_csv_header,
)
from batchrunner.sources.encoding import UTF8, check_encoding
from batchrunner.sources.files import (
    COMPRESSIONS,
    FORMATS,
    common_format,
    find_files,
    format_of,
    format_setting,
)
from batchrunner.sources.jsonl_files import JsonlReader, jsonl_schema
from batchrunner.sources.jsonsafe import json_safe
from batchrunner.sources.parquet_files import ParquetReader, check_parquet_files, parquet_schema
from batchrunner.sources.progress import ReadProgress
from batchrunner.storage import InputPath, ObjectStore

__all__ = [
    "BINARY_BASE64",
    "BINARY_REFUSE",
    "COMPRESSIONS",
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_PARQUET_BATCH_ROWS",
    "FORMATS",
    "TabularSource",
    "json_safe",
    "open_tabular",
]

DEFAULT_BLOCK_BYTES = 4 << 20  # CSV / JSON lines: bytes per read block (and the type sample)
DEFAULT_PARQUET_BATCH_ROWS = 65_536
BINARY_REFUSE = "refuse"  # input.binary: a sent column of bytes is an error
BINARY_BASE64 = "base64"  # ... or goes out as base64 text


class _FileReader(Protocol):
    """What a format's reader does for ``TabularSource``."""

    def read(self, path: InputPath, skip: int) -> FileRows:
        """(row number within the file, record batch) with the read columns, in order.

        ``skip`` is a hint: readers may drop rows before it cheaply (Parquet row groups) but
        may also yield them; the caller cuts.
        """
        ...

    def count(self, path: InputPath) -> int:
        """The file's number of rows."""
        ...


class TabularSource:
    """A CSV, Parquet or JSON-lines input, checked and ready to stream as ``Batch``es.

    Made by ``open_tabular``. Holds no file open between calls: each ``iter_batches`` opens
    and closes its own readers, so a source can be iterated again (e.g. to resume).
    """

    def __init__(
        self,
        *,
        paths: list[InputPath],
        format: str,
        schema: pa.Schema,
        send_columns: list[str],
        id_column: str | None,
        keep_input: bool,
        delimiters: dict[InputPath, str],
        headers: dict[InputPath, list[str] | None],
        file_rows: dict[InputPath, int],
        block_bytes: int,
        parquet_batch_rows: int,
        encoding: str = UTF8,
    ) -> None:
        self.paths = paths
        self.format = format
        self.schema = schema
        self.send_columns = send_columns
        self.id_column = id_column
        self.keep_input = keep_input
        self._file_rows = file_rows  # Parquet: rows per file, from the footers
        # The type each read column is read as; CSV / JSON lines may widen it mid-stream.
        types = {
            name: schema.field(name).type
            for name in read_columns(schema, send_columns, id_column, keep_input)
        }
        self._reader: _FileReader
        # CSV / JSON lines: bytes read against the files' sizes estimate the row count.
        self._progress = None if format == "parquet" else ReadProgress(paths)
        if format == "parquet":
            self._reader = ParquetReader(
                schema=pa.schema([pa.field(name, kind) for name, kind in types.items()]),
                batch_rows=parquet_batch_rows,
                file_rows=file_rows,
            )
        elif format == "csv":
            self._reader = CsvReader(
                delimiters=delimiters,
                headers=headers,
                types=types,
                block_bytes=block_bytes,
                encoding=encoding,
                progress=self._progress,
            )
        else:
            self._reader = JsonlReader(
                types=types, block_bytes=block_bytes, encoding=encoding, progress=self._progress
            )

    def __repr__(self) -> str:
        first = self.paths[0] if self.paths else None
        return (
            f"TabularSource(format={self.format!r}, files={len(self.paths)}, first={first}, "
            f"send_columns={self.send_columns!r}, id_column={self.id_column!r})"
        )

    def count_rows(self) -> int | None:
        """The number of rows, when known without reading the data (Parquet), else None."""
        if self.format == "parquet":
            return sum(self._file_rows.values())
        return None

    def estimated_rows(self) -> int | None:
        """The number of rows extrapolated from the bytes read so far (CSV, JSON lines),
        or None (Parquet: ``count_rows`` knows; nothing read yet)."""
        return None if self._progress is None else self._progress.estimated_rows()

    def scan_count(self) -> int:
        """The exact number of rows, streaming through every file if it must (CSV, JSONL)."""
        return sum(self._reader.count(path) for path in self.paths)

    def iter_batches(
        self, size: int, *, limit: int | None = None, start_seq: int = 0
    ) -> Iterator[Batch]:
        """Yield the input as ``Batch``es of ``size`` rows (the last may be shorter).

        ``limit`` keeps only the input's first ``limit`` rows. Batches whose ``seq`` is below
        ``start_seq`` are counted but not yielded (nor converted), so that seqs and keys are
        those of a full run.
        """
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if start_seq < 0:
            raise ValueError(f"start_seq must be >= 0, got {start_seq}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return cut_batches(self._chunks(start_seq * size, limit), size, start_seq)

    def iter_keyed(self, *, limit: int | None = None) -> Iterator[KeyedRows]:
        """The input's keys and JSON-safe sent rows, in input order, in pieces of at most
        ``CHUNK_ROWS`` rows, as Arrow arrays: what the key index hashes, with no Python
        text per key (``iter_batches`` makes those, for the requests)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        for path, file_row, row, piece in self._pieces(0, limit):
            yield KeyedRows(self._keys(piece, path, file_row, row), self._sent(piece))

    def _chunks(self, skip: int, stop: int | None) -> Generator[Chunk, None, None]:
        """Rows ``skip`` up to ``stop`` of the whole input, as chunks in input order."""
        pieces = self._pieces(skip, stop)
        try:
            for path, file_row, row, piece in pieces:
                yield self._chunk(path, file_row, row, piece)
        finally:
            pieces.close()

    def _pieces(
        self, skip: int, stop: int | None
    ) -> Generator[tuple[InputPath, int, int, pa.RecordBatch], None, None]:
        """Rows ``skip`` up to ``stop`` of the whole input, in input order, as record batches
        of at most ``CHUNK_ROWS`` rows: (file, row within the file, input row, rows)."""
        if stop is not None and skip >= stop:
            return
        base = 0  # the input row number of the current file's first row
        for path in self.paths:
            if stop is not None and base >= stop:
                return
            known = self._file_rows.get(path)
            if known is not None and base + known <= skip:
                base += known  # a Parquet file wholly before `skip`: not even opened
                continue
            file_rows = 0
            reader = self._reader.read(path, max(skip - base, 0))
            try:
                for file_row, batch in reader:
                    start = base + file_row
                    end = start + batch.num_rows
                    file_rows = file_row + batch.num_rows
                    if self._progress is not None:
                        self._progress.parsed(path, file_rows)
                    if end <= skip or not batch.num_rows:
                        continue
                    low = max(skip - start, 0)
                    high = batch.num_rows if stop is None else min(batch.num_rows, stop - start)
                    if low or high < batch.num_rows:
                        batch = batch.slice(low, high - low)
                    # Chunks of at most CHUNK_ROWS bound the Python key texts held at once
                    # (a 4 MiB block of a one-column CSV holds millions of rows).
                    for part in range(0, batch.num_rows, CHUNK_ROWS):
                        piece = batch.slice(part, CHUNK_ROWS)
                        yield path, file_row + low + part, start + low + part, piece
                    if stop is not None and end >= stop:
                        return
            finally:
                reader.close()
            base += known if known is not None else file_rows

    def _chunk(self, path: InputPath, file_row: int, row: int, batch: pa.RecordBatch) -> Chunk:
        kept = batch if self.keep_input else None
        keys = self._keys(batch, path, file_row, row)
        # Keys become Python text once per chunk: list slices per batch are then nearly free.
        return Chunk(self._sent(batch), kept, keys.to_pylist())

    def _sent(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return json_safe(batch.select(self.send_columns))

    def _keys(self, batch: pa.RecordBatch, path: InputPath, file_row: int, row: int) -> pa.Array:
        if self.id_column is None:
            return row_number_texts(row, batch.num_rows)
        return self._id_texts(batch.column(self.id_column), path, file_row)

    def _id_texts(self, ids: pa.Array, path: InputPath, file_row: int) -> pa.Array:
        if pa.types.is_dictionary(ids.type):
            ids = ids.dictionary_decode()
        if pa.types.is_floating(ids.type) and pc.any(pc.is_nan(ids)).as_py():
            index = pc.index(pc.fill_null(pc.is_nan(ids), False), pa.scalar(True)).as_py()
            raise InputError(
                f"{path}, data row {file_row + index + 1}: input.id_column "
                f"{self.id_column!r} is NaN; every row needs an id that names it"
            )
        if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
            try:
                ids = pc.cast(ids, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InputError(
                    f"{path}: input.id_column {self.id_column!r} cannot be turned into text "
                    f"keys ({exc}); choose a column of text or numbers"
                ) from exc
        # an empty id: the shortest is 0 bytes long (lengths are numbers: faster than texts)
        if ids.null_count or pc.min(pc.binary_length(ids)).as_py() == 0:
            missing = pc.fill_null(pc.equal(ids, ""), True)
            index = pc.index(missing, pa.scalar(True)).as_py()
            raise InputError(
                f"{path}, data row {file_row + index + 1}: input.id_column "
                f"{self.id_column!r} is empty; every row needs an id: fill it in, or leave "
                f"input.id_column out to key rows by their number"
            )
        return ids


def open_tabular(
    path: str | InputPath,
    *,
    format: str | None = None,
    id_column: str | None = None,
    columns: Sequence[str] | None = None,
    keep_input: bool = False,
    csv_delimiter: str | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    parquet_batch_rows: int = DEFAULT_PARQUET_BATCH_ROWS,
    encoding: str = UTF8,
    binary: str = BINARY_REFUSE,
    store: ObjectStore | None = None,
) -> TabularSource:
    """Find the input's files, read its schema, and check the job's columns against it.

    ``path`` is a file, a folder (every file with a known extension inside, recursively,
    sorted by relative path; names starting with ``.`` or ``_`` are skipped) or a glob (the
    same names skipped below its first wildcard). ``format`` ("csv", "tsv", "parquet",
    "jsonl") overrides the extensions. Raises ``InputError`` naming the setting, file and
    column for anything that would stop the run later, so that it stops before the first
    request. ``block_bytes`` (CSV / JSON lines) and ``parquet_batch_rows`` size the reads;
    the first block is the type-inference sample. ``encoding`` is the text encoding of CSV
    and JSON lines (text not valid in it is an error naming the line); ``binary`` says what
    a sent column of bytes becomes: refused (``"refuse"``), or base64 text (``"base64"``).
    A bucket location (``s3://``, ``obs://``) is read through ``store``.
    """
    if block_bytes < 1 or parquet_batch_rows < 1:
        raise ValueError("block_bytes and parquet_batch_rows must be >= 1")
    encoding = check_encoding(encoding)
    fmt, tab_separated = format_setting(format)
    accept = None if fmt is not None else (lambda file: format_of(file) is not None)
    paths = find_files(path, accept=accept, known=FORMATS, store=store)
    if fmt is None:
        fmt = common_format(paths, path)
    delimiters = csv_delimiters(paths, csv_delimiter, tab_separated)
    headers: dict[InputPath, list[str] | None] = {}
    if fmt == "csv":
        headers = {p: read_csv_header(p, delimiters[p], encoding) for p in paths}
        for file, header in headers.items():
            if header is None:
                raise InputError(
                    f"{file}: the file is empty: a CSV file needs a header line naming its "
                    "columns (a file with only a header is a valid input with no rows)"
                )
        first, schema = csv_schema(paths, headers, delimiters, id_column, block_bytes, encoding)
    elif fmt == "parquet":
        first, schema = paths[0], parquet_schema(paths[0])
    else:
        first, schema = jsonl_schema(paths, block_bytes, encoding)

    if first is None:  # every file is empty: nothing will be sent, nothing to check
        send: list[str] = []
        id_column = None
    else:
        where = f"the first rows of {first}" if fmt == "jsonl" else str(first)
        send = send_columns(schema, columns, id_column, where)
    needed = read_columns(schema, send, id_column, keep_input)
    file_rows: dict[InputPath, int] = {}
    if first is not None:
        check_unique(schema.names, needed, first)
        if fmt == "csv":
            check_csv_text(first, schema, needed, encoding)
            check_csv_headers(paths, headers, needed, first)
        elif fmt == "parquet":
            file_rows = check_parquet_files(paths, schema, needed)
        if binary != BINARY_BASE64:
            check_no_bytes(schema, send, first)
    return TabularSource(
        paths=paths,
        format=fmt,
        schema=schema,
        send_columns=send,
        id_column=id_column,
        keep_input=keep_input,
        delimiters=delimiters,
        headers=headers,
        file_rows=file_rows,
        block_bytes=block_bytes,
        parquet_batch_rows=parquet_batch_rows,
        encoding=encoding,
    )


def check_no_bytes(schema: pa.Schema, send: list[str], first: InputPath) -> None:
    """Raise an InputError for a sent column holding bytes (binary, or binary inside lists
    and structs): JSON has no bytes, and base64 is sent only when asked for."""
    for name in send:
        if _holds_bytes(schema.field(name).type):
            raise InputError(
                f"{first}: column {name!r} holds bytes ({schema.field(name).type}), which "
                'JSON cannot carry as they are; set input.binary = "base64" to send them '
                "as base64 text, leave the column out with input.columns, or store it as "
                "text (a string column) if it is text"
            )


def _holds_bytes(kind: pa.DataType) -> bool:
    types = pa.types
    if types.is_dictionary(kind):
        return _holds_bytes(kind.value_type)
    if types.is_list(kind) or types.is_large_list(kind) or types.is_fixed_size_list(kind):
        return _holds_bytes(kind.value_type)
    if types.is_struct(kind):
        return any(_holds_bytes(field.type) for field in kind)
    if isinstance(kind, pa.BaseExtensionType):
        return kind.extension_name != "arrow.uuid" and _holds_bytes(kind.storage_type)
    return bool(
        types.is_binary(kind)
        or types.is_large_binary(kind)
        or types.is_fixed_size_binary(kind)
        or types.is_binary_view(kind)
    )
