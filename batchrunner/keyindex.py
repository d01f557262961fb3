"""The index of what earlier runs finished, on disk, read a partition at a time.

The index file (``.batchrunner/<name>.keys``): a 4 KiB header (magic, then JSON: count, hash
scheme, the run that wrote it, URL), the key hashes (``keyhash``) of every remembered item,
sorted, then their item hashes in the same order: 16 bytes a row. A partition (``keyspill``)
is a contiguous range of it, read with one sequential read.

- ``match`` finds, partition by partition, the rows of a spill whose key and item hash the
  index holds: one bit a row in memory (``RowBits``).
- ``write_index`` writes an index aside, flushes it, and renames it into place: a crash
  leaves the previous one as it was; ``merged`` gives the partitions of the index after a run.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from batchrunner.keyhash import U64
from batchrunner.keyspill import PARTITIONS, Partition, Spill
from batchrunner.writing import fsync

HEADER_BYTES = 4096
MAGIC = b"BRKEYS1\n"
#: The item hash ``keyhash`` computes; ``LEGACY_SCHEME``: the one of ``.seen.parquet`` files.
SCHEME = "columns-v2"
LEGACY_SCHEME = "blake2b-json-v1"
COUNT_BYTES = 1 << 20  # RowBits.total: bytes of bits counted at a time
_ONES = np.array([bin(byte).count("1") for byte in range(256)], np.uint8)  # bits set, by byte


@dataclass(frozen=True)
class KeyIndex:
    """An index file, opened: its header; partitions are read from it on demand."""

    path: Path
    count: int
    metadata: dict[str, Any]
    bounds: tuple[int, ...]  # PARTITIONS + 1 offsets: partition p is [bounds[p], bounds[p+1])

    @property
    def scheme(self) -> str:
        return str(self.metadata.get("scheme", SCHEME))

    def partition(self, number: int) -> tuple[U64, U64]:
        """Partition ``number``'s key hashes (sorted) and item hashes: one read each."""
        start, end = self.bounds[number], self.bounds[number + 1]
        with self.path.open("rb") as file:
            file.seek(HEADER_BYTES + 8 * start)
            keys = np.fromfile(file, "<u8", end - start)
            file.seek(HEADER_BYTES + 8 * (self.count + start))
            items = np.fromfile(file, "<u8", end - start)
        return keys.astype(np.uint64, copy=False), items.astype(np.uint64, copy=False)


class UnreadableIndex(Exception):
    """The file is not a readable key index (the caller says what to do)."""


