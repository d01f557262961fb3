"""Where results go: a journal of finished batches, then one Parquet file in input order.

While the run goes, finished batches are appended to a journal part (Arrow IPC stream files
in a state folder beside the output) in the order they finish: the batches that finished
together become one record batch (a message), nothing is held back, so a crash loses only
what was in flight. At the end, ``assemble`` indexes the parts (where each batch's message
starts and its row there), checks that every batch is there exactly once with all its rows,
merges the schemas (a field that appears later is added; types that disagree become JSON
text), then reads the batches back in input order, each from its place, and writes the
Parquet file aside before renaming it into place. Memory holds the index (a few bytes per
batch), never the results.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import operator
import os
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, chain, repeat
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import CoverageError, WriteError
from batchrunner.formats import OutputFormat, open_output_writer, output_format
from batchrunner.items import STATUS_ERROR, STATUS_OK, Outcome, Results
from batchrunner.writing import (
    aside_name,
    copy_descriptor,
    folder_id,
    fsync,
    open_write,
    reason,
)

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
# Rows per output row group. The Parquet writer's own buffers grow with it: with the wide
# answers' six result fields, 32,768 rows put the assembly's peak at 147-157 MB, 16,384 at
# 141-144 MB (the benchmark allows 150).
ROW_GROUP_ROWS = 16 * 1024
# Batches waiting for their row group are merged this many at a time: a batch of one row
# (an image) costs kilobytes as separate Arrow buffers, and a row group holds 32,768 of them.
MERGE_BATCHES = 1024
# How a value per outcome is spread over the outcome's rows: up to this many rows in all, in
# a Python list (~0.04 us a row); above, for a few outcomes, by one repeat per outcome
# (~10 us each); for more, by run-end decoding (in C, but ~45 us a call).
SPREAD_IN_PYTHON = 1024
SPREAD_BY_REPEATS = 4


# --- one outcome as a table ------------------------------------------------------------------


def outcome_table(
    outcomes: Sequence[Outcome],
    kept_names: Sequence[str] = (),
    hints: dict[str, pa.DataType] | None = None,
    result_fields: Sequence[str] | None = None,
) -> pa.RecordBatch:
    """The output rows of ``outcomes`` plus ``_seq``, one outcome's rows after another's.

    The outcomes may come from several batches (the writer journals what finished together
    in one message); each batch's outcomes must be together and in row order. Columns are
    built once for all of them: the per-outcome values (status, error, latency, ...) are
    spread over their rows in bulk (see ``SPREAD_IN_PYTHON``). ``hints`` (one dict per run, filled
    as it goes) remembers the result fields' types. ``result_fields`` (output.result_fields)
    keeps only those result fields; None keeps every one.
    """
    outcomes = [outcome for outcome in outcomes if len(outcome.batch)]
    lengths = [len(outcome.batch) for outcome in outcomes]
    total = sum(lengths)

    def spread(values: list[Any], type_: pa.DataType) -> pa.Array:
        first = values[0] if values else None
        if values.count(first) == len(values):  # status, error, attempts mostly
            return _constant(first, type_, total)
        if total <= SPREAD_IN_PYTHON:
            return pa.array(list(chain.from_iterable(map(repeat, values, lengths))), type_)
        if len(values) <= SPREAD_BY_REPEATS:
            return pa.concat_arrays(
                [_constant(value, type_, rows) for value, rows in zip(values, lengths, strict=True)]
            )
        decoded = pc.run_end_decode(
            pa.RunEndEncodedArray.from_arrays(
                pa.array(list(accumulate(lengths)), pa.int64()), pa.array(values, type_)
            )
        )
        return cast(pa.Array, decoded)

    columns: dict[str, pa.Array] = {
        SEQ: spread([outcome.batch.seq for outcome in outcomes], pa.int64()),
        "_key": pa.array(
            list(chain.from_iterable(outcome.batch.keys for outcome in outcomes)), pa.string()
        ),
        "_status": spread(
            [STATUS_OK if outcome.ok else STATUS_ERROR for outcome in outcomes], pa.string()
        ),
        "_error": spread([outcome.error for outcome in outcomes], pa.string()),
        "_error_kind": spread([outcome.error_kind for outcome in outcomes], pa.string()),
        "_http_status": spread([outcome.http_status for outcome in outcomes], pa.int32()),
        "_attempts": spread([outcome.attempts for outcome in outcomes], pa.int32()),
        "_latency_ms": spread([outcome.latency_ms for outcome in outcomes], pa.float64()),
        "_request_uuid": spread([outcome.request_uuid for outcome in outcomes], pa.string()),
    }
    taken = set(columns) | set(kept_names)
    for name, values in _result_columns(outcomes, total, hints, result_fields).items():
        columns[_result_name(name, taken)] = values
    kept = [outcome.batch.kept for outcome in outcomes if outcome.batch.kept is not None]
    if kept:
        if len(kept) != len(outcomes):
            raise ValueError("either every batch keeps input columns or none does")
        # the journal is read back message by message: no dictionary messages in it
        kept = [_decode_dictionaries(part) for part in kept]
        schema = merge_schemas([part.schema for part in kept])
        whole = pa.concat_batches([conform(part, schema) for part in kept])
        for name, column in zip(whole.schema.names, whole.columns, strict=True):
            columns[name] = column
    return pa.RecordBatch.from_pydict(columns)


def _decode_dictionaries(batch: pa.RecordBatch) -> pa.RecordBatch:
    if not any(pa.types.is_dictionary(field.type) for field in batch.schema):
        return batch
    columns = [
        column.dictionary_decode() if pa.types.is_dictionary(column.type) else column
        for column in batch.columns
    ]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


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
    outcomes: Sequence[Outcome],
    total: int,
    hints: dict[str, pa.DataType] | None,
    only: Sequence[str] | None = None,
) -> dict[str, pa.Array]:
    """The result fields of the outcomes that succeeded, null in the rows of those that
    failed."""
    answered = [outcome.results for outcome in outcomes if outcome.results is not None]
    if not answered:
        return {}
    columns = _arrow_columns(answered, hints, only)
    if columns is None:
        results = (
            _objects(answered[0])
            if len(answered) == 1
            else list(chain.from_iterable(map(_objects, answered)))
        )
        fields = _transpose(results) if only is None else _pick(results, only)
        columns = {name: _to_array(values, name, hints) for name, values in fields}
    if sum(len(part) for part in answered) == total:
        return columns
    # Some outcomes failed: where each row's result is (null for a failed outcome's rows).
    positions: list[int | None] = []
    done = 0
    for outcome in outcomes:
        rows = len(outcome.batch)
        if outcome.results is None:
            positions.extend([None] * rows)
        else:
            positions.extend(range(done, done + rows))
            done += rows
    where = pa.array(positions, pa.int64())
    return {name: column.take(where) for name, column in columns.items()}


def _objects(results: Results) -> list[dict[str, Any]]:
    return results if isinstance(results, list) else results.to_pylist()


def _arrow_columns(
    answered: Sequence[Results],
    hints: dict[str, pa.DataType] | None,
    only: Sequence[str] | None,
) -> dict[str, pa.Array] | None:
    """The result columns when every outcome's results are Arrow columns of one schema (a
    codec decoded them so), with the hints kept as the objects' path keeps them; None
    otherwise (the objects' path takes them)."""
    first = answered[0]
    if not isinstance(first, pa.RecordBatch):
        return None
    schema = first.schema
    if not all(isinstance(p, pa.RecordBatch) and schema.equals(p.schema) for p in answered):
        return None  # a codec's types changed between answers: the objects' path merges
    names = schema.names if only is None else [name for name in only if name in schema.names]
    known = hints if hints is not None else {}
    if any(known.get(name) is JSON_TEXT for name in names):
        return None  # kept as JSON text of the values as they came
    columns: dict[str, pa.Array] = {}
    for name in names:
        parts = [cast(pa.RecordBatch, part).column(name) for part in answered]
        column = parts[0] if len(parts) == 1 else pa.concat_arrays(parts)
        hint = known.get(name)
        if hint == pa.float64() and pa.types.is_int64(column.type):
            column = column.cast(hint)  # as the objects' path converts them with the hint
        elif hints is not None and hint is None and column.type in _HINTABLE:
            hints[name] = column.type
        columns[name] = column
    return columns


def _pick(results: list[dict[str, Any]], names: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """The fields ``names`` of the results as columns (null where an item lacks one); a
    field no item carries has no column."""
    picked = []
    for name in names:
        values = list(map(operator.methodcaller("get", name), results))
        if name in results[0] or values.count(None) < len(values):
            picked.append((name, values))
    return picked


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
            column = list(map(operator.itemgetter(name), results))
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
# The hint of a field whose values came in types no Arrow type holds (["rose", 0.9]): JSON
# text. Once JSON text, its column in the output is JSON text whatever comes later.
JSON_TEXT = pa.large_string()


def _to_array(values: list[Any], name: str, hints: dict[str, pa.DataType] | None) -> pa.Array:
    if values and isinstance(values[0], np.ndarray) and values[0].ndim == 1:
        # Vectors a codec made with NumPy (embeddings): a fixed-size list of their dtype,
        # built in C; a codec checks that all have one length.
        vector_type = pa.list_(pa.from_numpy_dtype(values[0].dtype), len(values[0]))
        with suppress(pa.ArrowInvalid, pa.ArrowTypeError):
            return pa.array(values, vector_type)
    hint = hints.get(name) if hints is not None else None
    if hint is JSON_TEXT:
        return pa.array([_json_text(value) for value in values], pa.string())
    if hint is not None and (hint == pa.string() or bool not in set(map(type, values))):
        try:
            return pa.array(values, hint)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass
    try:
        array = pa.array(values)
        if nesting_depth(array.type) > MAX_NESTING:
            raise pa.ArrowInvalid("nested too deep to write and read back")
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # Values whose types disagree (a number here, a string there), or nested too deep
        # for Arrow and Parquet: keep them all, as JSON text, from now on without trying (a
        # failed inference costs more than converting).
        if hints is not None:
            hints[name] = JSON_TEXT
        return pa.array([_json_text(value) for value in values], pa.string())
    if hints is not None and array.type in _HINTABLE:
        hints[name] = array.type
    return array


# The deepest result values kept as Arrow lists and structs: Arrow's IPC (the journal) stops
# at 64 levels, and pyarrow.parquet.read_table's defaults refuse a schema of lists 50 deep.
# Deeper values are kept as JSON text, which every reader takes.
MAX_NESTING = 32


def nesting_depth(type_: pa.DataType) -> int:
    """How many list, struct and map levels ``type_`` has (0 for a flat type)."""
    if type_.num_fields == 0:
        return 0
    return 1 + max(nesting_depth(type_.field(i).type) for i in range(type_.num_fields))


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return orjson.dumps(value, default=str).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (255 levels)
        try:
            return json.dumps(value, default=str)
        except RecursionError:
            return '"<a value nested too deep to keep>"'


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

    The journal holds every file of the folder open for reading (the manifest and the parts:
    a few), so that when the folder is removed while the run goes on (a clean-up script, a
    hasty ``rm -rf``) it can put them back from what it holds: the work done is not lost.
    A write that fails (the disk full) raises ``WriteError``.
    """

    def __init__(self, directory: Path, generation: int | None = None) -> None:
        self.directory = directory
        self._guard(lambda: directory.mkdir(parents=True, exist_ok=True), directory)
        self.generation = next_generation(directory) if generation is None else generation
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None
        self._next_part = 0
        self._held: dict[str, int] = {}  # file name -> a descriptor open for reading
        for path in sorted(directory.iterdir()):
            if path.is_file():
                self._hold(path)
        self._folder_id = folder_id(directory)

    def append(self, batch: pa.RecordBatch) -> None:
        self._check_folder()
        if self._schema is not None and _fits(batch.schema, self._schema):
            batch = conform(batch, self._schema)
        else:
            schema = batch.schema
            if self._schema is not None:
                schema = merge_schemas([self._schema, batch.schema])
            self._open_part(schema)
            batch = conform(batch, schema)
        writer = self._writer
        assert writer is not None
        self._guard(lambda: writer.write_batch(batch), self._part_path(self._next_part - 1))

    def _part_path(self, number: int) -> Path:
        return self.directory / f"part-{self.generation:04d}-{number:06d}.arrows"

    def _open_part(self, schema: pa.Schema) -> None:
        self._close_part()
        path = self._part_path(self._next_part)
        self._next_part += 1

        def open_part() -> None:
            self._sink = open_write(path)
            self._hold(path)
            self._writer = pa.ipc.new_stream(self._sink, schema)

        self._guard(open_part, path)
        self._schema = schema

    def _hold(self, path: Path) -> None:
        old = self._held.pop(path.name, None)
        if old is not None:
            os.close(old)
        self._held[path.name] = os.open(path, os.O_RDONLY)

    def _close_part(self) -> None:
        writer, sink = self._writer, self._sink
        self._writer = self._sink = None
        self._schema = None
        if writer is not None:
            self._guard(writer.close, self.directory)
        if sink is not None:
            self._guard(sink.close, self.directory)

    def close(self) -> None:
        """Finish the current part, put the folder back if it was removed, and let go of
        the files held. Calling it again does nothing."""
        wrote = self._sink is not None
        self._close_part()
        if self._held:
            self._check_folder()
            for descriptor in self._held.values():
                os.close(descriptor)
            self._held.clear()
        if wrote:
            self._guard(lambda: fsync(self.directory), self.directory)

    def _check_folder(self) -> None:
        """Put the folder's files back from those held if the folder was removed or
        replaced since the journal opened it."""
        if folder_id(self.directory) == self._folder_id:
            return
        self._close_part()  # its rows are in the file held; later ones go to a new part
        self._guard(lambda: self.directory.mkdir(parents=True, exist_ok=True), self.directory)
        restored = 0
        for name, descriptor in self._held.items():
            target = self.directory / name
            if not target.exists():
                self._guard(partial(copy_descriptor, descriptor, target), target)
                restored += 1
        self._folder_id = folder_id(self.directory)
        log.warning(
            "the run's state folder %s was removed while the run went on: put back its "
            "%d files from the copies the run held open; nothing finished is lost",
            self.directory,
            restored,
        )

    def _guard(self, write: Callable[[], object], path: Path) -> None:
        """Do ``write``; a failure (the disk full, the folder read-only) is a WriteError."""
        try:
            write()
        except OSError as exc:
            raise WriteError(
                f"cannot write the run's state in {path}: {reason(exc)}. The run stopped; "
                f"the batches finished before are kept in {self.directory}: make room (or "
                "fix the folder) and re-run the same command to resume"
            ) from exc


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


def by_batch(message: pa.RecordBatch) -> Iterator[tuple[int, pa.RecordBatch]]:
    """A journal message's batches: (seq, its rows), in the order they were written.

    A message holds the rows of one or more batches, each batch's rows together."""
    if message.num_rows == 0:
        return
    seqs = message.column(SEQ)
    first = seqs[0].as_py()
    # The common case, one batch, is checked in C without a loop.
    if seqs[-1].as_py() == first and pc.all(pc.equal(seqs, first)).as_py():
        yield first, message
        return
    runs = pc.run_end_encode(seqs)
    start = 0
    for seq, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        yield seq, message.slice(start, end - start)
        start = end


@dataclass
class _Index:
    """Where each batch of the journal is: its part, its message's offset there, and the
    row its rows start at in that message."""

    parts: list[Path]
    schemas: list[pa.Schema]
    part_of: array[int]
    offset_of: array[int]
    row_of: array[int]


def _index_journal(parts: Sequence[Path], rows_per_batch: array[int]) -> _Index:
    expected = len(rows_per_batch)
    part_of = array("i", [-1]) * expected
    offset_of = array("q", [0]) * expected
    row_of = array("q", [0]) * expected
    schemas = []
    for number, part in enumerate(parts):
        with pa.OSFile(str(part), "rb") as source:
            reader = pa.ipc.open_stream(source)
            schemas.append(reader.schema)
            while True:
                offset = source.tell()
                try:
                    message = reader.read_next_batch()
                except StopIteration:
                    break
                row = 0
                for seq, batch in by_batch(message):
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
                    row_of[seq] = row
                    row += batch.num_rows
    # A batch left with no rows (every row done by an earlier run: input.incremental) was not
    # sent, so it has nothing in the journal; it is covered as it is.
    missing = [seq for seq in range(expected) if part_of[seq] < 0 and rows_per_batch[seq]]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise CoverageError(
            _coverage_message(f"{len(missing)} of {expected} batches have no results ({shown})")
        )
    return _Index(list(parts), schemas, part_of, offset_of, row_of)


# Messages read back and kept for the batches after: batches finish roughly in input order,
# so those journaled together are mostly read back close together. At most this many
# messages, and rows (beyond the one message being read).
_CACHED_MESSAGES = 16
_CACHED_ROWS = 16 * 1024


def _in_input_order(index: _Index, rows_per_batch: array[int]) -> Iterator[pa.RecordBatch]:
    # Batches finish out of order and resumed runs add parts: read each one from its place.
    sources = [pa.OSFile(str(part), "rb") for part in index.parts]
    cache: OrderedDict[tuple[int, int], pa.RecordBatch] = OrderedDict()
    cached_rows = 0
    try:
        for seq in range(len(index.part_of)):
            number = index.part_of[seq]
            if number < 0:
                continue  # a batch with no rows (see _index_journal)
            where = (number, index.offset_of[seq])
            message = cache.get(where)
            if message is None:
                source = sources[number]
                source.seek(where[1])
                message = pa.ipc.read_record_batch(
                    pa.ipc.read_message(source), index.schemas[number]
                )
                cache[where] = message
                cached_rows += message.num_rows
                while len(cache) > 1 and (
                    len(cache) > _CACHED_MESSAGES or cached_rows > _CACHED_ROWS
                ):
                    cached_rows -= cache.popitem(last=False)[1].num_rows
            rows = rows_per_batch[seq]
            if rows == message.num_rows:
                yield message
            else:
                yield message.slice(index.row_of[seq], rows)
    finally:
        for source in sources:
            source.close()


def assemble(
    journal_dir: Path,
    output: Path,
    rows_per_batch: array[int],
    *,
    metadata: Mapping[bytes, bytes] | None = None,
    format: OutputFormat | None = None,
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

    temporary = aside_name(output)
    written = 0
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        kind = format or output_format(output) or OutputFormat.parquet  # see formats
        with open_write(temporary) as file, open_output_writer(file, schema, kind) as writer:
            pending: list[pa.RecordBatch] = []
            pending_rows = 0
            merged = 0  # pending[:merged] are merged runs of batches; the rest as read
            for batch in _in_input_order(index, rows_per_batch):
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
    except OSError as exc:
        raise WriteError(
            f"cannot write the output {output}: {reason(exc)}. Every result is kept in "
            f"{journal_dir}: make room (or fix the folder) and re-run the same command; it "
            "writes the output again without sending anything"
        ) from exc
    finally:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
    return written


def _coverage_message(detail: str) -> str:
    return (
        f"the results do not cover the input exactly once: {detail}. "
        "The output was not written; the journal is kept for inspection."
    )
