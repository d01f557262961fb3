"""Schemas that hold every batch: merged types (null yields, numbers widen, anything else
becomes JSON text), a batch conformed to a merged schema, and values as JSON text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson
import pyarrow as pa


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
