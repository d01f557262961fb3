"""Tests for batchrunner.sources.csv_files: delimiters, headers and malformed lines in CSV files."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchrunner.errors import InputError
from batchrunner.sources import open_tabular
from batchrunner.sources.csv_files import csv_delimiters
from tests.tabular_files import all_rows, write_csv


def test_malformed_csv_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b,c,d,e\n1,2,3,4,5\n1,2,3,4,5\n1,2,3,4,5,6\n1,2,3,4,5\n")
    with pytest.raises(InputError, match=r"x\.csv, line 4: expected 5 columns, got 6"):
        list(open_tabular(path).iter_batches(2))


def test_malformed_csv_line_mid_stream(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n" + "1,2\n" * 500 + "1,2,3\n")
    source = open_tabular(path, block_bytes=256)
    batches = source.iter_batches(100)
    assert len(next(batches)) == 100
    with pytest.raises(InputError, match=r"x\.csv, line 502: expected 2 columns, got 3"):
        list(batches)
    with pytest.raises(InputError, match="line 502"):
        source.scan_count()


def test_tsv_and_csv_delimiter(tmp_path: Path) -> None:
    tsv = write_csv(tmp_path / "t.tsv", ["a", "b"], [[1, "x,y"]], sep="\t")
    assert all_rows(open_tabular(tsv)) == [{"a": 1, "b": "x,y"}]
    semi = write_csv(tmp_path / "s.csv", ["a", "b"], [[1, 2]], sep=";")
    assert all_rows(open_tabular(semi, csv_delimiter=";")) == [{"a": 1, "b": 2}]
    with pytest.raises(InputError, match=r"input\.csv_delimiter must be one character"):
        open_tabular(semi, csv_delimiter=";;")


def test_later_csv_file_missing_a_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", ["id", "v"], [[1, 2]])
    write_csv(tmp_path / "b.csv", ["id", "w"], [[1, 2]])
    with pytest.raises(InputError, match=r"b\.csv: no column 'v' in the header"):
        open_tabular(tmp_path, id_column="id")


def test_csv_delimiters() -> None:
    paths = [Path("a.tsv"), Path("b.csv.gz"), Path("c.TSV.gz")]
    assert csv_delimiters(paths, None, False) == {paths[0]: "\t", paths[1]: ",", paths[2]: "\t"}
    assert set(csv_delimiters(paths, None, True).values()) == {"\t"}
    assert set(csv_delimiters(paths, ";", False).values()) == {";"}
    with pytest.raises(InputError, match=r"got '' \(for tabs write '\\t'\)"):
        csv_delimiters(paths, "", False)


def test_later_csv_file_with_a_column_twice(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", ["v", "w"], [[1, 2]])
    write_csv(tmp_path / "b.csv", ["v", "v", "w"], [[3, 4, 5]])
    with pytest.raises(InputError, match=r"b\.csv: the column name 'v' appears more than once"):
        open_tabular(tmp_path, columns=["v"])
