"""Tests for batchrunner.sources.widening: CSV and JSON-lines column types widened mid-stream."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from batchrunner.errors import InputError
from batchrunner.sources import open_tabular
from batchrunner.sources.widening import (
    castable,
    describe_type,
    describe_value,
    widen_text,
    widen_value,
)
from tests.tabular_files import all_rows, rows_of, write_csv, write_jsonl


def test_csv_int_column_that_later_holds_a_string(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n" + "".join(f"{i},x{i}\n" for i in range(300)) + "n/a!,y\n7,z\n")
    source = open_tabular(path, block_bytes=128)
    assert source.schema.field("a").type == pa.int64()  # guessed from the first block
    with caplog.at_level(logging.WARNING, logger="batchrunner.sources.tabular"):
        rows = all_rows(source, 64)
    assert len(rows) == 302
    assert [r["a"] for r in rows[:3]] == [0, 1, 2]
    assert [r["a"] for r in rows[-3:]] == ["299", "n/a!", "7"]
    assert [r["b"] for r in rows[-2:]] == ["y", "z"]
    assert "line 302: column 'a' holds 'n/a!'" in caplog.text
    assert source.scan_count() == 302


def test_csv_int_column_that_later_holds_a_float(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("id,a\n" + "".join(f"k{i},{i}\n" for i in range(200)) + "k200,2.5\n")
    source = open_tabular(path, id_column="id", keep_input=True, block_bytes=100)
    batches = list(source.iter_batches(50))
    rows = [r for b in batches for r in rows_of(b).to_pylist()]
    assert [r["a"] for r in rows[-2:]] == [199, 2.5]
    assert [k for b in batches for k in b.keys] == [f"k{i}" for i in range(201)]
    assert batches[-1].kept is not None
    assert batches[-1].kept.column("a").type == pa.float64()


def test_csv_type_change_in_a_later_file(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", ["v"], [[1], [2]])
    write_csv(tmp_path / "b.csv", ["v"], [[3], ["x"]])
    source = open_tabular(tmp_path)
    assert [r["v"] for r in all_rows(source, 2)] == [1, 2, "3", "x"]
    # A batch straddling the change takes the wider type for all its rows.
    assert [r["v"] for r in all_rows(source, 3)] == ["1", "2", "3", "x"]


def test_csv_empty_column_then_values_and_finer_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    lines = [f"{i},,2024-01-02 03:04:{i % 60:02d}" for i in range(100)]
    lines += ["100,7,2024-01-02 03:04:05.5"]
    path.write_text("i,empty,when\n" + "\n".join(lines) + "\n")
    source = open_tabular(path, block_bytes=128)
    assert source.schema.field("empty").type == pa.null()
    assert source.schema.field("when").type == pa.timestamp("s")
    rows = all_rows(source, 30)
    assert rows[0] == {"i": 0, "empty": None, "when": "2024-01-02T03:04:00"}
    assert rows[-1] == {"i": 100, "empty": 7, "when": "2024-01-02T03:04:05.500000000"}


def test_jsonl_field_widened_mid_file(tmp_path: Path) -> None:
    records = [{"a": i, "b": None} for i in range(200)] + [{"a": 2.5, "b": "x"}]
    source = open_tabular(write_jsonl(tmp_path / "x.jsonl", records), block_bytes=200)
    rows = all_rows(source, 64)
    assert len(rows) == 201
    assert rows[0] == {"a": 0, "b": None}
    assert rows[-1] == {"a": 2.5, "b": "x"}


def test_jsonl_number_then_text_is_an_input_error(tmp_path: Path) -> None:
    records = [{"a": i} for i in range(200)] + [{"a": "text"}]
    source = open_tabular(write_jsonl(tmp_path / "x.jsonl", records), block_bytes=200)
    with pytest.raises(InputError, match=r"x\.jsonl, line 201: field 'a' holds text .*numbers"):
        list(source.iter_batches(64))


# -- what a value widens to -------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "text", "wider"),
    [
        (pa.null(), "7", pa.int64()),
        (pa.null(), "2.5", pa.float64()),
        (pa.null(), "x", pa.string()),
        (pa.int64(), "2.5", pa.float64()),
        (pa.int64(), "n/a", pa.string()),
        (pa.timestamp("s"), "2024-01-02 03:04:05.5", pa.timestamp("ns")),
        (pa.timestamp("s", tz="UTC"), "soon", pa.string()),
        (pa.float64(), "x", pa.string()),
        (pa.binary(), "x", None),
    ],
)
def test_widen_text(current: pa.DataType, text: str, wider: pa.DataType | None) -> None:
    assert widen_text(current, text) == wider


@pytest.mark.parametrize(
    ("current", "value", "wider"),
    [
        (pa.int64(), None, pa.int64()),
        (pa.null(), 3, pa.int64()),
        (pa.null(), "x", pa.string()),
        (pa.int64(), 2.5, pa.float64()),
        (pa.float64(), 3, pa.float64()),
        (pa.int64(), "x", None),
        (pa.int64(), True, None),
        (pa.bool_(), 1, None),
        (pa.string(), {"a": 1}, None),
        (pa.timestamp("s"), "2024-01-02 03:04:05", pa.timestamp("s")),
        (pa.timestamp("s"), "not a time", pa.string()),
        (pa.list_(pa.int64()), [1, 2.5], pa.list_(pa.float64())),
        (pa.list_(pa.int64()), [1, "x"], None),
        (pa.struct([("a", pa.int64())]), {"a": 1.5}, pa.struct([("a", pa.float64())])),
        (pa.struct([("a", pa.int64())]), {"a": "x"}, None),
    ],
)
def test_widen_value(current: pa.DataType, value: Any, wider: pa.DataType | None) -> None:
    assert widen_value(current, value) == wider


def test_castable() -> None:
    assert castable(["2.5"], pa.string(), pa.float64())
    assert not castable(["x"], pa.string(), pa.float64())
    assert castable([], pa.int32(), pa.int64())
    assert not castable([], pa.list_(pa.int64()), pa.int64())


def test_describing_values_and_types() -> None:
    assert describe_value(2.5) == "a number (2.5)"
    assert describe_value(None) == "null (null)"
    assert describe_value([1]) == "an array ([1])"
    assert describe_value({"a": True}) == 'an object ({"a":true})'
    assert describe_value("x" * 100) == "text (" + '"' + "x" * 76 + "...)"
    assert describe_type(pa.int32()) == "numbers"
    assert describe_type(pa.large_string()) == "text"
    assert describe_type(pa.struct([("a", pa.int64())])) == "objects"
    assert describe_type(pa.timestamp("s")) == "timestamp[s]"
