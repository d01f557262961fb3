"""Parquet files: the schema and row counts from the footers, streaming by row groups.

The first file's schema is the input's; every later file must have the read columns in
types that cast to the first file's, and is read in its column order and types. Rows before
a resumed run's start are skipped a whole row group at a time, unread.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from batchrunner.errors import InputError, did_you_mean
from batchrunner.objectfiles import seekable
from batchrunner.sources.batching import FileRows
from batchrunner.sources.columns import check_unique
from batchrunner.sources.widening import castable
from batchrunner.storage import InputPath

__all__ = ["ParquetReader", "check_parquet_files", "parquet_schema"]


def parquet_schema(path: InputPath) -> pa.Schema:
    """The file's schema, from its footer."""
    try:
        with pq.ParquetFile(seekable(path)) as parquet:
            return parquet.schema_arrow
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{path}: cannot read this Parquet file: {exc}") from exc


def check_parquet_files(
    paths: list[InputPath], schema: pa.Schema, needed: list[str]
) -> dict[InputPath, int]:
    """Every file's row count (from its footer), after checking it has the needed columns,
    once each, in types that convert to the first file's."""
    rows: dict[InputPath, int] = {}
    for path in paths:
        try:
            with pq.ParquetFile(seekable(path)) as parquet:
                rows[path] = parquet.metadata.num_rows
                other = parquet.schema_arrow
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"{path}: cannot read this Parquet file: {exc}") from exc
        if other.equals(schema):
            continue
        check_unique(other.names, needed, path)
        for name in needed:
            if other.get_field_index(name) < 0:
                raise InputError(
                    f"{path}: no column {name!r}, which {paths[0]} has; all files of one "
                    f"input need the same columns{did_you_mean(name, other.names)}"
                )
            want, have = schema.field(name).type, other.field(name).type
            if have != want and not castable([], have, want):
                raise InputError(
                    f"{path}: column {name!r} is {have} here but {want} in {paths[0]}; "
                    f"all files of one input need the same column types"
                )
    return rows


class ParquetReader:
    """Reads Parquet files as record batches of the read columns, in the first file's types."""

    def __init__(
        self, *, schema: pa.Schema, batch_rows: int, file_rows: dict[InputPath, int]
    ) -> None:
        self._schema = schema  # the read columns in the first file's types, all nullable
        self._batch_rows = batch_rows
        self._file_rows = file_rows

    def count(self, path: InputPath) -> int:
        """The file's number of rows, from its footer (read by ``check_parquet_files``)."""
        return self._file_rows[path]

    def read(self, path: InputPath, skip: int) -> FileRows:
        """(row number within the file, record batch), from the row group holding ``skip``."""
        try:
            # Column chunks streamed through a 1 MiB buffer, not read ahead whole: reading
            # 3,000,000 rows in 1,000,000-row groups peaks at 151 MB instead of 240 MB. The
            # columns decoded one after the other on this thread: Arrow's threads each keep
            # what they allocated (15-20 MB over a 10,000,000-row night).
            with pq.ParquetFile(seekable(path), buffer_size=1 << 20, pre_buffer=False) as parquet:
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
                    batch_size=self._batch_rows,
                    row_groups=groups,
                    columns=self._schema.names,
                    use_threads=False,
                )
                for batch in batches:
                    yield file_row, _conform(batch, self._schema, path)
                    file_row += batch.num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"{path}: cannot read this Parquet file: {exc}") from exc


def _conform(batch: pa.RecordBatch, target: pa.Schema, path: InputPath) -> pa.RecordBatch:
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
