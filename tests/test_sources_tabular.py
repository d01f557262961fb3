"""Tests for batchrunner.sources.tabular: open_tabular and TabularSource on real files."""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from batchrunner.errors import InputError
from batchrunner.sources import open_tabular
from tests.tabular_files import (
    all_rows,
    collect,
    rows_of,
    sample_table,
    write_all_formats,
    write_csv,
    write_jsonl,
    write_parquet,
)

# -- formats -------------------------------------------------------------------------


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


# -- limit and resuming --------------------------------------------------------------


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


# -- keys and kept input -------------------------------------------------------------


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


def test_rows_sent_are_json_safe_from_every_format(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("when,f\n2024-01-02 03:04:05,inf\n2024-01-03 00:00:00,1.5\n")
    rows = all_rows(open_tabular(path))
    assert rows == [
        {"when": "2024-01-02T03:04:05", "f": None},
        {"when": "2024-01-03T00:00:00", "f": 1.5},
    ]


# -- empty input and counts ----------------------------------------------------------


def test_empty_inputs_yield_no_batches(tmp_path: Path) -> None:
    header_only = tmp_path / "h.csv"
    header_only.write_text("id,v\n")
    empty_jsonl = tmp_path / "e.jsonl"
    empty_jsonl.write_text("")
    empty_parquet = write_parquet(
        tmp_path / "e.parquet",
        pa.table({"id": pa.array([], pa.int64()), "v": pa.array([], pa.float64())}),
    )
    for path in [header_only, empty_jsonl, empty_parquet]:
        source = open_tabular(path)
        assert list(source.iter_batches(10)) == [], path
        assert source.scan_count() == 0
    assert open_tabular(header_only, id_column="id").send_columns == ["v"]
    assert open_tabular(empty_parquet).count_rows() == 0
    assert open_tabular(header_only).count_rows() is None


def test_counts(tmp_path: Path) -> None:
    files = write_all_formats(tmp_path, sample_table(31))
    assert open_tabular(files["parquet"]).count_rows() == 31
    assert open_tabular(files["csv"]).count_rows() is None
    assert open_tabular(files["jsonl"]).count_rows() is None
    for path in files.values():
        assert open_tabular(path).scan_count() == 31


# -- speed (printed, not asserted) ---------------------------------------------------


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


# -- the public names -------------------------------------------------------------------


def test_public_names_stay_where_they_were() -> None:
    import batchrunner.sources as sources
    import batchrunner.sources.tabular as tabular
    from batchrunner.sources import files, jsonsafe

    for name in ["FORMATS", "TabularSource", "json_safe", "open_tabular"]:
        assert getattr(sources, name) is getattr(tabular, name)
    assert tabular.FORMATS is files.FORMATS and tabular.COMPRESSIONS is files.COMPRESSIONS
    assert tabular.json_safe is jsonsafe.json_safe
    assert (tabular.DEFAULT_BLOCK_BYTES, tabular.DEFAULT_PARQUET_BATCH_ROWS) == (4 << 20, 65_536)


def test_a_nan_id_is_refused(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": [1.0, float("nan")], "x": [1, 2]}), path)
    source = open_tabular(path, id_column="id")
    with pytest.raises(InputError, match=r"ids.parquet, data row 2: input.id_column 'id' is NaN"):
        list(source.iter_batches(10))


def test_1_and_1_0_in_two_parquet_files_are_the_same_key(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from batchrunner.keyhash import key_hashes
    from batchrunner.keyspill import Spill

    pq.write_table(
        pa.table({"id": pa.array([1, 2], pa.int64()), "x": [1, 2]}), tmp_path / "a.parquet"
    )
    pq.write_table(pa.table({"id": pa.array([1.0, 3.0]), "x": [3, 4]}), tmp_path / "b.parquet")
    source = open_tabular(tmp_path, id_column="id")
    keys = [key for batch in source.iter_batches(1) for key in batch.keys]
    assert keys == ["1", "2", "1", "3"]
    spill = Spill(tmp_path / "spill")
    for start in (0, 2):  # across files and reads
        hashes = key_hashes(keys[start : start + 2])
        spill.add(hashes, hashes)
    duplicates = spill.duplicates()
    assert (duplicates.keys, duplicates.examples) == (1, [[0, 2]])
