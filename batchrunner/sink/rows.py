"""One ``Outcome`` (or several finished together) as an Arrow record batch: the output's
reserved columns, the result fields (typed by hints a run remembers, JSON text where types
disagree or nest too deep) and the kept input columns, plus ``_seq`` for the journal."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from contextlib import suppress
from itertools import accumulate, chain, repeat
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.items import STATUS_ERROR, STATUS_OK, Outcome, Results
from batchrunner.sink.schemas import _json_text, conform, merge_schemas

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
# How a value per outcome is spread over the outcome's rows: up to this many rows in all, in
# a Python list (~0.04 us a row); above, for a few outcomes, by one repeat per outcome
# (~10 us each); for more, by run-end decoding (in C, but ~45 us a call).
SPREAD_IN_PYTHON = 1024
SPREAD_BY_REPEATS = 4


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
