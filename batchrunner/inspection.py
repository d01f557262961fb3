"""Reading an output file back: its run summary, counts by status, error kinds, result fields.

``inspect_output`` streams: the row count and the summary come from the Parquet footer, the
counts from a pass over the few ``_`` columns they need, one record batch at a time, so a
file of any size is inspected in flat memory. A Parquet file that ``batchrunner run`` did
not write is still counted if it has a ``_status`` column. A folder of Parquet parts (the
output of ``--engine ray``) is read the same way, as one dataset; its summary is the
``<folder>.summary.json`` beside it.
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

from batchrunner.errors import InputError
from batchrunner.items import STATUS_ERROR
from batchrunner.keyindex import Spill, key_hashes
from batchrunner.sink import RESERVED, SUMMARY_METADATA_KEY

if TYPE_CHECKING:
    import pyarrow.dataset as ds

ROWS_PER_READ = 64 * 1024
#: The kind of an error row without ``_error_kind`` (as the runner counts it).
UNKNOWN_KIND = "error"
NO_STATUS = "(none)"
_READ_COLUMNS = ("_status", "_error_kind", "_key", "_error")


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

    path: Path
    rows: int
    summary: dict[str, Any] | None  # the run summary in the metadata; None if there is none
    statuses: tuple[tuple[str, int], ...]  # status and rows, most rows first
    error_kinds: tuple[ErrorKindCount, ...]  # most rows first
    fields: tuple[tuple[str, str], ...]  # every column but the reserved ones, and its type
    error_rows: tuple[ErrorRow, ...]  # the first error rows, in file order
    duplicate_keys: int = 0  # rows whose _key an earlier row already has


def inspect_output(path: Path, *, error_limit: int = 0) -> Inspection:
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
    columns = [name for name in _READ_COLUMNS if name in schema.names]
    folder = tempfile.TemporaryDirectory(prefix="batchrunner-inspect-")
    keys = Spill(Path(folder.name) / "keys")  # 24 bytes a row on disk, a partition in memory
    try:
        for batch in parquet.to_batches(batch_size=ROWS_PER_READ, columns=columns):
            if "_key" in batch.schema.names:
                hashes = key_hashes(pc.fill_null(batch.column("_key"), ""))
                keys.add(hashes, hashes)
            statuses.update(_value_counts(batch.column("_status"), NO_STATUS))
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
        summary=_summary(schema) if not path.is_dir() else _summary_beside(path),
        statuses=tuple(statuses.most_common()),
        error_kinds=tuple(
            ErrorKindCount(kind, rows, *examples[kind]) for kind, rows in kinds.most_common()
        ),
        fields=tuple((f.name, str(f.type)) for f in schema if f.name not in RESERVED.names),
        error_rows=tuple(error_rows),
        duplicate_keys=duplicates,
    )


def _open(path: Path) -> ds.Dataset:
    """A file, or a folder of Parquet parts (``--engine ray``), as one dataset."""
    import pyarrow.dataset as ds  # 15 MB of libraries: only when an output is read

    if not path.exists():
        raise InputError(f"no such file: {path}")
    try:
        if path.is_dir():
            dataset = ds.dataset(path, format="parquet")
            if dataset.files:  # parts may differ: a field only some blocks' results had
                schemas = [pq.read_schema(file) for file in dataset.files]
                schema = pa.unify_schemas(schemas, promote_options="permissive")
                dataset = ds.dataset(path, format="parquet", schema=schema)
            if not dataset.files:
                raise InputError(
                    f"{path} is a folder with no Parquet parts: give an output file, e.g. "
                    "out/<job>.parquet, or an output folder of --engine ray"
                )
            return dataset
        file = pq.ParquetFile(path)  # a clear error for a file that is not Parquet
        return ds.dataset(path, format="parquet", schema=file.schema_arrow)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(
            f"{path} is not a Parquet file ({exc}): give an output of batchrunner run"
        ) from None


def _summary(schema: pa.Schema) -> dict[str, Any] | None:
    raw = (schema.metadata or {}).get(SUMMARY_METADATA_KEY)
    return None if raw is None else _parsed(raw)


def _summary_beside(folder: Path) -> dict[str, Any] | None:
    """A folder of parts (``--engine ray``) has its summary in ``<folder>.summary.json``."""
    try:
        raw = folder.with_name(folder.name + ".summary.json").read_bytes()
    except OSError:
        return None
    return _parsed(raw)


def _parsed(raw: bytes) -> dict[str, Any] | None:
    try:
        summary = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None  # a damaged summary: the counts from the rows still stand
    return summary if isinstance(summary, dict) else None


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
