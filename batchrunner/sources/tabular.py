"""Tabular input: CSV, Parquet and JSON lines, streamed as batches of rows.

This module owns everything between ``input.path`` and the ``Batch``es of a tabular job:

- finding the files (a file, a folder, a glob) and their format;
- checking, before anything is sent, that the columns the job names exist;
- streaming the files as Arrow record batches, never a whole file in memory;
- cutting that stream into batches of exactly ``size`` rows, across reader blocks and files,
  with zero-copy slices;
- the row keys: ``input.id_column`` as text, or the 0-based row number across the input;
- making values JSON-safe (``json_safe``), a whole column at a time with ``pyarrow.compute``.

Types of CSV and JSON-lines columns are guessed from the first block (``block_bytes``, 4 MiB)
of the first non-empty file, then pinned for every later block and file, so that all batches
share one schema. When a later value does not fit its column (a column of whole numbers that
holds ``2.5`` or ``n/a`` further down), the column is widened (null -> the value's type,
int -> float -> text, timestamp -> text), a warning is logged, and that file is read again
from its start, skipping the rows already handed out: a rare event that costs one more pass
over one file. Batches handed out before keep the narrower type (the JSON sent is right
either way; ``kept`` columns may change type once, e.g. int64 -> double). JSON lines that mix
numbers and text (or objects and scalars) in one field cannot be held by one Arrow column:
they stop the run with the file and line. JSON-lines fields that first appear after the
first block are not read (the schema is the first block's). A CSV ``id_column`` is always
read as text, so that ``007`` stays ``007`` and 20-digit ids stay exact.

Line numbers in CSV errors count records (header included, blank lines not), which equals
the line number unless the file has blank lines or values spanning lines.
"""

from __future__ import annotations

import base64
import csv
import difflib
import glob
import io
import logging
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from batchrunner.errors import InputError
from batchrunner.items import Batch

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_PARQUET_BATCH_ROWS",
    "FORMATS",
    "TabularSource",
    "json_safe",
    "open_tabular",
]

logger = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "csv",  # tab-delimited
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
# Text files may be compressed (data.csv.gz): Arrow decompresses them while streaming.
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
DEFAULT_BLOCK_BYTES = 4 << 20  # CSV / JSON lines: bytes per read block (and the type sample)
DEFAULT_PARQUET_BATCH_ROWS = 65_536
_CHUNK_ROWS = 65_536  # rows converted (JSON safety, keys) in one go

_FORMAT_NAMES = ("csv", "parquet", "jsonl")
_GLOB_CHARS = frozenset("*?[")
_PANDAS_INDEX = re.compile(r"__index_level_\d+__\Z")  # pandas' index, not a feature
_CSV_CONVERSION = re.compile(
    r"In CSV column #(\d+): Row #(\d+): CSV conversion error to (.+?): invalid value '(.*)'",
    re.DOTALL,
)
_ORJSON_POSITION = re.compile(r": line \d+ column (\d+) \(char \d+\)$")
_EMPTY_JSON = "Empty JSON stream"
_COUNT_FIELD = "\x00batchrunner-count"  # a field no row has: JSON rows counted, nothing built
_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}
_ISO_SECONDS = "%Y-%m-%dT%H:%M:%S"  # Arrow's %S carries the unit's fraction (.123 for ms)

# (row number within the file, record batch): what the per-format readers yield.
_FileRows = Generator[tuple[int, pa.RecordBatch], None, None]


