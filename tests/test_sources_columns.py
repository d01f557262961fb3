"""Tests for batchrunner.sources.columns: the columns sent and read, checked against the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchrunner.errors import InputError
from batchrunner.sources import open_tabular
from tests.tabular_files import all_rows, sample_table, write_all_formats, write_csv, write_parquet


def test_columns_select_what_is_sent(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "t.parquet", sample_table(4))
    source = open_tabular(path, id_column="id", columns=["name", "x"])
    assert source.send_columns == ["name", "x"]
    assert all_rows(source)[1] == {"name": "row1", "x": 0.5}


def test_missing_column_says_did_you_mean(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "iris.csv", ["sepal_length", "species"], [[1.0, "a"]])
    with pytest.raises(InputError) as error:
        open_tabular(path, columns=["sepal_lenght"])
    message = str(error.value)
    assert message.startswith("input.columns: no column 'sepal_lenght' in ")
    assert "iris.csv" in message
    assert "(did you mean 'sepal_length'?)" in message
    assert "the columns are: 'sepal_length', 'species'" in message


def test_missing_id_column_says_did_you_mean(tmp_path: Path) -> None:
    for path in write_all_formats(tmp_path, sample_table(3)).values():
        with pytest.raises(InputError, match=r"input\.id_column: no column 'ID' .*'id'\?"):
            open_tabular(path, id_column="ID")
    with pytest.raises(InputError, match=r"input\.id_column: no column 'zzz'.*the columns are"):
        open_tabular(tmp_path / "data.parquet", id_column="zzz")


def test_empty_or_duplicated_columns_setting(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "t.parquet", sample_table(3))
    with pytest.raises(InputError, match=r"input\.columns is empty"):
        open_tabular(path, columns=[])
    with pytest.raises(InputError, match=r"input\.columns lists 'x' more than once"):
        open_tabular(path, columns=["x", "x"])
