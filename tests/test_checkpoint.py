"""Resuming from a journal whose messages hold several batches (as the writer journals what
finished together)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from batchrunner.checkpoint import StatePaths, open_checkpoint
from batchrunner.items import Batch, Outcome
from batchrunner.sink import journal_parts, outcome_table, read_journal

IDENTITY = {"input": "in.csv", "batch.size": 2}


def outcome(seq: int, keys: list[str], error_kind: str | None = None) -> Outcome:
    batch = Batch(seq, keys, rows=pa.RecordBatch.from_pydict({"x": list(range(len(keys)))}))
    if error_kind is None:
        return Outcome(batch, [{"v": key} for key in keys], http_status=200, attempts=1)
    return Outcome(batch, None, error="failed", error_kind=error_kind, attempts=3)


def test_resume_keeps_each_finished_batch_of_a_shared_message(tmp_path: Path) -> None:
    paths = StatePaths.beside(tmp_path / "out.parquet", "job")
    first = open_checkpoint(paths, IDENTITY, resume=True)
    first.journal.append(
        outcome_table(
            [
                outcome(2, ["e", "f"]),
                outcome(0, ["a", "b"], error_kind="http_503"),  # transient: sent again
                outcome(1, ["c"]),
                outcome(1, ["d"], error_kind="rejected"),  # split; a row refused: kept
            ]
        )
    )
    first.journal.close()  # the run was killed here

    resumed = open_checkpoint(paths, IDENTITY, resume=True)
    stats = resumed.resumed
    assert resumed.note == (
        "resuming: 4 rows in 2 finished batches are kept; 1 failed batches are sent again"
    )
    assert bytes(resumed.finished) == b"\0\1\1"
    assert (stats.rows_ok, stats.rows_error) == (3, 1)
    resumed.check_keys(1, ["c", "d"])
    resumed.check_keys(2, ["e", "f"])
    resumed.journal.close()
    kept = pa.Table.from_batches(list(read_journal(journal_parts(paths.state))))
    assert sorted(kept.column("_key").to_pylist()) == ["c", "d", "e", "f"]