class TabularSource:
    """A CSV, Parquet or JSON-lines input, checked and ready to stream as ``Batch``es.

    Made by ``open_tabular``. Holds no file open between calls: each ``iter_batches`` opens
    and closes its own readers, so a source can be iterated again (e.g. to resume).
    """

    def __init__(
        self,
        *,
        paths: list[Path],
        format: str,
        schema: pa.Schema,
        send_columns: list[str],
        id_column: str | None,
        keep_input: bool,
        delimiters: dict[Path, str],
        headers: dict[Path, list[str] | None],
        file_rows: dict[Path, int],
        block_bytes: int,
        parquet_batch_rows: int,
    ) -> None:
        self.paths = paths
        self.format = format
        self.schema = schema
        self.send_columns = send_columns
        self.id_column = id_column
        self.keep_input = keep_input
        self._delimiters = delimiters
        self._headers = headers
        self._file_rows = file_rows  # Parquet: rows per file, from the footers
        self._block_bytes = block_bytes
        self._parquet_batch_rows = parquet_batch_rows
        self._read_columns = _read_columns(schema, send_columns, id_column, keep_input)
        # The type each read column is read as; CSV / JSON lines may widen it mid-stream.
        self._types: dict[str, pa.DataType] = {
            name: schema.field(name).type for name in self._read_columns
        }

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

    def scan_count(self) -> int:
        """The exact number of rows, streaming through every file if it must (CSV, JSONL)."""
        if self.format == "parquet":
            return sum(self._file_rows.values())
        count_file = self._count_csv if self.format == "csv" else self._count_jsonl
        return sum(count_file(path) for path in self.paths)

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
        return self._batches(size, limit, start_seq)

    # -- cutting the stream into batches ------------------------------------------------

    def _batches(
        self, size: int, limit: int | None, start_seq: int
    ) -> Generator[Batch, None, None]:
        seq = start_seq
        pending: list[_Chunk] = []  # slices waiting to fill a batch that straddles chunks
        pending_rows = 0
        chunks = self._chunks(start_seq * size, limit)
        try:
            for chunk in chunks:
                rows, kept, keys = chunk
                count = len(keys)
                offset = 0
                if pending_rows:
                    offset = min(size - pending_rows, count)
                    pending.append(chunk.slice(0, offset))
                    pending_rows += offset
                    if pending_rows < size:
                        continue
                    yield _Chunk.concat(pending).to_batch(seq)
                    seq += 1
                    pending, pending_rows = [], 0
                # The hot path: whole batches inside one chunk, as zero-copy slices.
                while count - offset >= size:
                    yield Batch(
                        seq=seq,
                        keys=keys[offset : offset + size],
                        rows=rows.slice(offset, size),
                        kept=None if kept is None else kept.slice(offset, size),
                    )
                    seq += 1
                    offset += size
                if offset < count:
                    pending, pending_rows = [chunk.slice(offset, count - offset)], count - offset
            if pending_rows:
                yield _Chunk.concat(pending).to_batch(seq)
        finally:
            chunks.close()

    def _chunks(self, skip: int, stop: int | None) -> Generator[_Chunk, None, None]:
        """Rows ``skip`` up to ``stop`` of the whole input, as chunks in input order."""
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
            reader = self._read_file(path, max(skip - base, 0))
            try:
                for file_row, batch in reader:
                    start = base + file_row
                    end = start + batch.num_rows
                    file_rows = file_row + batch.num_rows
                    if end <= skip or not batch.num_rows:
                        continue
                    low = max(skip - start, 0)
                    high = batch.num_rows if stop is None else min(batch.num_rows, stop - start)
                    if low or high < batch.num_rows:
                        batch = batch.slice(low, high - low)
                    # Chunks of at most _CHUNK_ROWS bound the Python key texts held at once
                    # (a 4 MiB block of a one-column CSV holds millions of rows).
                    for part in range(0, batch.num_rows, _CHUNK_ROWS):
                        piece = batch.slice(part, _CHUNK_ROWS)
                        yield self._chunk(path, file_row + low + part, start + low + part, piece)
                    if stop is not None and end >= stop:
                        return
            finally:
                reader.close()
            base += known if known is not None else file_rows

    def _chunk(self, path: Path, file_row: int, row: int, batch: pa.RecordBatch) -> _Chunk:
        rows = json_safe(batch.select(self.send_columns))
        kept = batch if self.keep_input else None
        if self.id_column is None:
            keys = _row_number_texts(row, batch.num_rows)
        else:
            keys = self._id_texts(batch.column(self.id_column), path, file_row)
        # Keys become Python text once per chunk: list slices per batch are then nearly free.
        return _Chunk(rows, kept, keys.to_pylist())

    def _id_texts(self, ids: pa.Array, path: Path, file_row: int) -> pa.Array:
        if pa.types.is_dictionary(ids.type):
            ids = ids.dictionary_decode()
        if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
            try:
                ids = pc.cast(ids, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InputError(
                    f"{path}: input.id_column {self.id_column!r} cannot be turned into text "
                    f"keys ({exc}); choose a column of text or numbers"
                ) from exc
        if ids.null_count or pc.min(ids).as_py() == "":
            missing = pc.fill_null(pc.equal(ids, ""), True)
            index = pc.index(missing, pa.scalar(True)).as_py()
            raise InputError(
                f"{path}, data row {file_row + index + 1}: input.id_column "
                f"{self.id_column!r} is empty; every row needs an id: fill it in, or leave "
                f"input.id_column out to key rows by their number"
            )
        return ids

    # -- reading files ------------------------------------------------------------------

    def _read_file(self, path: Path, skip: int) -> _FileRows:
        """Yield (row number within the file, record batch) with the read columns, in order.

        ``skip`` is a hint: readers may drop rows before it cheaply (Parquet row groups) but
        may also yield them; the caller cuts.
        """
        if self.format == "parquet":
            return self._read_parquet(path, skip)
        if self.format == "csv":
            return self._read_csv(path)
        return self._read_jsonl(path)

    def _read_schema(self) -> pa.Schema:
        return pa.schema([pa.field(name, self._types[name]) for name in self._read_columns])

    def _read_parquet(self, path: Path, skip: int) -> _FileRows:
        target = self._read_schema()
        try:
            with pq.ParquetFile(str(path)) as parquet:
                metadata = parquet.metadata
                groups: list[int] = []
                file_row = 0
                for index in range(metadata.num_row_groups):
                    group_rows = metadata.row_group(index).num_rows
                    if not groups and file_row + group_rows <= skip:
                        file_row += group_rows
                        continue
                    groups.append(index)
                if not groups:
                    return
                batches = parquet.iter_batches(
                    batch_size=self._parquet_batch_rows,
                    row_groups=groups,
                    columns=self._read_columns,
                )
                for batch in batches:
                    yield file_row, _conform(batch, target, path)
                    file_row += batch.num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"{path}: cannot read this Parquet file: {exc}") from exc

    def _read_csv(self, path: Path) -> _FileRows:
        if self._headers.get(path) is None:
            return  # an empty file: no header, no rows
        handed_out = 0  # rows of this file already yielded, kept across re-reads
        for attempt in range(1, 4 * len(self._read_columns) + 3):
            bad_rows: list[Any] = []
            reader = None
            try:
                reader = _open_csv(
                    path,
                    self._delimiters[path],
                    self._block_bytes,
                    bad_rows,
                    column_types={name: self._types[name] for name in self._read_columns},
                    include_columns=self._read_columns,
                )
                yield from _rows_after(reader, handed_out, _Counter())
                return
            except _Handed as handed:
                handed_out = handed.rows
                self._widen_csv(path, handed.cause, bad_rows, attempt)
            except pa.ArrowInvalid as exc:
                self._widen_csv(path, exc, bad_rows, attempt)
            except OSError as exc:
                raise InputError(f"{path}: cannot read: {exc}") from exc
            finally:
                if reader is not None:
                    reader.close()
        raise InputError(f"{path}: column types kept changing while reading; giving up")

    def _widen_csv(self, path: Path, exc: Exception, bad_rows: list[Any], attempt: int) -> None:
        """Widen the column a conversion error names, or raise the error as an InputError."""
        if bad_rows:
            raise InputError(_bad_csv_row(path, bad_rows[0], self._delimiters[path])) from exc
        match = _CSV_CONVERSION.search(str(exc))
        header = self._headers.get(path) or []
        name = header[int(match[1])] if match and int(match[1]) < len(header) else None
        if match is None or name not in self._types:
            raise InputError(f"{path}: {exc}") from exc
        line, value = match[2], match[4]
        current = self._types[name]
        widened = _widen_text(current, value)
        if widened is None:
            raise InputError(
                f"{path}, line {line}: column {name!r} holds {_clip(value)!r}, which cannot "
                f"be read as {current} like the rows before it; fix the value"
            ) from exc
        _log_widening(path, f"line {line}", name, value, current, widened)
        self._types[name] = widened

    def _read_jsonl(self, path: Path) -> _FileRows:
        handed_out = 0
        for _attempt in range(1, 4 * len(self._read_columns) + 3):
            counter = _Counter()
            reader = None
            try:
                reader = _open_jsonl(path, self._block_bytes, self._read_schema())
                yield from _rows_after(reader, handed_out, counter)
                return
            except _Handed as handed:
                handed_out = handed.rows
                self._widen_jsonl(path, handed.cause, counter.rows)
            except pa.ArrowInvalid as exc:
                if _EMPTY_JSON in str(exc) and counter.rows == 0:
                    return
                self._widen_jsonl(path, exc, counter.rows)
            except OSError as exc:
                raise InputError(f"{path}: cannot read: {exc}") from exc
            finally:
                if reader is not None:
                    reader.close()
        raise InputError(f"{path}: field types kept changing while reading; giving up")

    def _widen_jsonl(self, path: Path, exc: Exception, read_rows: int) -> None:
        """Find the line Arrow failed on; widen its fields or raise an InputError naming it."""
        types = {name: self._types[name] for name in self._read_columns}
        found = _scan_jsonl(path, read_rows, types)
        if found is None:
            raise InputError(f"{path}: cannot read JSON lines: {exc}") from exc
        line, widenings = found
        for name, widened, value in widenings:
            _log_widening(path, f"line {line}", name, value, self._types[name], widened)
            self._types[name] = widened

    # -- counting -----------------------------------------------------------------------

    def _count_csv(self, path: Path) -> int:
        header = self._headers.get(path)
        if not header:
            return 0
        bad_rows: list[Any] = []
        reader = None
        try:
            # One column, read as text: nothing to convert, nothing that can fail to convert.
            reader = _open_csv(
                path,
                self._delimiters[path],
                self._block_bytes,
                bad_rows,
                column_types={header[0]: pa.string()},
                include_columns=[header[0]],
            )
            return sum(batch.num_rows for batch in reader)
        except pa.ArrowInvalid as exc:
            if bad_rows:
                raise InputError(_bad_csv_row(path, bad_rows[0], self._delimiters[path])) from exc
            raise InputError(f"{path}: {exc}") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc}") from exc
        finally:
            if reader is not None:
                reader.close()

    def _count_jsonl(self, path: Path) -> int:
        reader = None
        try:
            reader = _open_jsonl(path, self._block_bytes, pa.schema([(_COUNT_FIELD, pa.null())]))
            return sum(batch.num_rows for batch in reader)
        except pa.ArrowInvalid as exc:
            if _EMPTY_JSON in str(exc):
                return 0
            _scan_jsonl(path, 0, {})  # raises with the line, if it is a line's fault
            raise InputError(f"{path}: cannot read JSON lines: {exc}") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc}") from exc
        finally:
            if reader is not None:
                reader.close()


