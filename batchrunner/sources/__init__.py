"""Input sources: one reader per input kind, each yielding ``Batch``es in input order.

    tabular     CSV, Parquet and JSON lines, cut into batches of rows (``open_tabular``)

A source checks its input when it is opened (missing files and columns are ``InputError``s
before any request is sent), then streams: memory does not grow with the input's size.

The tabular source is made of small modules; imports flow one way, down this list:

    files           input.path as files (file, folder, glob; hidden names skipped), formats
    jsonsafe        values made JSON-safe, a column at a time (``json_safe``)
    batching        chunks of rows cut into batches of exactly ``size`` rows; row-number keys
    widening        CSV / JSON-lines column types, pinned, then widened when a value won't fit
    columns         the columns sent and read, checked against the schema
    csv_files       CSV: delimiters, headers, schema, streaming, counting
    jsonl_files     JSON lines: schema, streaming, counting, naming the bad line
    parquet_files   Parquet: schemas and row counts from the footers, streaming by row group
    tabular         ``open_tabular`` and ``TabularSource``: the pieces put together; row keys

``files`` is written for any source kind: ``find_files`` resolves a path for a source that
says which files it accepts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from batchrunner.items import Batch
from batchrunner.sources.tabular import FORMATS, TabularSource, json_safe, open_tabular

__all__ = ["FORMATS", "Source", "TabularSource", "json_safe", "open_tabular"]


class Source(Protocol):
    """What the runner needs of an input, whatever its kind."""

    @property
    def paths(self) -> Sequence[Path]:
        """The input's files (their identity makes the job's fingerprint)."""
        ...

    @property
    def format(self) -> str:
        """A short name of the input's kind, for people: csv, parquet, jsonl, images."""
        ...

    @property
    def send_columns(self) -> Sequence[str]:
        """The fields sent per item (for file input: the form field)."""
        ...

    def count_rows(self) -> int | None:
        """The number of items if it is cheap to know (metadata, a listing), else None."""
        ...

    def scan_count(self) -> int:
        """The number of items, reading the whole input if need be."""
        ...

    def iter_batches(
        self, size: int, *, limit: int | None = None, start_seq: int = 0
    ) -> Iterator[Batch]:
        """``Batch``es of ``size`` items in input order; seqs as in a full run."""
        ...
