"""A regular answer's items as Arrow columns, and their echo checked column by column.

Most answers are regular: every ``resp_data`` item an object with the same fields, each a
number, a string or a boolean, none null. ``item_columns`` turns such items into one
``pa.RecordBatch`` in C (pyarrow reads the objects a field at a time and infers each
column's type as it would for a column of those values), so that no Python list is built
per field and the sink takes the columns as they are. Anything else (a field missing or
extra, a null, a nested value, types that no Arrow type holds) gives None: the caller keeps
the items as objects, and every check and message is the same as before.

``check_echo_columns`` does what ``modelarts.check_echo`` does, a column at a time: the
common case (every echo equal, or within 1e-6 for numbers) is decided in Arrow; any other
falls back to the value-by-value comparison, which names the first row that differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# Column types kept as they come: what JSON scalars infer to.
_FLAT = (pa.types.is_int64, pa.types.is_float64, pa.types.is_string, pa.types.is_boolean)
# A model computing in float32 echoes 5.1 as 5.099999904632568: equal enough (as check_echo).
ECHO_REL_TOL = 1e-6


def item_columns(items: list[dict[str, Any]]) -> pa.RecordBatch | None:
    """``items`` (objects, already checked) as columns, or None when they are not regular."""
    if not items:
        return None
    width = len(items[0])
    # Every item has as many fields as the first; with no null below, they are its fields.
    if not width or sum(map(len, items)) != width * len(items):
        return None
    try:
        columns = pa.RecordBatch.from_pylist(items)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, TypeError):
        return None  # types no Arrow type holds together: the sink keeps them as JSON text
    for column in columns.columns:
        if column.null_count or not any(test(column.type) for test in _FLAT):
            return None
    return columns


def check_echo_columns(
    results: pa.RecordBatch,
    sent: pa.RecordBatch,
    keys: Sequence[str],
    compare: Callable[[str, list[Any], list[Any], Sequence[str]], None],
) -> None:
    """Raise (through ``compare``, the value-by-value check) when a result echoes a sent
    field with another row's value. The fields compared are check_echo's: those both sides
    carry whose first sent value is a JSON scalar (or null)."""
    if not results.num_rows or not sent.num_rows:
        return
    for name in results.schema.names:
        index = sent.schema.get_field_index(name)
        if index < 0:
            continue
        column = sent.column(index)
        if not _scalar(column.type) and column[0].is_valid:
            continue  # a nested or other value: not compared (as check_echo)
        echoed = results.column(name)
        if not _same(column, echoed):
            compare(name, column.to_pylist(), echoed.to_pylist(), keys)


def _scalar(type_: pa.DataType) -> bool:
    """Whether the column's values are JSON scalars in Python (int, float, str, bool, None)."""
    if pa.types.is_dictionary(type_):
        return _scalar(type_.value_type)
    return bool(
        pa.types.is_integer(type_)
        or pa.types.is_floating(type_)
        or pa.types.is_boolean(type_)
        or pa.types.is_string(type_)
        or pa.types.is_large_string(type_)
        or pa.types.is_string_view(type_)
        or pa.types.is_null(type_)
    )


def _number(type_: pa.DataType) -> bool:
    return bool(pa.types.is_integer(type_) or pa.types.is_floating(type_))


def _same(sent: pa.Array, echoed: pa.Array) -> bool:
    """Whether every echo is the value sent (numbers within ``ECHO_REL_TOL``), decided in
    Arrow; False means "compare value by value", not "different"."""
    if sent.type == echoed.type and sent.equals(echoed):
        return True
    if sent.null_count or not (_number(sent.type) and _number(echoed.type)):
        return False
    ours = pc.cast(sent, pa.float64(), safe=False)  # big integers: within the tolerance
    theirs = pc.cast(echoed, pa.float64(), safe=False)
    gap = pc.abs(pc.subtract(ours, theirs))
    scale = pc.multiply(pc.max_element_wise(pc.abs(ours), pc.abs(theirs)), ECHO_REL_TOL)
    # NaN or infinities make a comparison false: the values are then compared one by one.
    return bool(pc.all(pc.less_equal(gap, scale)).as_py())