def open_tabular(
    path: str | Path,
    *,
    format: str | None = None,
    id_column: str | None = None,
    columns: Sequence[str] | None = None,
    keep_input: bool = False,
    csv_delimiter: str | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    parquet_batch_rows: int = DEFAULT_PARQUET_BATCH_ROWS,
) -> TabularSource:
    """Find the input's files, read its schema, and check the job's columns against it.

    ``path`` is a file, a folder (every file with a known extension inside, recursively,
    sorted by relative path; names starting with ``.`` or ``_`` are skipped) or a glob.
    ``format`` ("csv", "tsv", "parquet", "jsonl") overrides the extensions. Raises
    ``InputError`` naming the setting, file and column for anything that would stop the run
    later, so that it stops before the first request. ``block_bytes`` (CSV / JSON lines) and
    ``parquet_batch_rows`` size the reads; the first block is the type-inference sample.
    """
    if block_bytes < 1 or parquet_batch_rows < 1:
        raise ValueError("block_bytes and parquet_batch_rows must be >= 1")
    fmt, tab_separated = _format_setting(format)
    paths = _find_files(path, explicit=fmt is not None)
    if fmt is None:
        fmt = _format_of_files(paths, path)
    if csv_delimiter is not None and len(csv_delimiter) != 1:
        raise InputError(
            f"input.csv_delimiter must be one character, got {csv_delimiter!r} "
            f"(for tabs write '\\t')"
        )
    delimiters = {
        p: csv_delimiter or ("\t" if tab_separated or _data_suffix(p) == ".tsv" else ",")
        for p in paths
    }
    headers: dict[Path, list[str] | None] = {}
    file_rows: dict[Path, int] = {}
    if fmt == "csv":
        headers = {p: _read_csv_header(p, delimiters[p]) for p in paths}
        first, schema = _csv_schema(paths, headers, delimiters, id_column, block_bytes)
    elif fmt == "parquet":
        first, schema = paths[0], _parquet_schema(paths[0])
    else:
        first, schema = _jsonl_schema(paths, block_bytes)

    if first is None:  # every file is empty: nothing will be sent, nothing to check
        send_columns: list[str] = []
    else:
        where = f"the first rows of {first}" if fmt == "jsonl" else str(first)
        send_columns = _send_columns(schema, columns, id_column, where)
        for name in _read_columns(schema, send_columns, id_column, keep_input):
            if schema.names.count(name) > 1:
                raise InputError(
                    f"{first}: the column name {name!r} appears more than once; rename one "
                    f"so that the job can tell them apart"
                )
    source = TabularSource(
        paths=paths,
        format=fmt,
        schema=schema,
        send_columns=send_columns,
        id_column=id_column if first is not None else None,
        keep_input=keep_input,
        delimiters=delimiters,
        headers=headers,
        file_rows=file_rows,
        block_bytes=block_bytes,
        parquet_batch_rows=parquet_batch_rows,
    )
    needed = source._read_columns
    if fmt == "csv" and first is not None:
        _check_csv_headers(paths, headers, needed, first)
    elif fmt == "parquet":
        file_rows.update(_check_parquet_files(paths, schema, needed))
    return source


