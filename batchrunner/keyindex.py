"""Keys on disk: row hashes, the duplicate-key check, and the index of what earlier runs finished.

Hashes, 64 bits, computed a column at a time with numpy (never a Python call per row):

    key hash    the key, as text
    item hash   the key hash and what is sent for the row: each sent field's name, its JSON
                kind (integer, number, text, true/false, other) and value; ``1`` and ``1.0``
                differ, as in the request. A batch's digest is blake2b over its item hashes.

Every check runs over *partitions*: a stream of (key hash, item hash, row number) records,
24 bytes a row, is spilled to ``PARTITIONS`` files by the top bits of the key hash
(``Spill``), and each partition is then sorted in memory on its own: memory holds one
partition (a 256th of the rows), never the whole input.

- ``Spill.duplicates``: keys seen more than once (rows, and a few examples).
- The index file (``.batchrunner/<name>.keys``): a 4 KiB header (magic, then JSON: count,
  hash scheme, the run that wrote it, URL), the key hashes of every remembered item, sorted,
  then their item hashes in the same order: 16 bytes a row. A partition is a contiguous range
  of it, read with one sequential read. ``Spill.match`` finds, partition by partition, the
  rows whose key and item hash the index holds: one bit a row in memory.
- ``write_index`` writes an index aside, flushes it, and renames it into place: a crash
  leaves the previous one as it was.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.items import Batch, KeyedRows
from batchrunner.storage import InputPath, ObjectPath
from batchrunner.writing import fsync

U64 = npt.NDArray[np.uint64]

PARTITION_BITS = 8
PARTITIONS = 1 << PARTITION_BITS
HEADER_BYTES = 4096
MAGIC = b"BRKEYS1\n"
#: The item hash this module computes; ``LEGACY_SCHEME``: the one of ``.seen.parquet`` files.
SCHEME = "columns-v2"
LEGACY_SCHEME = "blake2b-json-v1"
RECORD = np.dtype([("key", "<u8"), ("item", "<u8"), ("row", "<u8")])
CONVERTING_RECORD = np.dtype([("key", "<u8"), ("item", "<u8"), ("row", "<u8"), ("new", "<u8")])
# Records buffered before they are spread over the partition files.
SPILL_ROWS = 1 << 17
DUPLICATE_EXAMPLES = 5
SHORT_TEXT = 64  # bytes: values up to this long are hashed a word at a time

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_NULL = np.uint64(0x9E3779B97F4A7C15)
_TOP = np.uint64(64 - PARTITION_BITS)


def _mix(values: U64) -> U64:
    """MurmurHash3's 64-bit finalizer: every input bit moves every output bit (in place)."""
    values ^= values >> _S33
    values *= _M1
    values ^= values >> _S33
    values *= _M2
    values ^= values >> _S33
    return values


