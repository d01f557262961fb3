"""Reading an output file back: its run summary, counts by status, error kinds, result fields.

``inspect_output`` streams: the row count and the summary come from the Parquet footer, the
counts from a pass over the few ``_`` columns they need, one record batch at a time, so a
file of any size is inspected in flat memory. A Parquet file that ``batchrunner run`` did
not write is still counted if it has a ``_status`` column. A folder of Parquet parts (the
output of ``--engine ray``) is read the same way, as one dataset; its summary is the
``<folder>.summary.json`` beside it.

An output in a bucket (``s3://``, ``obs://``; ``output_path``) is read where it is, range by
range, through the job's ``[storage]`` or the standard AWS variables, each read tried again
on the store's transient errors (``objectfiles``).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrunner.credentials import open_store, standard_store
from batchrunner.errors import InputError, did_you_mean
from batchrunner.formats import OutputFormat, is_nested, output_format
from batchrunner.items import STATUS_ERROR
from batchrunner.keyhash import key_hashes
from batchrunner.keyspill import Spill
from batchrunner.objectfiles import retrying_filesystem, seekable
from batchrunner.protocols.openaibatch import is_batch_output, read_batch_output
from batchrunner.sink import RESERVED, SUMMARY_METADATA_KEY
from batchrunner.storage import ObjectPath, is_uri
from batchrunner.summary import RunSummary

if TYPE_CHECKING:
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    from batchrunner.job.settings import StorageSettings

#: Where an output is: a local file or folder, or an object or prefix in a bucket.
OutputPath = Path | ObjectPath

ROWS_PER_READ = 64 * 1024
SUMMARY_BYTES = 16 << 20  # a run summary is a few kB; more is not one
#: The kind of an error row without ``_error_kind`` (as the runner counts it).
UNKNOWN_KIND = "error"
NO_STATUS = "(none)"
_READ_COLUMNS = ("_status", "_error_kind", "_key", "_error", "_latency_ms")
#: The latency distribution's bin edges (ms): rows by the latency of the request that
#: answered them.
LATENCY_EDGES_MS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)


@dataclass(frozen=True, slots=True)
class ErrorKindCount:
    """Error rows of one kind in the file: how many, and the first one's key and message."""

    kind: str
    rows: int
    example_key: str | None
    example_message: str | None


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """One error row: its key, the kind of error and what went wrong."""

    key: str | None
    kind: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class Inspection:
    """What an output file holds."""

    path: OutputPath
    rows: int
    summary: RunSummary | None  # the run summary in the metadata; None if there is none
    statuses: tuple[tuple[str, int], ...]  # status and rows, most rows first
    error_kinds: tuple[ErrorKindCount, ...]  # most rows first
    fields: tuple[tuple[str, str], ...]  # every column but the reserved ones, and its type
    error_rows: tuple[ErrorRow, ...]  # the first error rows, in file order
    duplicate_keys: int = 0  # rows whose _key an earlier row already has
    #: rows by latency: (from ms, to ms or None for "and above", rows), empty bins included
    latency_bins: tuple[tuple[float, float | None, int], ...] = ()


def output_path(text: str, storage: StorageSettings | None = None) -> OutputPath:
    """Where the output named ``text`` is: a local path, or (``s3://``, ``obs://``) the
    object or prefix, reached through ``storage`` (a job's ``[storage]``) or else the
    standard AWS variables. ``InputError`` (exit 2) when no such object or prefix is there,
    ``StorageError`` when the store cannot be used (no bucket, keys refused)."""
    if not is_uri(text):
        return Path(text)
    store = open_store(storage) if storage is not None else standard_store()
    path = store.locate(text)
    kind = store.kind(path)
    if kind == "missing":
        raise InputError(
            f"no such object or prefix: {path}; keys are case-sensitive: check it against a "
            f"listing of {path.parent}"
        )
    return path.child(path.key.rstrip("/") + "/") if kind == "folder" else path