# -- finding files ----------------------------------------------------------------------


def _format_setting(format: str | None) -> tuple[str | None, bool]:
    """The format ``input.format`` names, and whether it means tab-separated."""
    if format is None:
        return None, False
    name = format.strip().lower().lstrip(".")
    if name in _FORMAT_NAMES:
        return name, False
    if "." + name in FORMATS:
        return FORMATS["." + name], name == "tsv"
    raise InputError(
        f"input.format: unknown format {format!r}; use one of "
        + ", ".join(repr(n) for n in _FORMAT_NAMES)
    )


def _data_suffix(path: Path) -> str:
    """The extension that names the format: ``.csv`` for ``data.csv.gz``."""
    name = path.name.lower()
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            return Path(name[: -len(compression)]).suffix
    return Path(name).suffix


def _format_of(path: Path) -> str | None:
    fmt = FORMATS.get(_data_suffix(path))
    if fmt == "parquet" and path.name.lower().endswith(COMPRESSIONS):
        return None  # Parquet compresses inside the file
    return fmt


def _hidden(relative: Path) -> bool:
    """Spark's _SUCCESS and _temporary/, editors' and VCS' dot files: not input."""
    return any(part.startswith((".", "_")) for part in relative.parts)


def _find_files(path: str | Path, *, explicit: bool) -> list[Path]:
    """The input files ``input.path`` names, sorted; with ``explicit`` (a format given),
    files of any extension in a folder or glob, else only those with a known one."""
    text = str(path)
    given = Path(path)
    if given.is_file():
        return [given]
    if given.is_dir():
        found = sorted(
            (f for f in given.rglob("*") if f.is_file() and not _hidden(f.relative_to(given))),
            key=lambda f: f.relative_to(given).parts,
        )
        where = f"in folder {text}"
    elif _GLOB_CHARS & set(text):
        found = sorted(
            p
            for p in map(Path, glob.glob(text, recursive=True))
            if p.is_file() and not _hidden(Path(p.name))
        )
        where = f"matches {text}"
    else:
        raise InputError(_no_such_path(given))
    files = found if explicit else [f for f in found if _format_of(f) is not None]
    if not files:
        known = ", ".join(FORMATS)
        message = f"input.path: no input file {where} (known extensions: {known})"
        if found:
            message += (
                f"; {len(found)} file(s) with other extensions, e.g. {found[0].name}: "
                f"set input.format to read them"
            )
        raise InputError(message)
    return files


def _no_such_path(path: Path) -> str:
    message = f"input.path: no such file or folder: {path}"
    parent = path.parent
    if parent.is_dir():
        names = [entry.name for entry in parent.iterdir()]
        close = difflib.get_close_matches(path.name, names, n=1)
        if close:
            message += f" (did you mean {str(parent / close[0])!r}?)"
    else:
        message += f" (the folder {parent} does not exist either)"
    return message


