"""Row hashes, 64 bits, computed a column at a time with numpy (never a Python call per row).

    key hash    the key, as text
    item hash   the key hash and what is sent for the row: each sent field's name, its JSON
                kind (integer, number, text, true/false, other) and value; ``1`` and ``1.0``
                differ, as in the request. A batch's digest is blake2b over its item hashes.

Values are read from the Arrow arrays' buffers: Arrow imports pandas, when it is installed,
for ``to_numpy`` and for any Python value made an Arrow one (30 MB of a night's memory).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.items import Batch, KeyedRows
from batchrunner.storage import InputPath, ObjectPath

U64 = npt.NDArray[np.uint64]

SHORT_TEXT = 64  # bytes: values up to this long are hashed a word at a time

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_NULL = np.uint64(0x9E3779B97F4A7C15)


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
