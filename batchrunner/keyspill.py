"""The duplicate-key check, and the partitions every check of keys runs over.

A stream of (key hash, item hash, row number) records, 24 bytes a row, is spilled to
``PARTITIONS`` files by the top bits of the key hash (``Spill``), and each partition is then
sorted in memory on its own: memory holds one partition (a 256th of the rows), never the
whole input. ``Spill.duplicates`` (and ``Duplicates.add``, partition by partition): keys seen
more than once (rows, and a few examples).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from batchrunner.keyhash import U64

PARTITION_BITS = 8
PARTITIONS = 1 << PARTITION_BITS
RECORD = np.dtype([("key", "<u8"), ("item", "<u8"), ("row", "<u8")])
CONVERTING_RECORD = np.dtype([("key", "<u8"), ("item", "<u8"), ("row", "<u8"), ("new", "<u8")])
# Records buffered before they are spread over the partition files.
SPILL_ROWS = 1 << 17
DUPLICATE_EXAMPLES = 5

_TOP = np.uint64(64 - PARTITION_BITS)


def partition_of(keys: U64) -> npt.NDArray[np.intp]:
    return (keys >> _TOP).astype(np.intp)


class Spill:
    """(key hash, item hash, row number) records, spread over partition files in ``folder``.

    ``add`` as rows are read, in row order; then ``partitions`` gives each partition's
    records (in row order) with the order that sorts them by key hash. The folder is the
    caller's, and removed by ``remove``.
    """

    def __init__(self, folder: Path, *, converting: bool = False) -> None:
        if folder.exists():  # left by a run that was cut short
            shutil.rmtree(folder)
        self.folder = folder  # made at the first spill
        self.rows = 0
        # Converting an index of another hash: looked up by ``item``, remembered by ``new``.
        self.dtype = CONVERTING_RECORD if converting else RECORD
        self._pending: list[tuple[U64, ...]] = []
        self._pending_rows = 0
        self._files: list[BinaryIO] = []  # open while records are added: one per partition

    def add(self, keys: U64, items: U64, new_items: U64 | None = None) -> None:
        rows = np.arange(self.rows, self.rows + len(keys), dtype=np.uint64)
        fields = (keys, items, rows) if new_items is None else (keys, items, rows, new_items)
        self.rows += len(keys)
        self._pending.append(fields)
        self._pending_rows += len(keys)
        if self._pending_rows >= SPILL_ROWS:
            self.flush()

    def flush(self) -> None:
        """Append the pending records to their partitions' files."""
        if not self._pending:
            return
        columns = [np.concatenate(column) for column in zip(*self._pending, strict=True)]
        self._pending, self._pending_rows = [], 0
        parts = partition_of(columns[0]).astype(np.uint8)
        order = np.argsort(parts, kind="stable")  # a radix sort, for 8-bit numbers: row order kept
        bounds = np.searchsorted(parts[order], np.arange(PARTITIONS + 1))
        records = np.empty(len(order), self.dtype)
        for name, column in zip(self.dtype.names or (), columns, strict=True):
            records[name] = column[order]
        if not self._files:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._files = [
                (self.folder / f"{number:03d}").open("ab", buffering=0)
                for number in range(PARTITIONS)
            ]
        for number in np.flatnonzero(np.diff(bounds)):
            self._files[number].write(records[bounds[number] : bounds[number + 1]].data)

    def _close(self) -> None:
        for file in self._files:
            file.close()
        self._files = []

    def partitions(self) -> Iterator[tuple[int, Partition]]:
        """Each partition's records, in partition order. Between two, what the allocator
        holds free is given back (the arrays of one partition, sorted and searched, are
        tens of MB at 100,000,000 rows, each a little larger or smaller than the last)."""
        self.flush()
        self._close()
        for number in range(PARTITIONS):
            path = self.folder / f"{number:03d}"
            # The records are the Partition's alone: a consumer that lets it go frees them.
            yield (
                number,
                Partition(
                    np.fromfile(path, self.dtype) if path.exists() else np.empty(0, self.dtype)
                ),
            )
            give_back_memory()

    def duplicates(self) -> Duplicates:
        """The rows whose key an earlier row already had."""
        found = Duplicates()
        for _, partition in self.partitions():
            found.add(partition)
        return found

    def remove(self) -> None:
        self._close()
        shutil.rmtree(self.folder, ignore_errors=True)