def _format_of_files(paths: list[Path], given: str | Path) -> str:
    formats: dict[str, Path] = {}
    for path in paths:
        fmt = _format_of(path)
        if fmt is None:
            raise InputError(
                f"input.path: cannot tell the format of {path} from its extension "
                f"{_data_suffix(path) or '(none)'!r}; known extensions: {', '.join(FORMATS)} "
                f"(CSV and JSON lines may end in {', '.join(COMPRESSIONS)}), or set "
                f"input.format to one of {', '.join(repr(n) for n in _FORMAT_NAMES)}"
            )
        formats.setdefault(fmt, path)
    if len(formats) > 1:
        examples = ", ".join(f"{fmt}: {path}" for fmt, path in formats.items())
        raise InputError(
            f"input.path: {given} holds files of several formats ({examples}); point it "
            f"at one kind, e.g. with a glob like '*.csv'"
        )
    return next(iter(formats))


# -- schemas and columns ----------------------------------------------------------------


def _read_csv_header(path: Path, delimiter: str) -> list[str] | None:
    """The column names on the file's first line; None for an empty file."""
    try:
        with (
            pa.input_stream(str(path), compression="detect") as stream,
            io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="") as text,
        ):
            for row in csv.reader(text, delimiter=delimiter):
                if row:
                    return row
    except (OSError, csv.Error, pa.ArrowInvalid) as exc:
        raise InputError(f"{path}: cannot read the CSV header: {exc}") from exc
    return None


def _open_csv(
    path: Path,
    delimiter: str,
    block_bytes: int,
    bad_rows: list[Any],
    *,
    column_types: dict[str, pa.DataType] | None = None,
    include_columns: list[str] | None = None,
) -> Any:
    def record(row: Any) -> str:
        bad_rows.append(row)
        return "error"

    return pcsv.open_csv(
        str(path),
        # One thread: Arrow then numbers the rows, so that errors can name the line.
        read_options=pcsv.ReadOptions(use_threads=False, block_size=block_bytes),
        parse_options=pcsv.ParseOptions(
            delimiter=delimiter, newlines_in_values=True, invalid_row_handler=record
        ),
        convert_options=pcsv.ConvertOptions(
            column_types=column_types or {}, include_columns=include_columns or []
        ),
    )


def _bad_csv_row(path: Path, row: Any, delimiter: str) -> str:
    where = f"{path}, line {row.number}" if row.number is not None else str(path)
    return (
        f"{where}: expected {row.expected_columns} columns, got {row.actual_columns}: "
        f"{_clip(row.text)!r}; fix the line (a value holding {delimiter!r} must be quoted)"
    )


def _csv_schema(
    paths: list[Path],
    headers: dict[Path, list[str] | None],
    delimiters: dict[Path, str],
    id_column: str | None,
    block_bytes: int,
) -> tuple[Path | None, pa.Schema]:
    """The schema Arrow infers from the first block of the first file with a header."""
    first = next((p for p in paths if headers[p] is not None), None)
    if first is None:
        return None, pa.schema([])
    bad_rows: list[Any] = []
    # The id is text whatever it looks like: "007" stays "007", long ids stay exact.
    types = {id_column: pa.string()} if id_column is not None else None
    reader = None
    try:
        reader = _open_csv(first, delimiters[first], block_bytes, bad_rows, column_types=types)
        return first, reader.schema
    except pa.ArrowInvalid as exc:
        if bad_rows:
            raise InputError(_bad_csv_row(first, bad_rows[0], delimiters[first])) from exc
        raise InputError(f"{first}: cannot read as CSV: {exc}") from exc
    except OSError as exc:
        raise InputError(f"{first}: cannot read: {exc}") from exc
    finally:
        if reader is not None:
            reader.close()


def _check_csv_headers(
    paths: list[Path], headers: dict[Path, list[str] | None], needed: list[str], first: Path
) -> None:
    for path in paths:
        header = headers[path]
        if header is None:
            continue
        for name in needed:
            if name not in header:
                raise InputError(
                    f"{path}: no column {name!r} in the header, which {first} has; all files "
                    f"of one input need the same columns{_did_you_mean(name, header)}"
                )


def _parquet_schema(path: Path) -> pa.Schema:
    try:
        with pq.ParquetFile(str(path)) as parquet:
            return parquet.schema_arrow
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{path}: cannot read this Parquet file: {exc}") from exc