def read_index(path: Path) -> KeyIndex:
    """Open the index at ``path`` (its header only). Raises ``UnreadableIndex``."""
    try:
        with path.open("rb") as file:
            header = file.read(HEADER_BYTES)
            size = os.fstat(file.fileno()).st_size
    except OSError as exc:
        raise UnreadableIndex(str(exc)) from exc
    if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
        raise UnreadableIndex("it is not a batchrunner key index")
    try:
        metadata = orjson.loads(header[len(MAGIC) :].rstrip(b"\0"))
        count = int(metadata["count"])
        bounds = tuple(int(bound) for bound in metadata["bounds"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UnreadableIndex(f"its header is damaged ({exc})") from exc
    if size != HEADER_BYTES + 16 * count or len(bounds) != PARTITIONS + 1:
        raise UnreadableIndex(f"it holds {size:,} bytes, not the {count:,} items its header says")
    return KeyIndex(path, count, metadata, bounds)


def write_index(
    path: Path, partitions: Iterator[tuple[U64, U64]], metadata: dict[str, Any]
) -> KeyIndex:
    """Write an index of ``partitions`` (each: key hashes, sorted, and item hashes; in
    partition order), whole or not at all: aside, flushed, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    items_aside = path.with_name(f".{path.name}.items-{os.getpid()}")
    bounds = [0]
    try:
        with temporary.open("wb") as keys_file, items_aside.open("wb") as items_file:
            keys_file.write(bytes(HEADER_BYTES))
            for keys, items in partitions:
                keys.astype("<u8").tofile(keys_file)
                items.astype("<u8").tofile(items_file)
                bounds.append(bounds[-1] + len(keys))
        count = bounds[-1]
        document = {**metadata, "count": count, "bounds": bounds}
        header = MAGIC + orjson.dumps(document)
        if len(header) > HEADER_BYTES:
            raise ValueError("the index header is too long")
        with temporary.open("r+b") as out, items_aside.open("rb") as items_in:
            out.write(header)
            out.seek(0, os.SEEK_END)
            shutil.copyfileobj(items_in, out, 1 << 20)
        fsync(temporary)
        os.replace(temporary, path)
        fsync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
        items_aside.unlink(missing_ok=True)
    return KeyIndex(path, count, document, tuple(bounds))


# --- bits: one per input row -----------------------------------------------------------------


class RowBits:
    """One bit per row (``count`` rows), packed: 1 MB holds 8 million rows."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._bits = np.zeros(math.ceil(count / 8), np.uint8)

    def set(self, rows: npt.NDArray[np.uint64]) -> None:
        """Set the bits of ``rows`` (ascending, each once)."""
        if not len(rows):
            return
        rows = rows.astype(np.int64)
        places = rows >> 3
        bits = (1 << (rows & 7)).astype(np.uint8)
        # a byte's rows are side by side: OR them together, then one OR per byte
        firsts = np.flatnonzero(np.concatenate([[True], places[1:] != places[:-1]]))
        self._bits[places[firsts]] |= np.bitwise_or.reduceat(bits, firsts)

    def get(self, start: int, count: int) -> npt.NDArray[np.bool_]:
        """The bits of rows ``start .. start + count - 1``, as booleans."""
        low, high = start >> 3, (start + count + 7) >> 3
        bits = np.unpackbits(self._bits[low:high], bitorder="little")
        offset = start - (low << 3)
        return bits[offset : offset + count].astype(bool)

    def get_many(self, rows: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """The bits of ``rows``, as booleans."""
        places = rows.astype(np.int64)
        bits = (self._bits[places >> 3] >> (places & 7).astype(np.uint8)) & 1
        return np.asarray(bits, bool)

    def total(self) -> int:
        """How many bits are set, counted a megabyte of bits at a time (unpacked, they
        would hold a byte per row: 100 MB at 100,000,000 rows)."""
        return sum(
            int(_ONES[self._bits[start : start + COUNT_BYTES]].sum(dtype=np.int64))
            for start in range(0, len(self._bits), COUNT_BYTES)
        )


def match(
    spill: Spill, index: KeyIndex | None, on_partition: Callable[[Partition], None]
) -> RowBits:
    """The rows of ``spill`` whose key and item hash ``index`` holds; each partition goes
    to ``on_partition`` too (the duplicate check reads the same partitions)."""
    done = RowBits(spill.rows)
    for number, partition in spill.partitions():
        on_partition(partition)
        if index is None or not len(partition):
            continue
        keys, items = index.partition(number)
        if not len(keys):
            continue
        read = partition.sorted("key")  # sorted: the binary searches walk the index forward
        places = np.minimum(np.searchsorted(keys, read), len(keys) - 1)
        found = (keys[places] == read) & (items[places] == partition.sorted("item"))
        done.set(partition.rows_where(found))
    return done


def merged(spill: Spill, index: KeyIndex | None, remember: RowBits) -> Iterator[tuple[U64, U64]]:
    """The index after a run, partition by partition: every key the run read replaces what
    it had, with its item hash where ``remember`` has its row, with nothing where not; keys
    the run did not read keep what they had."""
    remembered = "new" if "new" in (spill.dtype.names or ()) else "item"
    for number, partition in spill.partitions():
        read = partition.sorted("key")
        keep = remember.get_many(partition.sorted("row"))
        new_keys, new_items = read[keep], partition.sorted(remembered)[keep]  # sorted
        # Let the records and their sorted copies go before the old partition is read: at
        # 100,000,000 rows a partition's arrays are a few MB each, and they add up.
        del partition, keep
        if index is None:
            yield new_keys, new_items
            continue
        old_keys, old_items = index.partition(number)
        if len(read):
            places = np.searchsorted(read, old_keys)
            np.minimum(places, len(read) - 1, out=places)
            untouched = read[places] != old_keys
            del places
        else:
            untouched = np.ones(len(old_keys), bool)
        del read
        old_keys, old_items = old_keys[untouched], old_items[untouched]
        del untouched
        # both sorted: merged by inserting the new ones where they belong
        at = np.searchsorted(old_keys, new_keys)
        yield np.insert(old_keys, at, new_keys), np.insert(old_items, at, new_items)