def inspect_output(path: OutputPath, *, error_limit: int = 0) -> Inspection:
    """Read ``path`` (a batchrunner output); keep up to ``error_limit`` error rows.

    Raises ``InputError`` when the file is missing, not Parquet, or has no ``_status``.
    """
    parquet = _open(path)
    schema = parquet.schema
    if "_status" not in schema.names:
        shown = ", ".join(schema.names[:10]) + (", ..." if len(schema.names) > 10 else "")
        raise InputError(
            f"{path} is not a batchrunner output: it has no _status column "
            f"(its columns: {shown or 'none'})"
        )
    statuses: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    examples: dict[str, tuple[str | None, str | None]] = {}
    error_rows: list[ErrorRow] = []
    latencies = [0] * len(LATENCY_EDGES_MS)
    columns = [name for name in _READ_COLUMNS if name in schema.names]
    folder = tempfile.TemporaryDirectory(prefix="batchrunner-inspect-")
    keys = Spill(Path(folder.name) / "keys")  # 24 bytes a row on disk, a partition in memory
    try:
        for batch in parquet.to_batches(batch_size=ROWS_PER_READ, columns=columns):
            if "_key" in batch.schema.names:
                hashes = key_hashes(pc.fill_null(batch.column("_key"), ""))
                keys.add(hashes, hashes)
            statuses.update(_value_counts(batch.column("_status"), NO_STATUS))
            if "_latency_ms" in columns:
                _count_latencies(batch.column(columns.index("_latency_ms")), latencies)
            errors = batch.filter(pc.equal(batch.column("_status"), STATUS_ERROR))
            if errors.num_rows:
                _count_errors(errors, kinds, examples)
                room = error_limit - len(error_rows)
                if room > 0:
                    error_rows.extend(_error_rows(errors.slice(0, room)))
        duplicates = keys.duplicates().rows
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read it: {exc}") from None
    finally:
        folder.cleanup()
    return Inspection(
        path=path,
        rows=parquet.count_rows(),
        summary=_summary(schema) if _is_parquet_file(path) else _summary_beside(path),
        statuses=tuple(statuses.most_common()),
        error_kinds=tuple(
            ErrorKindCount(kind, rows, *examples[kind]) for kind, rows in kinds.most_common()
        ),
        fields=tuple((f.name, str(f.type)) for f in schema if f.name not in RESERVED.names),
        error_rows=tuple(error_rows),
        duplicate_keys=duplicates,
        latency_bins=_latency_bins(latencies),
    )


def _count_latencies(column: pa.Array, bins: list[int]) -> None:
    values = column.drop_null()
    if not len(values):
        return
    for index, edge in enumerate(LATENCY_EDGES_MS):
        # rows at or above this edge; the differences are the bins
        bins[index] += pc.sum(pc.greater_equal(values, edge)).as_py() or 0


def _latency_bins(at_least: list[int]) -> tuple[tuple[float, float | None, int], ...]:
    if not at_least[0]:
        return ()
    bins = []
    for index, edge in enumerate(LATENCY_EDGES_MS):
        upper = LATENCY_EDGES_MS[index + 1] if index + 1 < len(LATENCY_EDGES_MS) else None
        rows = at_least[index] - (at_least[index + 1] if upper is not None else 0)
        bins.append((float(edge), None if upper is None else float(upper), rows))
    return tuple(bins)


def _open(path: OutputPath) -> ds.Dataset:
    """A file, or a folder of Parquet parts (``--engine ray``), as one dataset."""
    import pyarrow.dataset as ds  # 15 MB of libraries: only when an output is read

    source, filesystem = _source(path)
    try:
        kind = None if path.is_dir() else output_format(path)
        if kind is OutputFormat.csv:
            return ds.dataset(source, filesystem=filesystem, format=_csv_format())
        if kind is OutputFormat.jsonl and isinstance(path, Path) and is_batch_output(path):
            return ds.dataset(read_batch_output(path))  # protocol = "openai-batch"
        if kind is OutputFormat.jsonl:
            return ds.dataset(source, filesystem=filesystem, format="json")
        if path.is_dir():
            dataset = ds.dataset(source, filesystem=filesystem, format="parquet")
            if dataset.files:  # parts may differ: a field only some blocks' results had
                schemas = [pq.read_schema(file, filesystem=filesystem) for file in dataset.files]
                schema = pa.unify_schemas(schemas, promote_options="permissive")
                dataset = ds.dataset(source, filesystem=filesystem, format="parquet", schema=schema)
            if not dataset.files:
                raise InputError(
                    f"{path} is a folder with no Parquet parts: give an output file, e.g. "
                    "out/<job>.parquet, or an output folder of --engine ray"
                )
            return dataset
        file = pq.ParquetFile(seekable(path))  # a clear error for a file that is not Parquet
        return ds.dataset(source, filesystem=filesystem, format="parquet", schema=file.schema_arrow)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(
            f"{path} is not a Parquet file ({exc}): give an output of batchrunner run"
        ) from None


def _source(path: OutputPath) -> tuple[str, pafs.FileSystem | None]:
    """Where Arrow's dataset finds ``path``: a local path, or a bucket's location and the
    store's filesystem (reads tried again)."""
    if isinstance(path, ObjectPath):
        return path.location, retrying_filesystem(path.store, path.scheme)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    return str(path), None


def _csv_format() -> ds.CsvFileFormat:
    import pyarrow.csv as pacsv
    import pyarrow.dataset as ds

    text_columns = {name: RESERVED.field(name).type for name in RESERVED.names}
    return ds.CsvFileFormat(
        convert_options=pacsv.ConvertOptions(column_types=text_columns, strings_can_be_null=True)
    )


def _summary(schema: pa.Schema) -> RunSummary | None:
    raw = (schema.metadata or {}).get(SUMMARY_METADATA_KEY)
    return None if raw is None else _parsed(raw)


def _is_parquet_file(path: OutputPath) -> bool:
    return not path.is_dir() and output_format(path) in (None, OutputFormat.parquet)


