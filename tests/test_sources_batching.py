"""Tests for batchrunner.sources.batching: batches of exactly ``size`` rows, across chunks."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pyarrow as pa

from batchrunner.sources import open_tabular
from batchrunner.sources.batching import CHUNK_ROWS, Chunk, cut_batches, row_number_texts
from tests.tabular_files import (
    all_rows,
    rows_of,
    sample_table,
    write_csv,
    write_jsonl,
    write_parquet,
)


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


# -- cutting chunks into batches, without files -----------------------------------------


def chunk(numbers: range, kind: pa.DataType | None = None) -> Chunk:
    values = pa.array(list(numbers), kind or pa.int64())
    return Chunk(pa.record_batch({"v": values}), None, [str(n) for n in numbers])


def test_cut_batches_across_chunks_of_any_size() -> None:
    chunks = (chunk(range(a, b)) for a, b in [(0, 3), (3, 4), (4, 11), (11, 11), (11, 13)])
    batches = list(cut_batches(chunks, 5, start_seq=2))
    assert [b.seq for b in batches] == [2, 3, 4]
    assert [b.keys for b in batches] == [
        ["0", "1", "2", "3", "4"],
        ["5", "6", "7", "8", "9"],
        ["10", "11", "12"],
    ]
    assert [rows_of(b).column("v").to_pylist() for b in batches][2] == [10, 11, 12]
    assert all(b.kept is None for b in batches)


def test_a_batch_straddling_a_widened_column_takes_the_wider_type() -> None:
    chunks = (c for c in [chunk(range(0, 2)), chunk(range(2, 4), pa.float64())])
    (batch,) = cut_batches(chunks, 4, start_seq=0)
    assert rows_of(batch).column("v").type == pa.float64()
    assert rows_of(batch).column("v").to_pylist() == [0.0, 1.0, 2.0, 3.0]


def test_cut_batches_closes_the_chunks_when_abandoned() -> None:
    closed: list[bool] = []

    def chunks() -> Generator[Chunk, None, None]:
        try:
            yield chunk(range(0, 10))
            yield chunk(range(10, 20))
        finally:
            closed.append(True)

    batches = cut_batches(chunks(), 4, start_seq=0)
    assert next(batches).keys == ["0", "1", "2", "3"]
    batches.close()
    assert closed == [True]


def test_row_number_texts() -> None:
    assert row_number_texts(5, 3).to_pylist() == ["5", "6", "7"]
    assert row_number_texts(0, 0).to_pylist() == []
    many = row_number_texts(10, CHUNK_ROWS + 2)  # more than the cache held
    assert len(many) == CHUNK_ROWS + 2
    assert many[-1].as_py() == str(CHUNK_ROWS + 11)
