"""Plain data passed between the pipeline's stages: what is sent, and what came back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

import pyarrow as pa

from batchrunner.storage import InputPath

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass(frozen=True, slots=True)
class Batch:
    """One unit of work: the rows (or the file) of one request, in input order.

    ``seq`` is the batch's position in the input (0-based); the output is assembled in
    ``seq`` order, and a batch is finished or not as a whole.
    """

    seq: int
    keys: Sequence[str]
    rows: pa.RecordBatch | None = None  # tabular: the JSON-safe columns sent in req_data
    path: InputPath | None = None  # file input: the file (or object) sent as multipart
    kept: pa.RecordBatch | None = None  # the input columns copied into the output (keep_input)

    def __len__(self) -> int:
        return len(self.keys)

    def split(self) -> tuple[Batch, Batch]:
        """Two halves of a batch of rows (same ``seq``), to isolate a row the service refuses."""
        if len(self) < 2 or self.rows is None:
            raise ValueError("only a batch of two or more rows can be split")
        half = len(self) // 2
        return self._slice(0, half), self._slice(half, len(self) - half)

    def take(self, indices: Sequence[int]) -> Batch:
        """The rows at ``indices`` (ascending), as a batch of the same ``seq``.

        Used to leave out rows that need no sending; a file batch (one item, no rows) can
        only be kept whole or emptied.
        """
        kept = self.kept.take(pa.array(indices, pa.int64())) if self.kept is not None else None
        keys = [self.keys[index] for index in indices]
        if self.rows is not None:
            rows = self.rows.take(pa.array(indices, pa.int64()))
            return Batch(self.seq, keys, rows, self.path, kept)
        if len(indices) == len(self):
            return self
        if indices:
            raise ValueError("a file batch can only be taken whole or not at all")
        return Batch(self.seq, keys, None, None, kept)

    def _slice(self, start: int, length: int) -> Batch:
        assert self.rows is not None
        kept = self.kept.slice(start, length) if self.kept is not None else None
        keys = self.keys[start : start + length]
        return Batch(self.seq, keys, self.rows.slice(start, length), self.path, kept)


# One result per row: an object each, or (a regular ModelArts answer) Arrow columns.
Results: TypeAlias = list[dict[str, Any]] | pa.RecordBatch


class KeyedRows(NamedTuple):
    """Rows of a table as the key index reads them: their keys as text and the fields sent,
    as Arrow arrays (no Python value per row), in input order."""

    keys: pa.Array
    rows: pa.RecordBatch


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one request's rows: their results, or the reason they failed.

    ``results`` holds one JSON object per row when the request succeeded (or the rows'
    result fields as Arrow columns, when the codec decoded them so); when it failed it is
    None and ``error`` / ``error_kind`` say why, for every row of ``batch``.
    """

    batch: Batch
    results: Results | None
    error: str | None = None
    error_kind: str | None = None
    http_status: int | None = None
    attempts: int = 0
    latency_ms: float | None = None
    request_uuid: str | None = None

    @property
    def ok(self) -> bool:
        return self.results is not None
