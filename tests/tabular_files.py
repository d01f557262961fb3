"""Small CSV, Parquet and JSON-lines files for the source tests, and their batches read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrunner.items import Batch
from batchrunner.sources.tabular import TabularSource


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
