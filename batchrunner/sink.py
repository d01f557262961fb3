"""Where results go: a journal of finished batches, then one Parquet file in input order.

While the run goes, each finished batch becomes one Arrow record batch appended to a journal
part (Arrow IPC stream files in a state folder beside the output), in the order batches
finish: nothing is held back, so a crash loses only what was in flight. At the end,
``assemble`` indexes the parts (where each batch's message starts), checks that every batch
is there exactly once with all its rows, merges the schemas (a field that appears later is
added; types that disagree become JSON text), then reads the batches back in input order,
each from its place, and writes the Parquet file aside before renaming it into place.
Memory holds the index (a few bytes per batch), never the results.
"""

from __future__ import annotations

import importlib.util
import logging
import operator
import os
import sys
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchrunner.errors import CoverageError
from batchrunner.items import STATUS_ERROR, STATUS_OK, Outcome

log = logging.getLogger("batchrunner")

# pyarrow's type inference (pa.array without a type, as for a result column whose type is
# not known yet or cannot be hinted) tries to import dateutil on each call; when it is not
# installed, each failed import searches sys.path again: ~80 us a call, more than converting
# a small batch's column. Marking the absence in sys.modules makes the failure instant (it
# could not be imported anyway).
if importlib.util.find_spec("dateutil") is None:
    sys.modules.setdefault("dateutil", None)  # type: ignore[arg-type]

SEQ = "_seq"  # the batch's position: in the journal only, never in the output

#: The columns every output has, in this order, before the result fields.
RESERVED = pa.schema(
    [
        ("_key", pa.string()),
        ("_status", pa.string()),
        ("_error", pa.string()),
        ("_error_kind", pa.string()),
        ("_http_status", pa.int32()),
        ("_attempts", pa.int32()),
        ("_latency_ms", pa.float64()),
        ("_request_uuid", pa.string()),
    ]
)
RESULT_SUFFIX = "_result"
SUMMARY_METADATA_KEY = b"batchrunner.summary"
ROW_GROUP_ROWS = 64 * 1024
# Batches waiting for their row group are merged this many at a time: a batch of one row
# (an image) costs kilobytes as separate Arrow buffers, and a row group holds 65,536 of them.
MERGE_BATCHES = 1024


# --- one outcome as a table ------------------------------------------------------------------


def outcome_table(
    outcomes: Sequence[Outcome],
    kept_names: Sequence[str] = (),
    hints: dict[str, pa.DataType] | None = None,
) -> pa.RecordBatch:
    """The output rows of one batch (one or more outcomes, in row order) plus ``_seq``.

    ``hints`` (one dict per run, filled as it goes) remembers the result fields' types.
    """
    parts = [_single_outcome_table(outcome, kept_names, hints) for outcome in outcomes]
    if len(parts) == 1:
        return parts[0]
    schema = merge_schemas([part.schema for part in parts])
    return pa.concat_batches([conform(part, schema) for part in parts])


def _single_outcome_table(
    outcome: Outcome, kept_names: Sequence[str], hints: dict[str, pa.DataType] | None
) -> pa.RecordBatch:
    batch = outcome.batch
    n = len(batch)
    columns: dict[str, pa.Array] = {
        SEQ: pa.repeat(pa.scalar(batch.seq, pa.int64()), n),
        "_key": pa.array(batch.keys, pa.string()),
        "_status": _constant(STATUS_OK if outcome.ok else STATUS_ERROR, pa.string(), n),
        "_error": _constant(outcome.error, pa.string(), n),
        "_error_kind": _constant(outcome.error_kind, pa.string(), n),
        "_http_status": _constant(outcome.http_status, pa.int32(), n),
        "_attempts": _constant(outcome.attempts, pa.int32(), n),
        "_latency_ms": _constant(outcome.latency_ms, pa.float64(), n),
        "_request_uuid": _constant(outcome.request_uuid, pa.string(), n),
    }
    taken = set(columns) | set(kept_names)
    if outcome.results is not None:
        for name, values in _result_columns(outcome.results, hints).items():
            columns[_result_name(name, taken)] = values
    if batch.kept is not None:
        for name, column in zip(batch.kept.schema.names, batch.kept.columns, strict=True):
            # the journal is read back message by message: no dictionary messages in it
            is_dictionary = pa.types.is_dictionary(column.type)
            columns[name] = column.dictionary_decode() if is_dictionary else column
    return pa.RecordBatch.from_pydict(columns)


def _result_name(name: str, taken: set[str]) -> str:
    # A result field never overwrites a reserved or kept input column: it moves aside.
    while name in taken or name == SEQ:
        name += RESULT_SUFFIX
    return name


def _constant(value: Any, type_: pa.DataType, n: int) -> pa.Array:
    if value is None:
        return pa.nulls(n, type_)
    return pa.repeat(pa.scalar(value, type_), n)


def _result_columns(
    results: list[dict[str, Any]], hints: dict[str, pa.DataType] | None
) -> dict[str, pa.Array]:
    return {name: _to_array(values, name, hints) for name, values in _transpose(results)}


