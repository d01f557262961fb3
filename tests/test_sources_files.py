"""Tests for batchrunner.sources.files: finding the input's files and telling their format."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from batchrunner.errors import InputError
from batchrunner.sources import open_tabular
from batchrunner.sources.files import data_suffix, find_files, format_of, format_setting
from tests.tabular_files import all_rows, write_csv, write_jsonl


def test_folder_input_is_recursive_sorted_and_skips_hidden_and_unknown(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_csv(folder / "b.csv", ["a"], [[3]])
    write_csv(folder / "a.csv", ["a"], [[1]])
    write_csv(folder / "a" / "z.csv", ["a"], [[2]])
    write_csv(folder / ".hidden.csv", ["a"], [[99]])
    write_csv(folder / "_temporary" / "x.csv", ["a"], [[99]])
    (folder / "_SUCCESS").write_text("")
    (folder / "README.md").write_text("notes")
    source = open_tabular(folder)
    assert [p.relative_to(folder).as_posix() for p in source.paths] == ["a/z.csv", "a.csv", "b.csv"]
    assert [r["a"] for r in all_rows(source)] == [2, 1, 3]


def test_glob_input(tmp_path: Path) -> None:
    for name in ["b", "a", "c"]:
        write_csv(tmp_path / f"{name}.csv", ["v"], [[name]])
    write_jsonl(tmp_path / "d.jsonl", [{"v": "d"}])
    source = open_tabular(str(tmp_path / "*.csv"))
    assert [p.name for p in source.paths] == ["a.csv", "b.csv", "c.csv"]
    assert [r["v"] for r in all_rows(source)] == ["a", "b", "c"]
    with pytest.raises(InputError, match=r"input\.path: no input file matches .*\*\.tsv"):
        open_tabular(str(tmp_path / "*.tsv"))


def test_missing_file(tmp_path: Path) -> None:
    write_csv(tmp_path / "iris.csv", ["a"], [[1]])
    with pytest.raises(InputError, match=r"input\.path: no such file or folder: .*iirs\.csv") as e:
        open_tabular(tmp_path / "iirs.csv")
    assert "did you mean" in str(e.value) and "iris.csv" in str(e.value)
    with pytest.raises(InputError, match="does not exist either"):
        open_tabular(tmp_path / "nope" / "x.csv")


def test_missing_file_differing_in_case(tmp_path: Path) -> None:
    write_csv(tmp_path / "iris.csv", ["a"], [[1]])
    if (tmp_path / "IRIS.CSV").exists():
        pytest.skip("a case-insensitive file system")
    with pytest.raises(InputError, match=r"IRIS\.CSV \(did you mean '.*iris\.csv'\?\)"):
        open_tabular(tmp_path / "IRIS.CSV")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no input file in folder .*set input\.format"):
        open_tabular(tmp_path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError) as error:
        open_tabular(path)
    message = str(error.value)
    assert "cannot tell the format of" in message and "'.txt'" in message
    assert ".csv, .tsv, .parquet, .pq, .jsonl, .ndjson, .json" in message
    assert "input.format" in message
    assert all_rows(open_tabular(path, format="csv")) == [{"a": 1, "b": 2}]
    with pytest.raises(InputError, match=r"input\.format: unknown format 'xls'"):
        open_tabular(path, format="xls")


def test_mixed_formats_are_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", ["v"], [[1]])
    write_jsonl(tmp_path / "b.jsonl", [{"v": 1}])
    with pytest.raises(InputError, match=r"several formats.*csv: .*jsonl: "):
        open_tabular(tmp_path)


def test_compressed_csv(tmp_path: Path) -> None:
    gz = tmp_path / "z.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("id,v\nk1,1\nk2,2\n")
    source = open_tabular(gz, id_column="id")
    assert source.format == "csv"
    assert [k for b in source.iter_batches(5) for k in b.keys] == ["k1", "k2"]


def test_format_from_extension_and_setting() -> None:
    assert data_suffix(Path("data.CSV.gz")) == ".csv"
    assert data_suffix(Path("data")) == ""
    assert format_of(Path("a.ndjson.zst")) == "jsonl"
    assert format_of(Path("a.pq")) == "parquet"
    assert format_of(Path("a.parquet.gz")) is None  # Parquet compresses inside the file
    assert format_of(Path("a.txt")) is None
    assert format_setting(None) == (None, False)
    assert format_setting(" TSV ") == ("csv", True)
    assert format_setting(".json") == ("jsonl", False)
    with pytest.raises(InputError, match=r"input\.format: unknown format 'xls'; use one of 'csv'"):
        format_setting("xls")


def test_find_files_with_a_source_of_its_own(tmp_path: Path) -> None:
    for name in ["b.png", "a.jpg", "notes.txt", "_SUCCESS", ".DS_Store"]:
        (tmp_path / name).write_text("x")
    images = find_files(tmp_path, accept=lambda f: f.suffix in {".png", ".jpg"}, known=[".png"])
    assert [p.name for p in images] == ["a.jpg", "b.png"]
    everything = find_files(tmp_path, accept=None, known=[])
    assert [p.name for p in everything] == ["a.jpg", "b.png", "notes.txt"]
    with pytest.raises(InputError, match=r"no input file in folder .*\(known extensions: \.gif\)"):
        find_files(tmp_path, accept=lambda f: f.suffix == ".gif", known=[".gif"])


def test_glob_skips_hidden_names_its_wildcards_match(tmp_path: Path) -> None:
    # A Spark job's output while (or after failing) writing: _temporary/ holds partial files.
    out = tmp_path / "out"
    for folder in [out, out / "_temporary" / "0", out / "_logs", tmp_path / "_staging"]:
        write_csv(folder / "part-0.csv", ["a"], [[1]])
    (out / "_SUCCESS").write_text("")
    assert open_tabular(str(out / "**" / "*.csv")).paths == [out / "part-0.csv"]
    with pytest.raises(InputError, match=r"no input file matches"):  # _logs/, _temporary/
        open_tabular(str(out / "*" / "*.csv"))
    # Named in the pattern itself, a folder is read whatever its name.
    staged = open_tabular(str(tmp_path / "_staging" / "*.csv"))
    assert staged.paths == [tmp_path / "_staging" / "part-0.csv"]