def _check_parquet_files(
    paths: list[Path], schema: pa.Schema, needed: list[str]
) -> dict[Path, int]:
    """Every file's row count (from its footer), after checking it has the needed columns
    in types that convert to the first file's."""
    rows: dict[Path, int] = {}
    for path in paths:
        try:
            with pq.ParquetFile(str(path)) as parquet:
                rows[path] = parquet.metadata.num_rows
                other = parquet.schema_arrow
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"{path}: cannot read this Parquet file: {exc}") from exc
        if other.equals(schema):
            continue
        for name in needed:
            if other.get_field_index(name) < 0:
                raise InputError(
                    f"{path}: no column {name!r}, which {paths[0]} has; all files of one "
                    f"input need the same columns{_did_you_mean(name, other.names)}"
                )
            want, have = schema.field(name).type, other.field(name).type
            if have != want and not _castable(have, want):
                raise InputError(
                    f"{path}: column {name!r} is {have} here but {want} in {paths[0]}; "
                    f"all files of one input need the same column types"
                )
    return rows


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    try:
        pc.cast(pa.array([], source), target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def _open_jsonl(path: Path, block_bytes: int, schema: pa.Schema | None) -> Any:
    parse = (
        pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        if schema is not None
        else pjson.ParseOptions()
    )
    return pjson.open_json(
        str(path),
        # Threads halve the parse time; errors are located by _scan_jsonl, not by Arrow.
        read_options=pjson.ReadOptions(use_threads=True, block_size=block_bytes),
        parse_options=parse,
    )


def _jsonl_schema(paths: list[Path], block_bytes: int) -> tuple[Path | None, pa.Schema]:
    """The schema Arrow infers from the first block of the first file with a row."""
    for path in paths:
        reader = None
        try:
            reader = _open_jsonl(path, block_bytes, None)
            return path, reader.schema
        except pa.ArrowInvalid as exc:
            if _EMPTY_JSON in str(exc):
                continue
            _scan_jsonl(path, 0, None)  # raises with the line, if it is a line's fault
            raise InputError(f"{path}: cannot read JSON lines: {exc}") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc}") from exc
        finally:
            if reader is not None:
                reader.close()
    return None, pa.schema([])


def _did_you_mean(name: str, names: Sequence[str]) -> str:
    folded = {n.casefold(): n for n in names}
    close = [folded[name.casefold()]] if name.casefold() in folded else []
    close = close or difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _missing_column(setting: str, name: str, names: Sequence[str], where: str) -> InputError:
    shown = ", ".join(repr(n) for n in names[:40]) + (", ..." if len(names) > 40 else "")
    return InputError(
        f"{setting}: no column {name!r} in {where}{_did_you_mean(name, names)}; "
        f"the columns are: {shown or '(none)'}"
    )


def _send_columns(
    schema: pa.Schema, columns: Sequence[str] | None, id_column: str | None, where: str
) -> list[str]:
    names = schema.names
    if id_column is not None and id_column not in names:
        raise _missing_column("input.id_column", id_column, names, where)
    if columns is None:
        send = [n for n in names if n != id_column and not _PANDAS_INDEX.match(n)]
        if not send:
            raise InputError(
                f"{where}: no column to send besides input.id_column {id_column!r}; "
                f"the input needs at least one more column"
                if id_column is not None
                else f"{where}: no columns found"
            )
        return send
    if isinstance(columns, str):
        raise InputError(f"input.columns must be a list of names, got the text {columns!r}")
    send = list(columns)
    if not send:
        raise InputError(
            "input.columns is empty: list the columns to send, or leave it out to send every "
            "column but input.id_column"
        )
    for name in send:
        if name not in names:
            raise _missing_column("input.columns", name, names, where)
    twice = sorted({n for n in send if send.count(n) > 1})
    if twice:
        raise InputError(f"input.columns lists {twice[0]!r} more than once")
    return send


def _read_columns(
    schema: pa.Schema, send: list[str], id_column: str | None, keep_input: bool
) -> list[str]:
    """The columns read from the files: all of them to keep the input, else only those used."""
    if keep_input:
        return list(schema.names)
    return list(dict.fromkeys([*send, *([id_column] if id_column is not None else [])]))


# -- type widening (CSV, JSON lines) ----------------------------------------------------


class _Counter:
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


def _rows_after(reader: Any, handed_out: int, counter: _Counter) -> _FileRows:
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


def _widen_text(current: pa.DataType, value: str) -> pa.DataType | None:
    """The narrowest type wider than ``current`` that can read the CSV text ``value``."""
    if pa.types.is_null(current):
        candidates = [pa.int64(), pa.float64(), pa.string()]
    elif pa.types.is_integer(current):
        candidates = [pa.float64(), pa.string()]
    elif pa.types.is_timestamp(current) and current.unit != "ns":
        candidates = [pa.timestamp("ns", current.tz), pa.string()]
    elif pa.types.is_string(current) or pa.types.is_large_string(current):
        candidates = [pa.binary()]  # bytes that are not UTF-8
    elif pa.types.is_binary(current):
        candidates = []
    else:
        candidates = [pa.string()]
    for candidate in candidates:
        if _castable_value(value, candidate):
            return candidate
    return None


def _castable_value(value: str, target: pa.DataType) -> bool:
    try:
        pc.cast(pa.array([value], pa.string()), target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def _widen_value(current: pa.DataType, value: Any) -> pa.DataType | None:
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
            return current if _castable_value(value, current) else pa.string()
        return None
    if isinstance(value, list) and (pa.types.is_list(current) or pa.types.is_large_list(current)):
        item: pa.DataType | None = current.value_type
        for element in value:
            item = _widen_value(item, element)
            if item is None:
                return None
        return current if item == current.value_type else pa.list_(item)
    if isinstance(value, dict) and pa.types.is_struct(current):
        fields = []
        for field in current:
            widened = _widen_value(field.type, value.get(field.name))
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


def _describe_type(kind: pa.DataType) -> str:
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


def _describe_value(value: Any) -> str:
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "text"}
    kind = kinds.get(type(value), "an object" if isinstance(value, dict) else "an array")
    if value is None:
        kind = "null"
    return f"{kind} ({_clip(orjson.dumps(value).decode())})"


