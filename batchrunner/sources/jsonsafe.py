"""JSON-safe values: an Arrow batch converted so that every value has a JSON form.

Whole columns at a time with ``pyarrow.compute``; Python runs per value only for the rare
types Arrow has no kernel for (binary as base64, UUIDs). ``json_safe`` says what becomes what.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["json_safe"]

_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}
_ISO_SECONDS = "%Y-%m-%dT%H:%M:%S"  # Arrow's %S carries the unit's fraction (.123 for ms)


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
        # numpy's check, over the values as they are (no copy; Arrow's to_numpy would import
        # pandas), is ten times faster
        if not array.null_count and len(array) and not types.is_float16(kind):
            width = 4 if types.is_float32(kind) else 8
            values = np.frombuffer(
                array.buffers()[1],
                np.float32 if width == 4 else np.float64,
                len(array),
                array.offset * width,
            )
            if np.isfinite(values).all():
                return None
        finite = pc.is_finite(array)
        if pc.all(finite).as_py() is not False:  # True, or None when all null / empty
            return None
        return pc.if_else(finite, array, pa.nulls(len(array), kind))  # pa.scalar: pandas
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
