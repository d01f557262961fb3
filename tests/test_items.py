"""Tests for batchrunner.items: a batch's halves and subsets keep its seq and its rows' order."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from batchrunner.items import Batch


def rows_batch(seq: int = 7) -> Batch:
    rows = pa.RecordBatch.from_pydict({"x": [10, 11, 12, 13, 14]})
    kept = pa.RecordBatch.from_pydict({"id": ["a", "b", "c", "d", "e"], "x": [10, 11, 12, 13, 14]})
    return Batch(seq, ["a", "b", "c", "d", "e"], rows=rows, kept=kept)


def test_take_keeps_seq_keys_rows_and_kept_in_step() -> None:
    taken = rows_batch().take([1, 3, 4])
    assert taken.seq == 7
    assert list(taken.keys) == ["b", "d", "e"]
    assert taken.rows is not None and taken.rows.column("x").to_pylist() == [11, 13, 14]
    assert taken.kept is not None and taken.kept.column("id").to_pylist() == ["b", "d", "e"]


def test_take_nothing_leaves_an_empty_batch_with_the_columns() -> None:
    empty = rows_batch().take([])
    assert (empty.seq, len(empty), list(empty.keys)) == (7, 0, [])
    assert empty.rows is not None and empty.rows.schema.names == ["x"]


def test_a_file_batch_is_taken_whole_or_not_at_all(tmp_path: Path) -> None:
    image = Batch(3, ["cat.jpg"], path=tmp_path / "cat.jpg")
    assert image.take([0]) is image
    nothing = image.take([])
    assert (nothing.seq, len(nothing), nothing.path) == (3, 0, None)
    two = Batch(4, ["a.jpg", "b.jpg"], path=tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="a file batch can only be taken whole or not at all"):
        two.take([1])


def test_split_halves_keep_the_seq() -> None:
    first, second = rows_batch().split()
    assert (first.seq, list(first.keys)) == (7, ["a", "b"])
    assert (second.seq, list(second.keys)) == (7, ["c", "d", "e"])
