"""Tests for batchrunner.sources.jsonsafe: every value made representable in JSON, column-wise."""

from __future__ import annotations

import base64
import datetime as dt
import decimal

import pyarrow as pa

from batchrunner.sources.jsonsafe import json_safe


def test_json_safe_floats() -> None:
    batch = pa.record_batch({"f": [1.5, float("nan"), float("inf"), float("-inf"), None]})
    assert json_safe(batch).column("f").to_pylist() == [1.5, None, None, None, None]
    f32 = pa.record_batch({"f": pa.array([1.0, float("nan")], pa.float32())})
    assert json_safe(f32).column("f").to_pylist() == [1.0, None]


def test_json_safe_is_free_when_nothing_to_convert() -> None:
    batch = pa.record_batch(
        {
            "i": [1, 2],
            "s": ["a", None],
            "b": [True, False],
            "f": [0.5, None],
            "n": pa.nulls(2),
            "u": pa.array([1, 2], pa.uint64()),
        }
    )
    assert json_safe(batch) is batch


def test_json_safe_timestamps() -> None:
    moment = dt.datetime(2024, 1, 2, 3, 4, 5, 123000)
    whole = dt.datetime(2024, 1, 2, 3, 4, 5)
    batch = pa.record_batch(
        {
            "s": pa.array([whole, None], pa.timestamp("s")),
            "ms": pa.array([moment, None], pa.timestamp("ms")),
            "utc": pa.array([whole, None], pa.timestamp("s", tz="UTC")),
            "india": pa.array([whole, None], pa.timestamp("ms", tz="+05:30")),
        }
    )
    safe = json_safe(batch).to_pylist()
    assert safe[0] == {
        "s": "2024-01-02T03:04:05",
        "ms": "2024-01-02T03:04:05.123",
        "utc": "2024-01-02T03:04:05+00:00",
        "india": "2024-01-02T08:34:05.000+05:30",
    }
    assert safe[1] == {"s": None, "ms": None, "utc": None, "india": None}


def test_json_safe_dates_times_decimals_durations_binary() -> None:
    batch = pa.record_batch(
        {
            "d32": pa.array([dt.date(2024, 1, 2)], pa.date32()),
            "d64": pa.array([dt.date(2024, 1, 2)], pa.date64()),
            "t": pa.array([dt.time(3, 4, 5)], pa.time32("s")),
            "dec": pa.array([decimal.Decimal("1.25")], pa.decimal128(5, 2)),
            "dur": pa.array([dt.timedelta(seconds=1, milliseconds=500)], pa.duration("ms")),
            "bin": pa.array([b"\x00\xffhi"], pa.binary()),
            "cat": pa.array(["red"]).dictionary_encode(),
        }
    )
    assert json_safe(batch).to_pylist() == [
        {
            "d32": "2024-01-02",
            "d64": "2024-01-02",
            "t": "03:04:05",
            "dec": 1.25,
            "dur": 1.5,
            "bin": base64.b64encode(b"\x00\xffhi").decode(),
            "cat": "red",
        }
    ]


def test_json_safe_nested() -> None:
    lists = pa.array([[1.0, float("nan")], None, [float("inf")], [2.0]]).slice(1)
    structs = pa.array(
        [{"x": float("nan"), "when": dt.date(2024, 1, 2)}, None],
        pa.struct([("x", pa.float64()), ("when", pa.date32())]),
    )
    batch = pa.record_batch({"l": lists, "s": pa.concat_arrays([structs, structs]).slice(0, 3)})
    assert json_safe(batch).to_pylist() == [
        {"l": None, "s": {"x": None, "when": "2024-01-02"}},
        {"l": [None], "s": None},
        {"l": [2.0], "s": {"x": None, "when": "2024-01-02"}},
    ]
    ints = pa.record_batch({"l": pa.array([[1, 2], None])})
    assert json_safe(ints) is ints