def _transpose(results: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """The results' fields as columns, in order of first appearance."""
    if not results:
        return []
    names = list(results[0])
    try:
        # Every item has every name, and no more (so all have the same fields): the common
        # case, transposed in C by itemgetter and zip.
        if len(names) == 1:
            name = names[0]
            column = [item[name] for item in results]
            if sum(map(len, results)) == len(results):
                return [(name, column)]
        elif names:
            rows = list(map(operator.itemgetter(*names), results))
            if sum(map(len, results)) == len(names) * len(results):
                return [
                    (name, list(values))
                    for name, values in zip(names, zip(*rows, strict=True), strict=True)
                ]
    except KeyError:
        pass
    every: dict[str, None] = {}
    for item in results:
        every.update(dict.fromkeys(item))
    return [(name, [item.get(name) for item in results]) for name in every]


# Types worth remembering per field: converting to a known type skips pyarrow's inference,
# which costs four times the conversion itself. Only these two are safe to assume: a string
# column refuses non-strings, and a float column is checked for booleans (which it would
# otherwise take as 0.0 and 1.0) before the hint is used.
_HINTABLE = (pa.float64(), pa.string())


def _to_array(values: list[Any], name: str, hints: dict[str, pa.DataType] | None) -> pa.Array:
    hint = hints.get(name) if hints is not None else None
    if hint is not None and (hint == pa.string() or not any(type(v) is bool for v in values)):
        try:
            return pa.array(values, hint)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # Values whose types disagree (a number here, a string there): keep them all, as JSON.
        return pa.array([_json_text(value) for value in values], pa.string())
    if hints is not None and array.type in _HINTABLE:
        hints[name] = array.type
    return array


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    return orjson.dumps(value, default=str).decode()


# --- schemas ------------------------------------------------------------------------------------


def merge_types(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The type that holds values of both: null yields, numbers widen, else JSON text."""
    if a == b:
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_null(b):
        return a
    if _is_number(a) and _is_number(b):
        return pa.float64() if pa.types.is_floating(a) or pa.types.is_floating(b) else pa.int64()
    return pa.string()


def _is_number(type_: pa.DataType) -> bool:
    return bool(pa.types.is_integer(type_) or pa.types.is_floating(type_))


def merge_schemas(schemas: Sequence[pa.Schema]) -> pa.Schema:
    """Fields in order of first appearance, each with a type that holds all its values."""
    types: dict[str, pa.DataType] = {}
    for schema in schemas:
        for field in schema:
            known = types.get(field.name)
            types[field.name] = field.type if known is None else merge_types(known, field.type)
    return pa.schema([(name, type_) for name, type_ in types.items()])


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with exactly ``schema``'s fields: missing ones null, others converted."""
    if batch.schema.equals(schema):
        return batch
    arrays = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            arrays.append(pa.nulls(batch.num_rows, field.type))
        else:
            arrays.append(_convert(batch.column(index), field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _convert(column: pa.Array, type_: pa.DataType) -> pa.Array:
    if column.type == type_:
        return column
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), type_)
    if pa.types.is_string(type_):
        return pa.array([_json_text(value) for value in column.to_pylist()], pa.string())
    return column.cast(type_)


# --- the journal ---------------------------------------------------------------------------------


class Journal:
    """Appends finished batches to Arrow IPC stream parts in ``directory``.

    Every append goes straight to the file (no user-space buffer), so a killed process
    leaves every finished batch readable. A new part starts only when a batch brings a field
    or type the current part's schema cannot hold. Parts are named by ``generation`` (one
    per run that wrote to the folder) so that resumed and new parts never collide.
    """

    def __init__(self, directory: Path, generation: int | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.generation = next_generation(directory) if generation is None else generation
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None
        self._next_part = 0

    def append(self, batch: pa.RecordBatch) -> None:
        if self._schema is not None and _fits(batch.schema, self._schema):
            batch = conform(batch, self._schema)
        else:
            schema = batch.schema
            if self._schema is not None:
                schema = merge_schemas([self._schema, batch.schema])
            self._open_part(schema)
            batch = conform(batch, schema)
        assert self._writer is not None
        self._writer.write_batch(batch)

    def _open_part(self, schema: pa.Schema) -> None:
        self.close()
        path = self.directory / f"part-{self.generation:04d}-{self._next_part:06d}.arrows"
        self._next_part += 1
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self._schema = schema

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None
            fsync(self.directory)
        self._schema = None


def _fits(schema: pa.Schema, target: pa.Schema) -> bool:
    for field in schema:
        index = target.get_field_index(field.name)
        if index < 0:
            return False
        wanted = target.field(index).type
        if field.type != wanted and not pa.types.is_null(field.type):
            return False
    return True


def journal_parts(directory: Path) -> list[Path]:
    """The journal's parts, oldest generation first."""
    return sorted(directory.glob("part-*.arrows"))


def next_generation(directory: Path) -> int:
    generations = [int(part.name.split("-")[1]) for part in journal_parts(directory)]
    return max(generations, default=-1) + 1


# A killed run can leave a part whose last message is cut off: the batches before it stand.
_TRUNCATED = (OSError, pa.ArrowInvalid)


def read_journal(parts: Sequence[Path]) -> Iterator[pa.RecordBatch]:
    """Every whole batch in the parts, in the order written; a cut-off tail is skipped."""
    for part in parts:
        with pa.OSFile(str(part), "rb") as source:
            try:
                reader = pa.ipc.open_stream(source)
                while True:
                    yield reader.read_next_batch()
            except StopIteration:
                continue
            except _TRUNCATED:
                log.warning("journal part %s ends in a cut-off batch: skipped", part.name)


# --- assembly ------------------------------------------------------------------------------------


@dataclass
class _Index:
    """Where each batch of the journal is: its part, and its message's offset there."""

    parts: list[Path]
    schemas: list[pa.Schema]
    part_of: array[int]
    offset_of: array[int]


def _index_journal(parts: Sequence[Path], rows_per_batch: array[int]) -> _Index:
    expected = len(rows_per_batch)
    part_of = array("i", [-1]) * expected
    offset_of = array("q", [0]) * expected
    schemas = []
    for number, part in enumerate(parts):
        with pa.OSFile(str(part), "rb") as source:
            reader = pa.ipc.open_stream(source)
            schemas.append(reader.schema)
            while True:
                offset = source.tell()
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                seq = batch.column(0)[0].as_py() if batch.num_rows else -1
                if not 0 <= seq < expected:
                    raise CoverageError(_coverage_message(f"batch {seq} was not read"))
                if part_of[seq] >= 0:
                    raise CoverageError(_coverage_message(f"batch {seq} appears twice"))
                if batch.num_rows != rows_per_batch[seq]:
                    raise CoverageError(
                        _coverage_message(
                            f"batch {seq} has {batch.num_rows} result rows "
                            f"for {rows_per_batch[seq]} input rows"
                        )
                    )
                part_of[seq] = number
                offset_of[seq] = offset
    # A batch left with no rows (every row done by an earlier run: input.incremental) was not
    # sent, so it has nothing in the journal; it is covered as it is.
    missing = [seq for seq in range(expected) if part_of[seq] < 0 and rows_per_batch[seq]]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise CoverageError(
            _coverage_message(f"{len(missing)} of {expected} batches have no results ({shown})")
        )
    return _Index(list(parts), schemas, part_of, offset_of)


def _in_input_order(index: _Index) -> Iterator[pa.RecordBatch]:
    # Batches finish out of order and resumed runs add parts: read each one from its place.
    sources = [pa.OSFile(str(part), "rb") for part in index.parts]
    try:
        for seq in range(len(index.part_of)):
            number = index.part_of[seq]
            if number < 0:
                continue  # a batch with no rows (see _index_journal)
            source = sources[number]
            source.seek(index.offset_of[seq])
            message = pa.ipc.read_message(source)
            yield pa.ipc.read_record_batch(message, index.schemas[number])
    finally:
        for source in sources:
            source.close()


def assemble(
    journal_dir: Path,
    output: Path,
    rows_per_batch: array[int],
    *,
    metadata: Mapping[bytes, bytes] | None = None,
) -> int:
    """Write the journal's batches, in input order, to ``output`` (written aside, renamed).

    ``rows_per_batch[seq]`` is how many rows batch ``seq`` had when read (0: none to send,
    and none in the journal): the proof that nothing is lost or doubled. Raises
    ``CoverageError`` (and writes nothing) otherwise.
    Returns the number of rows written.
    """
    index = _index_journal(journal_parts(journal_dir), rows_per_batch)
    merged = merge_schemas([RESERVED, *index.schemas])
    result_fields = [f for f in merged if f.name not in RESERVED.names and f.name != SEQ]
    schema = pa.schema([*RESERVED, *result_fields], metadata=dict(metadata or {}))

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    written = 0
    try:
        with pq.ParquetWriter(str(temporary), schema) as writer:
            pending: list[pa.RecordBatch] = []
            pending_rows = 0
            merged = 0  # pending[:merged] are merged runs of batches; the rest as read
            for batch in _in_input_order(index):
                pending.append(conform(batch.drop_columns([SEQ]), schema))
                pending_rows += batch.num_rows
                if len(pending) - merged >= MERGE_BATCHES:
                    # Only the batches not merged yet: what is merged is never copied again.
                    pending[merged:] = [pa.concat_batches(pending[merged:])]
                    merged += 1
                if pending_rows >= ROW_GROUP_ROWS:
                    writer.write_table(pa.Table.from_batches(pending, schema))
                    written += pending_rows
                    pending, pending_rows, merged = [], 0, 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema))
                written += pending_rows
        fsync(temporary)
        os.replace(temporary, output)
        fsync(output.parent)
    finally:
        temporary.unlink(missing_ok=True)
    return written


def _coverage_message(detail: str) -> str:
    return (
        f"the results do not cover the input exactly once: {detail}. "
        "The output was not written; the journal is kept for inspection."
    )


def write_json_atomically(path: Path, document: Mapping[str, Any]) -> None:
    """Write a JSON document aside and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    os.replace(temporary, path)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