def _scan_jsonl(
    path: Path, start_row: int, types: dict[str, pa.DataType] | None
) -> tuple[int, list[tuple[str, pa.DataType, Any]]] | None:
    """Read the file line by line from row ``start_row`` (only after Arrow failed on it).

    Raises InputError for the first line that is not a JSON object, or whose field cannot
    join its column. Returns the first line with fields that need a wider type than
    ``types`` gives them: (line, [(field, wider type, value), ...]). With ``types=None``,
    types are inferred from the rows as they come (Arrow failed while inferring).
    """
    inferring = types is None
    known: dict[str, pa.DataType] = {} if types is None else dict(types)
    row = 0
    with io.BufferedReader(pa.input_stream(str(path), compression="detect")) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row += 1
            if row <= start_row:
                continue
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
                raise InputError(
                    f"{path}, line {number}: not valid JSON ({position}){hint}"
                ) from None
            if not isinstance(record, dict):
                raise InputError(
                    f"{path}, line {number}: expected a JSON object, got "
                    f"{_describe_value(record)}; JSON lines needs one object per line"
                    + (
                        " (a JSON array file converts with `jq -c '.[]' IN.json > OUT.jsonl`)"
                        if isinstance(record, list)
                        else ""
                    )
                )
            widenings = []
            for name in record if inferring else known:
                current = known.get(name, pa.null())
                value = record.get(name)
                widened = _widen_value(current, value)
                if widened is None:
                    raise InputError(
                        f"{path}, line {number}: field {name!r} holds {_describe_value(value)} "
                        f"here but {_describe_type(current)} in earlier lines; one field needs "
                        f"one kind of value: make them agree (e.g. write them all as text)"
                    )
                if widened != current:
                    widenings.append((name, widened, value))
                    known[name] = widened
            if widenings and not inferring:
                return number, widenings
    return None


def _log_widening(
    path: Path, where: str, name: str, value: Any, old: pa.DataType, new: pa.DataType
) -> None:
    logger.warning(
        "%s, %s: column %r holds %s, which the type read so far (%s) cannot hold; "
        "reading the column as %s from here on (this re-reads the file once)",
        path,
        where,
        name,
        _clip(repr(value)),
        old,
        new,
    )


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- chunks and keys --------------------------------------------------------------------


class _Chunk(NamedTuple):
    """Rows read together: what is sent, what is kept and their keys, sliced in step."""

    rows: pa.RecordBatch  # JSON-safe send columns
    kept: pa.RecordBatch | None  # all input columns, as read
    keys: list[str]

    def slice(self, offset: int, length: int) -> _Chunk:
        return _Chunk(
            self.rows.slice(offset, length),
            None if self.kept is None else self.kept.slice(offset, length),
            self.keys[offset : offset + length],
        )

    def to_batch(self, seq: int) -> Batch:
        return Batch(seq=seq, keys=self.keys, rows=self.rows, kept=self.kept)

    @staticmethod
    def concat(pieces: list[_Chunk]) -> _Chunk:
        if len(pieces) == 1:
            return pieces[0]
        kept = [p.kept for p in pieces if p.kept is not None]
        return _Chunk(
            _concat_batches([p.rows for p in pieces]),
            _concat_batches(kept) if kept else None,
            [key for p in pieces for key in p.keys],
        )


