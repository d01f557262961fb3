"""The output's file formats: Parquet (the default), CSV and JSON lines, by the path's suffix.

Each writer takes the assembled output one Arrow table at a time (``write_table``), so the
sink's whole-or-absent commit (written aside, renamed) and flat memory hold for all three.
Only Parquet carries the run summary in its metadata; the others rely on the
``<output>.summary.json`` beside them. In CSV a nested value (a list, a struct) is written as
JSON text; in JSON lines it stays nested.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchrunner.job.settings import Job
from batchrunner.protocols.openaibatch import batch_output_line
from batchrunner.storage import ObjectPath


class OutputFormat(StrEnum):
    parquet = "parquet"
    csv = "csv"
    jsonl = "jsonl"
    # protocol = "openai-batch" to a .jsonl: the batch API's output shape, a line a request.
    openai_batch = "openai-batch"


SUFFIXES = {
    ".parquet": OutputFormat.parquet,
    ".csv": OutputFormat.csv,
    ".jsonl": OutputFormat.jsonl,
}


def output_format(path: Path | ObjectPath) -> OutputFormat | None:
    """The format an output path asks for by its suffix, or None for another suffix."""
    return SUFFIXES.get(path.suffix.lower())


class OutputWriter(Protocol):
    def write_table(self, table: pa.Table) -> None: ...

    def close(self) -> None: ...


def batch_output_format(job: Job, path: Path) -> OutputFormat | None:
    """The batch API's output shape for a batch file's job written to ``.jsonl``, else
    None (the format by the path's suffix)."""
    if job.service.protocol == "openai-batch" and output_format(path) is OutputFormat.jsonl:
        return OutputFormat.openai_batch
    return None


def open_output_writer(file: pa.NativeFile, schema: pa.Schema, format: OutputFormat) -> _Writer:
    """A writer of ``format`` into ``file`` (the temporary file the sink renames later; the
    caller opens and closes it)."""
    if format is OutputFormat.csv:
        return _Writer(_CsvWriter(file, schema))
    if format is OutputFormat.jsonl:
        return _Writer(_JsonLinesWriter(file))
    if format is OutputFormat.openai_batch:
        return _Writer(_BatchOutputWriter(file))
    return _Writer(pq.ParquetWriter(file, schema))


class _Writer:
    """A context manager around any of the writers: closed however the block ends."""

    def __init__(self, inner: OutputWriter) -> None:
        self._inner = inner

    def write_table(self, table: pa.Table) -> None:
        self._inner.write_table(table)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._inner.close()


def is_nested(type_: pa.DataType) -> bool:
    """Lists, structs and maps: what CSV holds as JSON text."""
    return bool(
        pa.types.is_list(type_)
        or pa.types.is_large_list(type_)
        or pa.types.is_fixed_size_list(type_)
        or pa.types.is_struct(type_)
        or pa.types.is_map(type_)
    )


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, default=str).decode()


class _CsvWriter:
    def __init__(self, file: pa.NativeFile, schema: pa.Schema) -> None:
        self._nested = [i for i, field in enumerate(schema) if is_nested(field.type)]
        fields = [
            pa.field(f.name, pa.string()) if i in self._nested else f.remove_metadata()
            for i, f in enumerate(schema)
        ]
        self._schema = pa.schema(fields)
        self._writer = pacsv.CSVWriter(file, self._schema)

    def write_table(self, table: pa.Table) -> None:
        for index in self._nested:
            texts = pa.array([_json_text(v) for v in table.column(index).to_pylist()], pa.string())
            table = table.set_column(index, self._schema.field(index), texts)
        self._writer.write_table(table.replace_schema_metadata(None).cast(self._schema))

    def close(self) -> None:
        self._writer.close()


class _BatchOutputWriter:
    """``{"custom_id", "response": {"status_code", "body"}, "error"}`` a line."""

    def __init__(self, file: pa.NativeFile) -> None:
        self._file = file

    def write_table(self, table: pa.Table) -> None:
        self._file.write(b"".join(batch_output_line(row) + b"\n" for row in table.to_pylist()))

    def close(self) -> None:
        pass  # the file is the caller's


class _JsonLinesWriter:
    def __init__(self, file: pa.NativeFile) -> None:
        self._file = file

    def write_table(self, table: pa.Table) -> None:
        option = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY
        self._file.write(
            b"".join(orjson.dumps(row, default=str, option=option) for row in table.to_pylist())
        )

    def close(self) -> None:
        pass  # the file is the caller's
