"""The row count of a CSV or JSON-lines input, estimated from the bytes read while it is
not known (issue 12, item 18): progress then has a total and an ETA."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from batchrunner.sources import open_tabular

ROWS = 60_000


def _write(kind: str, folder: Path) -> Path:
    if kind.startswith("csv"):
        path = folder / "rows.csv"
        lines = ["id,x,label"] + [f"{i:06d},{i % 97 * 0.5},{'a' * (i % 13)}" for i in range(ROWS)]
    else:
        path = folder / "rows.jsonl"
        lines = [
            f'{{"id": "{i:06d}", "x": {i % 97 * 0.5}, "label": "{"a" * (i % 13)}"}}'
            for i in range(ROWS)
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if kind.endswith(".gz"):
        packed = path.with_name(path.name + ".gz")
        with path.open("rb") as plain, gzip.open(packed, "wb") as handle:
            shutil.copyfileobj(plain, handle)
        path.unlink()
        return packed
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl", "csv.gz"])
def test_the_row_count_is_estimated_from_the_bytes_read(tmp_path: Path, kind: str) -> None:
    source = open_tabular(_write(kind, tmp_path), block_bytes=64 << 10)
    assert source.count_rows() is None  # a text file: not known without reading it
    assert source.estimated_rows() is None  # nothing read yet
    batches = source.iter_batches(100)
    for _ in range(200):  # a third of the rows: blocks of 64 KiB, Arrow reading ahead
        next(batches)
    estimate = source.estimated_rows()
    assert estimate is not None and abs(estimate - ROWS) <= ROWS * 0.1, estimate
    for _ in batches:
        pass
    assert source.estimated_rows() == ROWS  # read through: exact


def test_parquet_needs_no_estimate(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "t.parquet")
    source = open_tabular(tmp_path / "t.parquet")
    assert source.count_rows() == 10
    assert source.estimated_rows() is None
