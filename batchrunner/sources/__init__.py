"""Input sources: one reader per input kind, each yielding ``Batch``es in input order.

    tabular     CSV, Parquet and JSON lines, cut into batches of rows (``open_tabular``)
    images      a folder, glob or manifest of image files, one file per batch (``open_images``)
    batchfile   an OpenAI batch file (protocol = "openai-batch"), a line a row (``open_batch_file``)

``input_kind`` tells which of the two a job's input is. A source checks its input when it
is opened (missing files and columns are ``InputError``s before any request is sent), then
streams: memory does not grow with the input's size.

The tabular source is made of small modules; imports flow one way, down this list:

    files           input.path as files (file, folder, glob; hidden names skipped), formats
    jsonsafe        values made JSON-safe, a column at a time (``json_safe``)
    batching        chunks of rows cut into batches of exactly ``size`` rows; row-number keys
    encoding        text encodings: other encodings transcoded, text not valid in one refused
    progress        CSV / JSON lines: bytes parsed against the files' sizes, the row estimate
    widening        CSV / JSON-lines column types, pinned, then widened when a value won't fit
    columns         the columns sent and read, checked against the schema
    csv_files       CSV: delimiters, headers, schema, streaming, counting
    jsonl_files     JSON lines: schema, streaming, counting, naming the bad line
    parquet_files   Parquet: schemas and row counts from the footers, streaming by row group
    tabular         ``open_tabular`` and ``TabularSource``: the pieces put together; row keys

Image input in a local folder or glob is walked by ``walk`` (the files that are items,
in order, each skip counted), in a bucket (``s3://``, ``obs://``) by ``bucket_images``;
``images`` uses both. A table in a bucket is found by ``files`` and read through
``storage``.

``files`` is written for any source kind: ``find_files`` resolves a path for a source that
says which files it accepts. The image source walks its folder itself instead (``walk``):
it streams the walk folder by folder rather than listing the tree up front, and keeps
names starting with ``_`` (cameras write ``_DSC1234.JPG``); it shares ``files``' message
for a missing path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from batchrunner.items import Batch
from batchrunner.job.settings import IMAGES, TABULAR
from batchrunner.sources.images import (
    IMAGE_EXTENSIONS,
    ImageSource,
    WalkStatistics,
    looks_like_images,
    open_images,
)
from batchrunner.sources.tabular import (
    COMPRESSIONS,
    FORMATS,
    TabularSource,
    json_safe,
    open_tabular,
)
from batchrunner.storage import InputPath, ObjectStore

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "Source",
    "TabularSource",
    "WalkStatistics",
    "input_kind",
    "json_safe",
    "open_images",
    "open_tabular",
]


class Source(Protocol):
    """What the runner needs of an input, whatever its kind."""

    @property
    def paths(self) -> Sequence[InputPath]:
        """The input's files (their identity makes the job's fingerprint)."""
        ...

    @property
    def format(self) -> str:
        """A short name of the input's kind, for people: csv, parquet, jsonl, images."""
        ...

    @property
    def send_columns(self) -> Sequence[str]:
        """The fields sent per item (none for file input: the file itself is sent)."""
        ...

    def count_rows(self) -> int | None:
        """The number of items if it is cheap to know (metadata, a listing), else None."""
        ...

    def scan_count(self) -> int:
        """The number of items, reading the whole input if need be."""
        ...

    def estimated_rows(self) -> int | None:
        """The number of items extrapolated from what was read so far, when ``count_rows``
        cannot tell it (CSV, JSON lines: from the bytes read), else None."""
        ...

    def iter_batches(
        self, size: int, *, limit: int | None = None, start_seq: int = 0
    ) -> Iterator[Batch]:
        """``Batch``es of ``size`` items in input order; seqs as in a full run."""
        ...


def input_kind(
    path: str,
    format: str | None,
    extensions: Iterable[str] | None = None,
    store: ObjectStore | None = None,
) -> str:
    """``IMAGES`` or ``TABULAR``: what ``input.path`` holds.

    ``format`` decides when given. Otherwise the input is images when it is an image file,
    a glob ending in an image extension, a ``.txt``/``.lst`` manifest listing images, or a
    folder whose first data file (in walk order) is an image rather than a table; else it
    is a table (whose reader explains what it cannot read).
    """
    if format is not None:
        return IMAGES if format == IMAGES else TABULAR
    table_suffixes = (*FORMATS, *COMPRESSIONS)
    if looks_like_images(path, extensions, table_suffixes=table_suffixes, store=store):
        return IMAGES
    return TABULAR