def _concat_batches(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    # A column widened mid-stream: bring the earlier pieces to the latest types.
    target = batches[-1].schema
    return pa.concat_batches([b if b.schema == target else b.cast(target) for b in batches])


def _conform(batch: pa.RecordBatch, target: pa.Schema, path: Path) -> pa.RecordBatch:
    """A Parquet batch in the first file's column order and types, every field nullable."""
    if batch.schema.names != target.names:
        batch = batch.select(target.names)
    if batch.schema == target:
        return batch
    if batch.schema.types == target.types:  # only nullability or metadata differ: relabel
        return pa.RecordBatch.from_arrays(batch.columns, schema=target)
    try:
        return batch.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(
            f"{path}: cannot convert its columns to the first file's types: {exc}"
        ) from exc


_counting: list[pa.Array] = []  # 0, 1, 2, ... grown on demand, shared by all sources


def _row_number_texts(start: int, count: int) -> pa.Array:
    """``str(start) .. str(start + count - 1)`` as a text array, computed column-wise."""
    if not _counting or len(_counting[0]) < count:
        ones = pa.repeat(pa.scalar(1, pa.int64()), max(count, DEFAULT_PARQUET_BATCH_ROWS))
        _counting[:] = [pc.subtract(pc.cumulative_sum(ones), 1)]
    return pc.cast(pc.add(_counting[0].slice(0, count), start), pa.string())


# -- JSON safety ------------------------------------------------------------------------


def json_safe(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with every value representable in JSON, converted a column at a time.

    - float NaN and +-infinity -> null;
    - timestamps -> ISO-8601 text, ``2024-01-02T03:04:05``, with the unit's fraction
      (``.123`` for ms) and, when tz-aware, the offset (``+00:00``), in the column's zone;
    - dates -> ``YYYY-MM-DD``; times -> ``HH:MM:SS`` (with the unit's fraction);
    - decimals -> float64 (precision beyond a double's is lost);
    - durations -> float seconds (the unit is not in JSON, so a bare count would be
      ambiguous);
    - binary -> base64 text (standard alphabet, padded), so that every protocol gets JSON
      it can encode; note that a Parquet "string" column stored as plain binary arrives
      base64 too;
    - dictionary-encoded -> decoded, then converted like its values;
    - lists and structs -> their children converted recursively; maps, intervals and
      unions are left as they are;
    - ints, text, booleans and nulls are untouched.

    Returns ``batch`` itself when nothing needs converting: the check costs one pass per
    float column and nothing for the others.
    """
    arrays: list[pa.Array] | None = None
    for index, column in enumerate(batch.columns):
        safe = _json_safe_array(column)
        if safe is not None:
            if arrays is None:
                arrays = list(batch.columns)
            arrays[index] = safe
    if arrays is None:
        return batch
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _json_safe_array(array: pa.Array) -> pa.Array | None:
    """The array made JSON-safe, or None when it already is (the common, free case)."""
    kind = array.type
    types = pa.types
    if (
        types.is_integer(kind)
        or types.is_string(kind)
        or types.is_boolean(kind)
        or types.is_large_string(kind)
        or types.is_null(kind)
        or types.is_string_view(kind)
    ):
        return None
    if types.is_floating(kind):
        finite = pc.is_finite(array)
        if pc.all(finite).as_py() is not False:  # True, or None when all null / empty
            return None
        return pc.if_else(finite, array, None)
    if isinstance(kind, pa.BaseExtensionType):
        if kind.extension_name == "arrow.uuid":
            return _python_texts(array, str)
        storage = array.storage
        safe = _json_safe_array(storage)
        return safe if safe is not None else storage
    for applies, convert in _CONVERSIONS:
        if applies(kind):
            return convert(array)
    return None


def _timestamp_texts(array: pa.Array) -> pa.Array:
    offset = "%Ez" if array.type.tz is not None else ""  # %Ez: +01:00, not +0100
    return pc.strftime(array, format=_ISO_SECONDS + offset)


def _duration_seconds(array: pa.Array) -> pa.Array:
    return pc.divide(array.cast(pa.int64()).cast(pa.float64()), _PER_SECOND[array.type.unit])


def _python_texts(array: pa.Array, to_text: Callable[[Any], str]) -> pa.Array:
    # Per value in Python: only for rare types Arrow has no kernel for (base64, UUID).
    return pa.array(
        [None if value is None else to_text(value) for value in array.to_pylist()], pa.string()
    )


def _base64_texts(array: pa.Array) -> pa.Array:
    return _python_texts(array, lambda value: base64.b64encode(value).decode("ascii"))


def _decoded(array: pa.Array) -> pa.Array:
    decoded = array.dictionary_decode()
    safe = _json_safe_array(decoded)
    return safe if safe is not None else decoded


def _list_safe(array: pa.Array) -> pa.Array | None:
    offsets = array.offsets
    start, end = offsets[0].as_py(), offsets[-1].as_py()
    safe = _json_safe_array(array.values.slice(start, end - start))
    if safe is None:
        return None
    factory = pa.LargeListArray if pa.types.is_large_list(array.type) else pa.ListArray
    # Fresh offsets from 0: Arrow refuses a null mask together with sliced offsets.
    return factory.from_arrays(
        pc.subtract(offsets, start), safe, mask=array.is_null() if array.null_count else None
    )


def _fixed_size_list_safe(array: pa.Array) -> pa.Array | None:
    return _list_safe(array.cast(pa.list_(array.type.value_field)))


def _struct_safe(array: pa.Array) -> pa.Array | None:
    children = array.flatten()
    safe = [_json_safe_array(child) for child in children]
    if all(s is None for s in safe):
        return None
    return pa.StructArray.from_arrays(
        [s if s is not None else child for s, child in zip(safe, children, strict=True)],
        names=[field.name for field in array.type],
        mask=array.is_null() if array.null_count else None,
    )


def _cast_to(target: pa.DataType) -> Callable[[pa.Array], pa.Array]:
    return lambda array: array.cast(target)


def _is_binary(kind: pa.DataType) -> bool:
    types = pa.types
    return bool(
        types.is_binary(kind)
        or types.is_large_binary(kind)
        or types.is_fixed_size_binary(kind)
        or types.is_binary_view(kind)
    )


def _is_variable_list(kind: pa.DataType) -> bool:
    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind))


_Conversion = tuple[Callable[[pa.DataType], bool], Callable[[pa.Array], "pa.Array | None"]]
_CONVERSIONS: tuple[_Conversion, ...] = (
    (pa.types.is_timestamp, _timestamp_texts),
    (pa.types.is_date, _cast_to(pa.string())),
    (pa.types.is_time, _cast_to(pa.string())),
    (pa.types.is_decimal, _cast_to(pa.float64())),
    (pa.types.is_duration, _duration_seconds),
    (_is_binary, _base64_texts),
    (pa.types.is_dictionary, _decoded),
    (_is_variable_list, _list_safe),
    (pa.types.is_fixed_size_list, _fixed_size_list_safe),
    (pa.types.is_struct, _struct_safe),
)
