"""Tests for batchrunner.sources.tabular: real CSV, Parquet and JSON-lines files on disk."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import gzip
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batchrunner.errors import InputError
from batchrunner.items import Batch
from batchrunner.sources import open_tabular
from batchrunner.sources.tabular import TabularSource, json_safe

# -- helpers ----------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[Any]], sep: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [sep.join(header)] + [sep.join("" if v is None else str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def sample_table(n: int, start: int = 0) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table(
        {
            "id": ids,
            "x": [i * 0.5 for i in ids],
            "n": [i * 3 for i in ids],
            "name": [f"row{i}" for i in ids],
        }
    )


def write_all_formats(folder: Path, table: pa.Table) -> dict[str, Path]:
    header = table.column_names
    rows = [list(r.values()) for r in table.to_pylist()]
    return {
        "csv": write_csv(folder / "data.csv", header, rows),
        "parquet": write_parquet(folder / "data.parquet", table),
        "jsonl": write_jsonl(folder / "data.jsonl", table.to_pylist()),
    }


def rows_of(batch: Batch) -> pa.RecordBatch:
    assert batch.rows is not None
    return batch.rows


def collect(source: TabularSource, size: int, **options: Any) -> list[tuple[int, list[str], Any]]:
    return [
        (b.seq, list(b.keys), rows_of(b).to_pylist()) for b in source.iter_batches(size, **options)
    ]


def all_rows(source: TabularSource, size: int = 7, **options: Any) -> list[dict[str, Any]]:
    return [row for _, _, rows in collect(source, size, **options) for row in rows]


# -- formats, batching, keys ------------------------------------------------------------


def test_all_formats_give_identical_batches(tmp_path: Path) -> None:
    files = write_all_formats(tmp_path, sample_table(23))
    results = {fmt: collect(open_tabular(path, id_column="id"), 5) for fmt, path in files.items()}
    assert results["csv"] == results["parquet"] == results["jsonl"]
    seqs = [seq for seq, _, _ in results["csv"]]
    assert seqs == [0, 1, 2, 3, 4]
    assert [len(keys) for _, keys, _ in results["csv"]] == [5, 5, 5, 5, 3]
    assert results["csv"][1][1] == ["5", "6", "7", "8", "9"]
    assert results["csv"][0][2][1] == {"x": 0.5, "n": 3, "name": "row1"}


def test_formats_and_columns_detected(tmp_path: Path) -> None:
    files = write_all_formats(tmp_path, sample_table(3))
    for fmt, path in files.items():
        source = open_tabular(path, id_column="id")
        assert source.format == fmt
        assert source.paths == [path]
        assert source.send_columns == ["x", "n", "name"]
        assert source.schema.names == ["id", "x", "n", "name"]
        assert source.id_column == "id"


def test_batch_sizes_seqs_and_row_number_keys(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "t.parquet", sample_table(10))
    batches = list(open_tabular(path).iter_batches(4))
    assert [b.seq for b in batches] == [0, 1, 2]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [list(b.keys) for b in batches][2] == ["8", "9"]
    assert all(isinstance(b.keys, list) for b in batches)
    assert batches[0].kept is None
    assert batches[0].rows is not None
    assert batches[0].rows.schema.names == ["id", "x", "n", "name"]  # no id_column: all sent


def test_batches_straddle_csv_blocks_and_files(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    for part in range(7):
        table = sample_table(13, start=part * 13)
        header = table.column_names
        rows = [list(r.values()) for r in table.to_pylist()]
        write_csv(folder / f"part{part:02d}.csv", header, rows)
    source = open_tabular(folder, block_bytes=64)  # a block holds 2-4 rows
    assert len(source.paths) == 7
    batches = list(source.iter_batches(10))
    assert [len(b) for b in batches] == [10] * 9 + [1]
    assert [k for b in batches for k in b.keys] == [str(i) for i in range(91)]
    assert [r["id"] for r in all_rows(source, 10)] == list(range(91))


def test_batches_straddle_parquet_batches_row_groups_and_files(tmp_path: Path) -> None:
    for part in range(3):
        write_parquet(
            tmp_path / f"p{part}.parquet", sample_table(17, start=part * 17), row_group_size=7
        )
    source = open_tabular(tmp_path / "*.parquet", id_column="id", parquet_batch_rows=5)
    assert source.count_rows() == 51
    batches = list(source.iter_batches(8))
    assert [len(b) for b in batches] == [8] * 6 + [3]
    assert [k for b in batches for k in b.keys] == [str(i) for i in range(51)]
    assert [r["n"] for b in batches for r in rows_of(b).to_pylist()] == [i * 3 for i in range(51)]


def test_jsonl_batches_straddle_blocks(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", sample_table(40).to_pylist())
    source = open_tabular(path, id_column="id", block_bytes=200)
    batches = list(source.iter_batches(9))
    assert [len(b) for b in batches] == [9, 9, 9, 9, 4]
    assert [k for b in batches for k in b.keys] == [str(i) for i in range(40)]


def test_limit(tmp_path: Path) -> None:
    source = open_tabular(write_parquet(tmp_path / "t.parquet", sample_table(50)))
    assert [len(b) for b in source.iter_batches(10, limit=25)] == [10, 10, 5]
    assert list(source.iter_batches(10, limit=0)) == []
    assert [len(b) for b in source.iter_batches(10, limit=500)] == [10] * 5
    csv_source = open_tabular(
        write_csv(tmp_path / "t.csv", ["a"], [[i] for i in range(50)]), block_bytes=32
    )
    batches = list(csv_source.iter_batches(4, limit=9))
    assert [list(b.keys) for b in batches] == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8"]]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_start_seq_skips_but_keeps_seqs_and_keys(tmp_path: Path, fmt: str) -> None:
    files = write_all_formats(tmp_path, sample_table(47))
    source = open_tabular(files[fmt], block_bytes=100, parquet_batch_rows=6)
    full = collect(source, 5)
    assert collect(source, 5, start_seq=3) == full[3:]
    assert collect(source, 5, start_seq=3, limit=22) == collect(source, 5, limit=22)[3:]
    assert collect(source, 5, start_seq=10) == []
    assert collect(source, 5, start_seq=99) == []


def test_start_seq_skips_whole_parquet_files_and_row_groups(tmp_path: Path) -> None:
    for part in range(4):
        write_parquet(
            tmp_path / f"p{part}.parquet", sample_table(10, start=part * 10), row_group_size=3
        )
    source = open_tabular(tmp_path, id_column="id")
    batches = list(source.iter_batches(4, start_seq=6))  # rows 24..39
    assert [b.seq for b in batches] == [6, 7, 8, 9]
    assert batches[0].keys == ["24", "25", "26", "27"]
    assert batches[-1].keys == ["36", "37", "38", "39"]


def test_iterating_twice_and_abandoning_early(tmp_path: Path) -> None:
    source = open_tabular(write_jsonl(tmp_path / "t.jsonl", sample_table(30).to_pylist()))
    first = next(iter(source.iter_batches(4)))
    assert first.keys == ["0", "1", "2", "3"]
    assert collect(source, 4) == collect(source, 4)


def test_keys_from_int_and_string_id_columns(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "ids.csv", ["id", "v"], [["007", 1], ["12", 2], ["9" * 20, 3]])
    source = open_tabular(csv_path, id_column="id")
    assert source.schema.field("id").type == pa.string()  # "007" stays "007"
    assert [k for b in source.iter_batches(2) for k in b.keys] == ["007", "12", "9" * 20]
    assert all_rows(source) == [{"v": 1}, {"v": 2}, {"v": 3}]

    table = pa.table({"key": ["a", "b", "c"], "num": [10, 20, 30], "v": [1.0, 2.0, 3.0]})
    pq_path = write_parquet(tmp_path / "ids.parquet", table)
    assert [k for b in open_tabular(pq_path, id_column="key").iter_batches(2) for k in b.keys] == [
        "a",
        "b",
        "c",
    ]
    by_num = open_tabular(pq_path, id_column="num")
    assert [k for b in by_num.iter_batches(2) for k in b.keys] == ["10", "20", "30"]
    assert by_num.send_columns == ["key", "v"]


def test_null_or_empty_id_is_an_input_error(tmp_path: Path) -> None:
    table = pa.table({"id": [1, 2, None, 4], "v": [1, 2, 3, 4]})
    path = write_parquet(tmp_path / "t.parquet", table)
    with pytest.raises(InputError, match=r"t\.parquet, data row 3: input\.id_column 'id' is empty"):
        list(open_tabular(path, id_column="id").iter_batches(10))
    csv_path = write_csv(tmp_path / "t.csv", ["id", "v"], [["a", 1], ["", 2]])
    with pytest.raises(InputError, match=r"t\.csv, data row 2: .*fill it in"):
        list(open_tabular(csv_path, id_column="id").iter_batches(10))


def test_columns_select_what_is_sent(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "t.parquet", sample_table(4))
    source = open_tabular(path, id_column="id", columns=["name", "x"])
    assert source.send_columns == ["name", "x"]
    assert all_rows(source)[1] == {"name": "row1", "x": 0.5}


def test_keep_input_keeps_all_columns_unconverted(tmp_path: Path) -> None:
    stamp = dt.datetime(2024, 1, 2, 3, 4, 5)
    table = pa.table({"id": [1, 2], "f": [float("nan"), 1.5], "t": [stamp, stamp]})
    source = open_tabular(
        write_parquet(tmp_path / "t.parquet", table), id_column="id", keep_input=True
    )
    (batch,) = source.iter_batches(5)
    assert batch.kept is not None
    assert batch.kept.schema.names == ["id", "f", "t"]
    assert math.isnan(batch.kept.column("f")[0].as_py())
    assert batch.kept.column("t")[0].as_py() == stamp
    assert rows_of(batch).to_pylist()[0] == {"f": None, "t": "2024-01-02T03:04:05.000000"}


# -- finding files ----------------------------------------------------------------------


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


def test_tsv_delimiter_and_compressed_csv(tmp_path: Path) -> None:
    tsv = write_csv(tmp_path / "t.tsv", ["a", "b"], [[1, "x,y"]], sep="\t")
    assert all_rows(open_tabular(tsv)) == [{"a": 1, "b": "x,y"}]
    semi = write_csv(tmp_path / "s.csv", ["a", "b"], [[1, 2]], sep=";")
    assert all_rows(open_tabular(semi, csv_delimiter=";")) == [{"a": 1, "b": 2}]
    with pytest.raises(InputError, match=r"input\.csv_delimiter must be one character"):
        open_tabular(semi, csv_delimiter=";;")
    gz = tmp_path / "z.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("id,v\nk1,1\nk2,2\n")
    source = open_tabular(gz, id_column="id")
    assert source.format == "csv"
    assert [k for b in source.iter_batches(5) for k in b.keys] == ["k1", "k2"]


# -- column checks ----------------------------------------------------------------------


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


def test_later_file_missing_a_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", ["id", "v"], [[1, 2]])
    write_csv(tmp_path / "b.csv", ["id", "w"], [[1, 2]])
    with pytest.raises(InputError, match=r"b\.csv: no column 'v' in the header"):
        open_tabular(tmp_path, id_column="id")
    write_parquet(tmp_path / "p" / "a.parquet", pa.table({"v": [1]}))
    write_parquet(tmp_path / "p" / "b.parquet", pa.table({"w": [1]}))
    with pytest.raises(InputError, match=r"b\.parquet: no column 'v'"):
        open_tabular(tmp_path / "p")


def test_parquet_files_with_different_int_widths_are_unified(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", pa.table({"v": pa.array([1, 2], pa.int64())}))
    write_parquet(tmp_path / "b.parquet", pa.table({"v": pa.array([3], pa.int32())}))
    batches = list(open_tabular(tmp_path).iter_batches(2))
    assert [rows_of(b).column("v").type for b in batches] == [pa.int64(), pa.int64()]
    assert [r["v"] for b in batches for r in rows_of(b).to_pylist()] == [1, 2, 3]


# -- malformed input --------------------------------------------------------------------


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


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3\n{"a": 4}\n')
    with pytest.raises(InputError, match=r"x\.jsonl, line 3: not valid JSON"):
        open_tabular(path)
    late = tmp_path / "late.jsonl"
    late.write_text('{"a": 1}\n' * 300 + '{"a": \n')
    source = open_tabular(late, block_bytes=256)
    with pytest.raises(InputError, match=r"late\.jsonl, line 301: not valid JSON"):
        list(source.iter_batches(50))
    with pytest.raises(InputError, match="line 301"):
        source.scan_count()


def test_json_array_file_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[{"a": 1}, {"a": 2}]\n')
    with pytest.raises(InputError, match=r"line 1: expected a JSON object, got an array.*jq"):
        open_tabular(path)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_text("not parquet")
    with pytest.raises(InputError, match=r"x\.parquet: cannot read this Parquet file"):
        open_tabular(path)


# -- types changing mid-file ------------------------------------------------------------


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


# -- empty input ------------------------------------------------------------------------


def test_empty_inputs_yield_no_batches(tmp_path: Path) -> None:
    header_only = tmp_path / "h.csv"
    header_only.write_text("id,v\n")
    zero_bytes = tmp_path / "z.csv"
    zero_bytes.write_text("")
    empty_jsonl = tmp_path / "e.jsonl"
    empty_jsonl.write_text("")
    empty_parquet = write_parquet(
        tmp_path / "e.parquet",
        pa.table({"id": pa.array([], pa.int64()), "v": pa.array([], pa.float64())}),
    )
    for path in [header_only, zero_bytes, empty_jsonl, empty_parquet]:
        source = open_tabular(path)
        assert list(source.iter_batches(10)) == [], path
        assert source.scan_count() == 0
    assert open_tabular(header_only, id_column="id").send_columns == ["v"]
    assert open_tabular(empty_parquet).count_rows() == 0
    assert open_tabular(header_only).count_rows() is None


def test_empty_files_among_others(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("")
    write_jsonl(tmp_path / "b.jsonl", [{"v": 1}, {"v": 2}])
    (tmp_path / "c.jsonl").write_text("\n")
    write_jsonl(tmp_path / "d.jsonl", [{"v": 3}])
    source = open_tabular(tmp_path)
    assert [k for b in source.iter_batches(2) for k in b.keys] == ["0", "1", "2"]
    assert source.scan_count() == 3


def test_counts(tmp_path: Path) -> None:
    files = write_all_formats(tmp_path, sample_table(31))
    assert open_tabular(files["parquet"]).count_rows() == 31
    assert open_tabular(files["csv"]).count_rows() is None
    assert open_tabular(files["jsonl"]).count_rows() is None
    for path in files.values():
        assert open_tabular(path).scan_count() == 31


# -- JSON safety ------------------------------------------------------------------------


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


def test_rows_sent_are_json_safe_from_every_format(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("when,f\n2024-01-02 03:04:05,inf\n2024-01-03 00:00:00,1.5\n")
    rows = all_rows(open_tabular(path))
    assert rows == [
        {"when": "2024-01-02T03:04:05", "f": None},
        {"when": "2024-01-03T00:00:00", "f": 1.5},
    ]


# -- speed (printed, not asserted) ------------------------------------------------------


def test_iteration_speed_1m_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 1_000_000
    table = pa.table({f"c{i}": pc.random(n, initializer=i) for i in range(5)})
    source = open_tabular(write_parquet(tmp_path / "big.parquet", table))
    timings = []
    for _ in range(2):  # the first pass also pays for cold caches
        started = time.perf_counter()
        rows = batches = 0
        for batch in source.iter_batches(1000):
            rows += len(batch)
            batches += 1
        timings.append(time.perf_counter() - started)
        assert (rows, batches) == (n, 1000)
    with capsys.disabled():
        print(
            "\n[tabular] Parquet, 1M rows x 5 float columns, batches of 1000: "
            + ", ".join(f"{t:.3f} s ({t / n * 1e9:.0f} ns/row)" for t in timings)
        )