def _seed(*parts: object) -> np.uint64:
    digest = hashlib.blake2b(orjson.dumps(parts), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


# --- hashes ----------------------------------------------------------------------------------


def key_hashes(keys: pa.Array | Sequence[str]) -> U64:
    """Each key's hash (keys as text, one per row)."""
    array = keys if isinstance(keys, pa.Array) else pa.array(keys, pa.string())
    return _text_hashes(array, _seed("key"))


def item_hashes(keys: U64, rows: pa.RecordBatch | None, files: Sequence[InputPath] = ()) -> U64:
    """Each row's item hash: its key hash (``keys``) and the fields of ``rows`` it sends; for
    file input (``rows`` None), the file's path, size and modification time instead (an
    object's ETag when its listing gave one: a replaced object has a new one, even in the
    same second, and an unchanged one keeps it)."""
    hashes = keys.copy()
    if rows is None:
        for index, path in enumerate(files):
            try:
                stat = path.stat()
                content: list[Any] = [str(path), stat.st_size, stat.st_mtime_ns]
                if isinstance(path, ObjectPath) and path.etag:
                    content[2] = "etag:" + path.etag
            except OSError:
                content = [os.fspath(path), -1, -1]  # gone: sent, and not remembered
            hashes[index] ^= _seed("file", content)
        return _mix(hashes)
    for name in sorted(rows.schema.names):
        column = rows.column(name)
        hashes = _mix(hashes + _column_hashes(name, column))
    return _mix(hashes ^ _seed("columns", sorted(rows.schema.names)))


def batch_hashes(batch: Batch | KeyedRows) -> tuple[U64, U64]:
    """A batch's key hashes and item hashes, in row order (rows read as ``KeyedRows`` hash
    as the batches cut from them do)."""
    if isinstance(batch, KeyedRows):
        keys = key_hashes(batch.keys)
        return keys, item_hashes(keys, batch.rows)
    keys = key_hashes(list(batch.keys))
    return keys, item_hashes(keys, batch.rows, [batch.path] if batch.path is not None else [])


def content_digest(batch: Batch) -> tuple[U64, bytes]:
    """A batch's key hashes, and what identifies what is sent for it: 8 bytes of blake2b over
    its rows' item hashes (keys and values, in order)."""
    keys, items = batch_hashes(batch)
    return keys, hashlib.blake2b(_little(items).tobytes(), digest_size=8).digest()


def _little(values: U64) -> U64:
    return values.byteswap() if sys.byteorder == "big" else values


def _column_hashes(name: str, column: pa.Array) -> U64:
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.dictionary_decode()
        kind = column.type
    if pa.types.is_integer(kind):
        bits = _numbers(column, pa.int64()).view(np.uint64)
        hashes = _mix(bits ^ _seed(name, "integer"))
    elif pa.types.is_floating(kind):
        hashes = _mix(_numbers(column, pa.float64()).view(np.uint64) ^ _seed(name, "number"))
    elif pa.types.is_boolean(kind):
        flags = flag_values(column).astype(np.uint64)
        hashes = _mix(flags ^ _seed(name, "boolean"))
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        hashes = _text_hashes(column, _seed(name, "text"))
    elif pa.types.is_null(kind):
        hashes = np.zeros(len(column), np.uint64)
    else:  # lists, structs, ...: as the JSON they are sent as (rare: a Python call per row)
        texts = [orjson.dumps(value, default=str) for value in column.to_pylist()]
        hashes = _text_hashes(pa.array(texts, pa.binary()), _seed(name, "json"))
    if column.null_count:
        nulls = _nulls(column)
        hashes[nulls] = _mix(np.asarray([_NULL ^ _seed(name, "null")], np.uint64))[0]
    return hashes


def _numbers(column: pa.Array, kind: pa.DataType) -> npt.NDArray[Any]:
    """The numbers of ``column`` as ``kind``; what null slots hold is left as it is (their
    hashes are replaced by the null hash)."""
    if column.type != kind:
        column = pc.cast(column, kind)
    dtype = np.dtype(np.int64 if pa.types.is_integer(kind) else np.float64)
    buffer = column.buffers()[1]
    if buffer is None:
        return np.zeros(len(column), dtype)
    return np.frombuffer(buffer, dtype, len(column), column.offset * dtype.itemsize)


# Arrow imports pandas, when it is installed, for ``to_numpy`` and for any Python value
# made an Arrow one (``pa.array``, ``pa.scalar``, a compute function given 0 or "ok"): 30 MB
# of a night's memory. Values are read from the arrays' buffers instead.


def _bits(buffer: pa.Buffer | None, offset: int, count: int) -> npt.NDArray[np.bool_]:
    if buffer is None:
        return np.ones(count, bool)
    bits = np.unpackbits(np.frombuffer(buffer, np.uint8), bitorder="little")
    return bits[offset : offset + count].astype(bool)


def _nulls(column: pa.Array) -> npt.NDArray[np.bool_]:
    if column.null_count == len(column):  # a null column has no validity buffer
        return np.ones(len(column), bool)
    return ~_bits(column.buffers()[0], column.offset, len(column))


def flag_values(column: pa.Array) -> npt.NDArray[np.bool_]:
    """The values of a boolean ``column`` (its nulls read as false) as numpy booleans."""
    if not len(column):
        return np.zeros(0, bool)
    validity, values = column.buffers()[:2]
    flags = _bits(values, column.offset, len(column))
    if column.null_count:
        flags &= _bits(validity, column.offset, len(column))
    return flags


def arrow_mask(flags: npt.NDArray[np.bool_]) -> pa.BooleanArray:
    """``flags`` as an Arrow boolean array, for ``filter``."""
    packed = np.packbits(flags, bitorder="little")
    return pa.BooleanArray.from_buffers(pa.bool_(), len(flags), [None, pa.py_buffer(packed)])


def _text_hashes(array: pa.Array, seed: np.uint64) -> U64:
    """A hash per value of a text or binary array: values of up to ``SHORT_TEXT`` bytes (keys,
    codes) a word at a time, longer ones a byte at a time (``_byte_hashes``). Which is used
    depends on the value alone, never on the batch it comes in."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if len(array) == 0:
        return np.zeros(0, np.uint64)
    offsets, _ = _offsets_and_data(array)
    long = np.diff(offsets) > SHORT_TEXT
    if not long.any():
        return _word_hashes(array, seed)
    hashes = np.empty(len(array), np.uint64)
    hashes[~long] = _word_hashes(array.filter(arrow_mask(~long)), seed)
    hashes[long] = _byte_hashes(array.filter(arrow_mask(long)), seed)
    return hashes


def _word_hashes(array: pa.Array, seed: np.uint64) -> U64:
    """Values (of up to ``SHORT_TEXT`` bytes) laid out in rows of 8-byte words, zero-padded,
    with one scatter of their bytes; then one pass per word of the longest value. Each value
    is mixed with its own words only, and with its length, so that padding never makes two
    values equal."""
    offsets, data = _offsets_and_data(array)
    count = len(offsets) - 1
    lengths = np.diff(offsets)
    if count == 0:
        return np.zeros(0, np.uint64)
    words_per_row = np.maximum(1, -(-lengths // 8))
    width = int(words_per_row.max()) * 8  # bytes a row
    table = np.zeros(count * width, np.uint8)
    shortest = int(lengths.min())
    if shortest == int(lengths.max()):  # one length (ids of one width, codes): a copy
        table.reshape(count, width)[:, :shortest] = data.reshape(count, shortest)
    elif len(data):
        # data byte i of value r goes to r * width + (i - its start)
        place = np.int32 if len(table) < 1 << 31 else np.int64  # half the memory of int64
        shift = (np.arange(count, dtype=np.int64) * width - (offsets[:-1] - offsets[0])).astype(
            place
        )
        destination = np.repeat(shift, lengths)
        destination += np.arange(len(data), dtype=place)
        table[destination] = data
    words = table.view("<u8").reshape(count, width // 8)
    hashes = _mix(lengths.astype(np.uint64) ^ seed)
    for column in range(words.shape[1]):
        mixed = _mix(hashes + words[:, column].astype(np.uint64))
        hashes = mixed if column == 0 else np.where(words_per_row > column, mixed, hashes)
    return hashes


def _offsets_and_data(array: pa.Array) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    count = len(array)
    wide = pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
    offsets_type = np.int64 if wide else np.int32
    buffers = array.buffers()
    offsets = np.frombuffer(
        buffers[1], offsets_type, count + 1, array.offset * np.dtype(offsets_type).itemsize
    ).astype(np.int64)
    first, last = int(offsets[0]), int(offsets[-1])
    if last == first or buffers[2] is None:
        return offsets, np.zeros(0, np.uint8)
    return offsets, np.frombuffer(buffers[2], np.uint8, last - first, first)


def _byte_hashes(array: pa.Array, seed: np.uint64) -> U64:
    """Each byte mixed with its place in the value, summed per value, then mixed with the
    value's length."""
    count = len(array)
    offsets, data = _offsets_and_data(array)
    lengths = np.diff(offsets)
    sums = np.zeros(count, np.uint64)
    if len(data):
        first = int(offsets[0])
        starts = offsets[:-1] - first
        places = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
        mixed = _mix((data.astype(np.uint64) | (places.astype(np.uint64) << np.uint64(8))) ^ seed)
        totals = np.concatenate([np.zeros(1, np.uint64), np.cumsum(mixed, dtype=np.uint64)])
        sums = totals[offsets[1:] - first] - totals[starts]
    return _mix(sums ^ _mix(lengths.astype(np.uint64) ^ seed))


# --- partitions ------------------------------------------------------------------------------


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
        """Each partition's records, in partition order."""
        self.flush()
        self._close()
        for number in range(PARTITIONS):
            path = self.folder / f"{number:03d}"
            records = np.fromfile(path, self.dtype) if path.exists() else np.empty(0, self.dtype)
            yield number, Partition(records)

    def duplicates(self) -> Duplicates:
        """The rows whose key an earlier row already had."""
        found = Duplicates()
        for _, partition in self.partitions():
            found.add(partition)
        return found

    def remove(self) -> None:
        self._close()
        shutil.rmtree(self.folder, ignore_errors=True)


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


# --- the index file --------------------------------------------------------------------------


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
        return keys.astype(np.uint64), items.astype(np.uint64)


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

    def copy(self) -> RowBits:
        bits = RowBits(0)
        bits.count, bits._bits = self.count, self._bits.copy()
        return bits

    def get_many(self, rows: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """The bits of ``rows``, as booleans."""
        places = rows.astype(np.int64)
        bits = (self._bits[places >> 3] >> (places & 7).astype(np.uint8)) & 1
        return np.asarray(bits, bool)

    def total(self) -> int:
        return int(np.unpackbits(self._bits, bitorder="little")[: self.count].sum())


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
    for number, partition in spill.partitions():
        read = partition.sorted("key")
        keep = remember.get_many(partition.sorted("row"))
        remembered = "new" if "new" in (spill.dtype.names or ()) else "item"
        new_keys, new_items = read[keep], partition.sorted(remembered)[keep]  # sorted
        if index is None:
            yield new_keys, new_items
            continue
        old_keys, old_items = index.partition(number)
        places = np.minimum(np.searchsorted(read, old_keys), max(len(read) - 1, 0))
        untouched = read[places] != old_keys if len(read) else np.ones(len(old_keys), bool)
        old_keys, old_items = old_keys[untouched], old_items[untouched]
        # both sorted: merged by inserting the new ones where they belong
        at = np.searchsorted(old_keys, new_keys)
        yield np.insert(old_keys, at, new_keys), np.insert(old_items, at, new_items)
