"""Cutting a stream of rows into ``Batch``es of exactly ``size`` rows, across blocks and files.

A reader yields each file as ``FileRows``; the source converts them into ``Chunk``s of at
most ``CHUNK_ROWS`` rows (JSON-safe rows, the kept input, the keys), and ``cut_batches`` cuts
those into batches: whole batches inside a chunk are zero-copy slices; a batch that straddles
chunks is concatenated from their slices. ``row_number_texts`` makes the keys of an input
without ``input.id_column``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.items import Batch

__all__ = ["CHUNK_ROWS", "Chunk", "FileRows", "cut_batches", "row_number_texts"]

CHUNK_ROWS = 65_536  # rows converted (JSON safety, keys) in one go

# (row number within the file, record batch): what the per-format readers yield.
FileRows = Generator[tuple[int, pa.RecordBatch], None, None]


class Chunk(NamedTuple):
    """Rows read together: what is sent, what is kept and their keys, sliced in step."""

    rows: pa.RecordBatch  # JSON-safe send columns
    kept: pa.RecordBatch | None  # all input columns, as read
    keys: list[str]

    def slice(self, offset: int, length: int) -> Chunk:
        return Chunk(
            self.rows.slice(offset, length),
            None if self.kept is None else self.kept.slice(offset, length),
            self.keys[offset : offset + length],
        )

    def to_batch(self, seq: int) -> Batch:
        return Batch(seq=seq, keys=self.keys, rows=self.rows, kept=self.kept)

    @staticmethod
    def concat(pieces: list[Chunk]) -> Chunk:
        if len(pieces) == 1:
            return pieces[0]
        kept = [p.kept for p in pieces if p.kept is not None]
        return Chunk(
            _concat_batches([p.rows for p in pieces]),
            _concat_batches(kept) if kept else None,
            [key for p in pieces for key in p.keys],
        )


def cut_batches(
    chunks: Generator[Chunk, None, None], size: int, start_seq: int
) -> Generator[Batch, None, None]:
    """``Batch``es of ``size`` rows (the last may be shorter) numbered from ``start_seq``.

    ``chunks`` may have any sizes; it is closed when the batches end or are abandoned.
    """
    seq = start_seq
    pending: list[Chunk] = []  # slices waiting to fill a batch that straddles chunks
    pending_rows = 0
    try:
        for chunk in chunks:
            rows, kept, keys = chunk
            count = len(keys)
            offset = 0
            if pending_rows:
                offset = min(size - pending_rows, count)
                pending.append(chunk.slice(0, offset))
                pending_rows += offset
                if pending_rows < size:
                    continue
                yield Chunk.concat(pending).to_batch(seq)
                seq += 1
                pending, pending_rows = [], 0
            # The hot path: whole batches inside one chunk, as zero-copy slices.
            while count - offset >= size:
                yield Batch(
                    seq=seq,
                    keys=keys[offset : offset + size],
                    rows=rows.slice(offset, size),
                    kept=None if kept is None else kept.slice(offset, size),
                )
                seq += 1
                offset += size
            if offset < count:
                pending, pending_rows = [chunk.slice(offset, count - offset)], count - offset
        if pending_rows:
            yield Chunk.concat(pending).to_batch(seq)
    finally:
        chunks.close()


def _concat_batches(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    # A column widened mid-stream: bring the earlier pieces to the latest types.
    target = batches[-1].schema
    return pa.concat_batches([b if b.schema == target else b.cast(target) for b in batches])


_counting: list[pa.Array] = []  # 0, 1, 2, ... grown on demand, shared by all sources


def row_number_texts(start: int, count: int) -> pa.Array:
    """``str(start) .. str(start + count - 1)`` as a text array, computed column-wise."""
    if not _counting or len(_counting[0]) < count:
        ones = pa.repeat(pa.scalar(1, pa.int64()), max(count, CHUNK_ROWS))
        _counting[:] = [pc.subtract(pc.cumulative_sum(ones), 1)]
    return pc.cast(pc.add(_counting[0].slice(0, count), start), pa.string())