def give_back_memory() -> None:
    """Give what the allocators hold free back to the system: Arrow's pool, and the C heap
    numpy's arrays come from. glibc raises its threshold for mapping a block of its own as
    large blocks are freed (up to 32 MB), so a partition's arrays, a few MB each at
    100,000,000 rows, end up in its heap, and what they freed stays held unless trimmed
    (a 100M-row first night's index update peaked at 220 MB untrimmed, 197 MB trimmed)."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc has it; musl does not)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class Partition:
    """One partition's records, in row order, and their fields sorted by key hash (the order
    computed once, when first asked for; a key's rows stay in row order)."""

    def __init__(self, records: npt.NDArray[Any]) -> None:
        self.records = records
        self._order: npt.NDArray[np.intp] | None = None
        self._sorted: dict[str, U64] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def order(self) -> npt.NDArray[np.intp]:
        """The places of the records sorted by key hash."""
        if self._order is None:
            self._order = _key_order(self.records["key"])
        return self._order

    def sorted(self, name: str) -> U64:
        """Field ``name`` of the records sorted by key hash."""
        if name not in self._sorted:
            self._sorted[name] = self.records[name][self.order]
        return self._sorted[name]

    def rows_where(self, sorted_mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
        """The rows of the sorted records ``sorted_mask`` picks, ascending."""
        in_row_order = np.empty(len(sorted_mask), bool)
        in_row_order[self.order] = sorted_mask
        rows: npt.NDArray[np.uint64] = self.records["row"][in_row_order]
        return rows


def _key_order(keys: U64) -> npt.NDArray[np.intp]:
    """The order that sorts ``keys`` (of one partition), equal keys in place order.

    A plain sort of numbers is twice as fast as an argsort: the keys' bits below the
    partition's go in the high bits, each key's place in the low ones, and the places are
    read back after the sort. Two keys that agree in every bit kept but differ below are
    rare; the order is then checked, and made with an argsort if it is wrong.
    """
    count = len(keys)
    place_bits = max(1, (count - 1).bit_length())
    if count < 2 or place_bits > 40:
        return np.argsort(keys, kind="stable")
    places = np.uint64((1 << place_bits) - 1)
    packed = keys << np.uint64(PARTITION_BITS)
    packed &= ~places
    packed |= np.arange(count, dtype=np.uint64)
    packed.sort()
    order = (packed & places).astype(np.intp)
    ordered = keys[order]
    if bool((ordered[1:] >= ordered[:-1]).all()):
        return order
    return np.argsort(keys, kind="stable")


@dataclass
class Duplicates:
    """Keys found more than once: how many rows repeat a key, and a few examples (the rows
    of each, 0-based, for ``with_texts`` to name)."""

    rows: int = 0
    keys: int = 0
    examples: list[list[int]] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)  # row -> key, for the examples

    def add(self, partition: Partition) -> None:
        if len(partition) < 2:
            return
        keys = partition.sorted("key")
        repeats = np.flatnonzero(keys[1:] == keys[:-1]) + 1
        if not len(repeats):
            return
        rows = partition.sorted("row")
        self.rows += len(repeats)
        firsts = np.unique(keys[repeats])
        self.keys += len(firsts)
        for key in firsts[: DUPLICATE_EXAMPLES - len(self.examples)]:
            self.examples.append(sorted(int(row) for row in rows[keys == key]))
        self.examples.sort()

    def __bool__(self) -> bool:
        return self.rows > 0

    def example_rows(self) -> set[int]:
        return {row for rows in self.examples for row in rows}

    def describe(self) -> str:
        """``3 keys more than once (4 rows): '7' at rows 7 and 12; ...``"""
        parts = []
        for rows in self.examples:
            key = self.texts.get(rows[0], "?")
            places = ", ".join(f"{row + 1:,}" for row in rows[:-1]) + f" and {rows[-1] + 1:,}"
            parts.append(f"{key!r} at rows {places}")
        more = "" if self.keys <= len(self.examples) else "; ..."
        return (
            f"{self.keys:,} keys more than once ({self.rows:,} rows repeat one): "
            + "; ".join(parts)
            + more
        )

    def to_json(self) -> dict[str, Any]:
        examples = [
            {"key": self.texts.get(rows[0]), "rows": [row + 1 for row in rows]}
            for rows in self.examples
        ]
        return {"keys": self.keys, "rows": self.rows, "examples": examples}
