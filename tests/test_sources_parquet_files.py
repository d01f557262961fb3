"""Tests for batchrunner.sources.parquet_files: schemas across Parquet files, unreadable files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from batchrunner.errors import InputError
from batchrunner.sources import open_tabular
from tests.tabular_files import rows_of, write_parquet


def test_parquet_files_with_different_int_widths_are_unified(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", pa.table({"v": pa.array([1, 2], pa.int64())}))
    write_parquet(tmp_path / "b.parquet", pa.table({"v": pa.array([3], pa.int32())}))
    batches = list(open_tabular(tmp_path).iter_batches(2))
    assert [rows_of(b).column("v").type for b in batches] == [pa.int64(), pa.int64()]
    assert [r["v"] for b in batches for r in rows_of(b).to_pylist()] == [1, 2, 3]


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_text("not parquet")
    with pytest.raises(InputError, match=r"x\.parquet: cannot read this Parquet file"):
        open_tabular(path)


def test_later_parquet_file_missing_a_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "p" / "a.parquet", pa.table({"v": [1]}))
    write_parquet(tmp_path / "p" / "b.parquet", pa.table({"w": [1]}))
    with pytest.raises(InputError, match=r"b\.parquet: no column 'v'"):
        open_tabular(tmp_path / "p")


def test_later_parquet_file_with_a_column_twice(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", pa.table({"v": [1], "w": [2]}))
    twice = pa.Table.from_arrays([pa.array([3]), pa.array([4])], names=["v", "v"])
    write_parquet(tmp_path / "b.parquet", twice)
    with pytest.raises(InputError, match=r"b\.parquet: the column name 'v' appears more than"):
        open_tabular(tmp_path, columns=["v"])