def _summary_beside(folder: OutputPath) -> RunSummary | None:
    """A folder of parts (``--engine ray``), a CSV or JSON lines output: the summary is in
    ``<output>.summary.json``."""
    beside = folder.with_name(folder.name + ".summary.json")
    try:
        if isinstance(beside, ObjectPath):
            raw = beside.store.read(beside, SUMMARY_BYTES)
        else:
            raw = beside.read_bytes()
    except (OSError, ValueError):  # none, or too large to be one
        return None
    return _parsed(raw)


def _parsed(raw: bytes) -> RunSummary | None:
    try:
        summary = orjson.loads(raw)
        return RunSummary.from_json(summary) if isinstance(summary, dict) else None
    except (orjson.JSONDecodeError, ValueError):
        return None  # a damaged summary: the counts from the rows still stand


def _value_counts(column: pa.Array, null_as: str) -> dict[str, int]:
    counts = pc.value_counts(column)
    values = counts.field("values").to_pylist()
    numbers = counts.field("counts").to_pylist()
    return {null_as if v is None else v: n for v, n in zip(values, numbers, strict=True)}


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    index = batch.schema.get_field_index(name)
    return batch.column(index) if index >= 0 else pa.nulls(batch.num_rows, pa.string())


def _count_errors(
    errors: pa.RecordBatch,
    kinds: Counter[str],
    examples: dict[str, tuple[str | None, str | None]],
) -> None:
    kind_column = pc.fill_null(_column(errors, "_error_kind"), UNKNOWN_KIND)
    for kind, rows in _value_counts(kind_column, UNKNOWN_KIND).items():
        kinds[kind] += rows
        if kind not in examples:
            first = pc.index(kind_column, kind).as_py()
            examples[kind] = (
                _column(errors, "_key")[first].as_py(),
                _column(errors, "_error")[first].as_py(),
            )


def _error_rows(errors: pa.RecordBatch) -> list[ErrorRow]:
    keys = _column(errors, "_key").to_pylist()
    kinds = _column(errors, "_error_kind").to_pylist()
    messages = _column(errors, "_error").to_pylist()
    return [ErrorRow(*row) for row in zip(keys, kinds, messages, strict=True)]


# --- the results themselves: the first rows, a field's values --------------------------------

#: The columns ``--head`` shows before the result fields.
HEAD_COLUMNS = ("_key", "_status", "_error")


@dataclass(frozen=True, slots=True)
class HeadRows:
    """The first rows of an output: the key, status and error, then the result fields."""

    path: OutputPath
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    total: int  # rows in the file


@dataclass(frozen=True, slots=True)
class FieldCounts:
    """The values of one result field and how often each occurs, most frequent first."""

    path: OutputPath
    field: str
    counts: tuple[tuple[str | None, int], ...]  # the value as text (None: null), rows
    rows: int  # rows in the file


def head_rows(path: OutputPath, rows: int) -> HeadRows:
    """The first ``rows`` rows of the output at ``path``, as Python values."""
    dataset = open_output(path)
    names = dataset.schema.names
    columns = [n for n in HEAD_COLUMNS if n in names]
    columns += [n for n in names if n not in RESERVED.names]
    try:
        table = dataset.head(rows, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read it: {exc}") from None
    values = table.to_pylist()
    return HeadRows(
        path=path,
        columns=tuple(columns),
        rows=tuple(tuple(row[name] for name in columns) for row in values),
        total=dataset.count_rows(),
    )


def count_values(path: OutputPath, field: str) -> FieldCounts:
    """How often each value of column ``field`` occurs in the output at ``path`` (streamed:
    memory holds one count per distinct value). Lists and structs are counted as JSON text.

    Raises ``InputError`` when there is no such column (naming the ones there are).
    """
    dataset = open_output(path)
    names = dataset.schema.names
    if field not in names:
        fields = [n for n in names if n not in RESERVED.names] or ["none"]
        raise InputError(
            f"{path} has no field {field!r}{did_you_mean(field, names)}; "
            f"its result fields: {', '.join(fields)}"
        )
    counts: Counter[str | None] = Counter()
    try:
        for batch in dataset.to_batches(batch_size=ROWS_PER_READ, columns=[field]):
            column = batch.column(0)
            if is_nested(column.type):
                counts.update(
                    None if v is None else orjson.dumps(v, default=str).decode()
                    for v in column.to_pylist()
                )
                continue
            found = pc.value_counts(column)
            values = found.field("values").to_pylist()
            numbers = found.field("counts").to_pylist()
            for value, number in zip(values, numbers, strict=True):
                counts[None if value is None else _as_text(value)] += number
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read it: {exc}") from None
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0] is None, item[0] or ""))
    return FieldCounts(path=path, field=field, counts=tuple(ordered), rows=dataset.count_rows())


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def open_output(path: OutputPath) -> ds.Dataset:
    """An output (Parquet, CSV, JSON lines, or a folder of Parquet parts) as one dataset;
    ``InputError`` if it cannot be read as one."""
    return _open(path)
