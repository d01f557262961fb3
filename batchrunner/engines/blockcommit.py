"""A Ray run's end, on the driver: the parts checked against the input, then committed.

``check_parts`` proves the parts of this run's blocks hold one row per input item: as many
rows, and the same distinct keys, as the input (``CoverageError`` otherwise: nothing is
committed, the parts are kept). Then:

- a local output is a folder of the parts, linked into a folder beside it and renamed
  into place (``commit_folder``);
- an output in a bucket is one object (``commit_object``): the parts, read one at a time
  from the bucket, are written into a file in the job's local state folder (the output's
  format by its suffix, the run summary in a Parquet file's metadata), uploaded whole
  (a completed multipart upload is atomic) and removed; the summary object goes beside it.

``source_keys`` reads every input item's key for the check (the id column only).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from batchrunner.engines.blocks import Parts
from batchrunner.errors import CoverageError
from batchrunner.formats import OutputFormat, open_output_writer, output_format
from batchrunner.items import STATUS_OK
from batchrunner.job import Job
from batchrunner.sink import RESERVED, SUMMARY_METADATA_KEY, conform, merge_schemas
from batchrunner.storage import ObjectPath
from batchrunner.wiring import SUMMARY_SUFFIX
from batchrunner.writing import aside_name, open_write

CHECKED = ["_key", "_status"]


def check_parts(parts: Parts, names: Sequence[str], keys: pa.Array) -> tuple[int, int]:
    """Rows and ``ok`` rows of the parts of ``names``, after checking they hold one row
    per input item: as many rows, and the same distinct keys, as ``keys`` (``CoverageError``)."""
    tables = [parts.read(name, CHECKED) for name in names]
    if tables:
        table = pa.concat_tables(tables)
    else:  # an empty input: no blocks, no parts
        table = pa.table({name: pa.array([], pa.string()) for name in CHECKED})
    if table.num_rows != len(keys):
        raise CoverageError(
            f"the Ray output has {table.num_rows:,} rows for {len(keys):,} input rows; "
            "nothing was committed"
        )
    expected = pc.unique(keys)
    got = pc.unique(table.column("_key"))
    if len(got) != len(expected) or not pc.all(pc.is_in(expected, value_set=got)).as_py():
        raise CoverageError("the Ray output's keys are not the input's; nothing was committed")
    ok = pc.sum(pc.equal(table.column("_status"), STATUS_OK)).as_py() or 0
    return table.num_rows, int(ok)


def commit_folder(parts: Parts, names: Sequence[str], output: Path) -> None:
    """Put the (checked) parts of ``names``, in input order, in a folder renamed into place
    as ``output``; the parts stay in the state until the caller drops it."""
    assert isinstance(parts.where, Path)
    work = output.with_name(f".{output.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for index, name in enumerate(names):
        # A link, not a move: a failure here leaves the state whole for another try. A
        # block met twice (the same keys twice over in the input) is there twice.
        source = parts.part(name)
        assert isinstance(source, Path)
        _link_or_copy(source, work / f"part-{index:08d}.parquet")
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    work.rename(output)


def commit_object(
    parts: Parts,
    names: Sequence[str],
    output: ObjectPath,
    assembled: Path,
    summary: Mapping[str, Any],
) -> None:
    """Write the (checked) parts of ``names``, in input order, into ``assembled`` (a local
    file), upload it as ``output``, then put ``<output>.summary.json`` beside it."""
    schemas = [parts.schema(name) for name in names]  # footers only: small reads
    merged = merge_schemas([RESERVED, *schemas])
    fields = [field for field in merged if field.name not in RESERVED.names]
    schema = pa.schema([*RESERVED, *fields], metadata={SUMMARY_METADATA_KEY: orjson.dumps(summary)})
    kind = output_format(output) or OutputFormat.parquet
    temporary = aside_name(assembled)
    try:
        with open_write(temporary) as file, open_output_writer(file, schema, kind) as writer:
            for name in names:  # one part in memory at a time
                for batch in parts.read(name).to_batches():
                    writer.write_table(pa.Table.from_batches([conform(batch, schema)], schema))
        os.replace(temporary, assembled)
        output.store.upload(assembled, output)
    finally:
        temporary.unlink(missing_ok=True)
        assembled.unlink(missing_ok=True)
    summary_path = output.with_name(output.name + SUMMARY_SUFFIX)
    output.store.put_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n", summary_path)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def source_keys(paths: list[str], format: str, job: Job, filesystem: Any = None) -> pa.Array:
    """Every input row's key, as the engine makes it (the id column as text); ``paths`` on
    ``filesystem`` (a bucket's) when given."""
    assert job.input.id_column is not None
    fmt = "json" if format == "jsonl" else ("csv" if format in ("csv", "tsv") else format)
    options: dict[str, Any] = {}
    if fmt == "csv":
        import pyarrow.csv as csv

        delimiter = job.input.csv_delimiter or ("\t" if format == "tsv" else ",")
        options["format"] = ds.CsvFileFormat(parse_options=csv.ParseOptions(delimiter=delimiter))
    dataset = ds.dataset(paths, format=options.get("format", fmt), filesystem=filesystem)
    column = dataset.to_table(columns=[job.input.id_column]).column(0)
    return pc.cast(column, pa.string())
