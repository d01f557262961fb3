"""Incremental runs: the items earlier runs finished, and the filter that leaves them out.

With ``input.incremental = true`` a job remembers, in ``.batchrunner/<name>.keys`` beside its
output (a key index, see ``keyindex``), every item a run finished ok: its key hash and its
*item hash*, over the key and what is sent for it (see ``keyhash.item_hashes``). A later run
sends only the items whose key and item hash are not remembered: new items, and changed ones.

    a row's content     the fields it sends, each by name, JSON kind and value (1 and 1.0
                        differ, as in the request)
    a file's content    its path, size and modification time (ns); the file is not read

Before anything is sent, ``SeenItems.check`` reads the input once (the same batches the run
reads; read and hashed by a thread of its own, ``ahead``, a piece or two ahead of the
spilling), spills each row's key hash, item hash and row number to partition files, and goes
through them a partition at a time: a key found twice stops the run (``InputError``: which
row would the remembered result be?), and each row already done gets a bit. The run then
reads the input again through ``filter``, which leaves the done rows out and packs the others
into full batches of ``batch.size``, in input order (a night with nothing new does not read
the input a second time).

The index is replaced (written aside, renamed) only after the run's output is committed, by
``remember``: every key the run read is remembered with its item hash if its row is done or
finished ok now, and forgotten if it ended in error (so that it is sent again next time);
keys the run did not read keep what they had. A run cut short leaves the index as it was,
so that resuming filters exactly as the cut-short run did.

An index of an earlier version, ``<name>.seen.parquet`` (keys as text and a blake2b item
hash), is converted once when first read; the night after it, the rows are checked with its
hash (slower, once) and the index written with today's.

Cost: on disk, 16 bytes a remembered item (the index; another 16 while a new one is
written aside), and 24 bytes a row of the night's input while it runs (the spill, removed
after); in memory, one bit a row of the input, and one partition (1/256th) at a time.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator
import os
import shutil
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from queue import Queue
from typing import Any, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrunner.errors import InputError, StateError
from batchrunner.items import STATUS_OK, Batch, KeyedRows
from batchrunner.job.identity import INCREMENTAL_IDENTITY
from batchrunner.keyhash import U64, batch_hashes, flag_values, key_hashes
from batchrunner.keyindex import (
    LEGACY_SCHEME,
    SCHEME,
    KeyIndex,
    RowBits,
    UnreadableIndex,
    match,
    merged,
    read_index,
    write_index,
)
from batchrunner.keyspill import Duplicates, Spill
from batchrunner.sources import Source, TabularSource

log = logging.getLogger("batchrunner")
T = TypeVar("T")

SEEN_METADATA_KEY = b"batchrunner.seen"  # the metadata of an earlier version's .seen.parquet
#: The version of an empty memory: no file yet, or one that was removed.
NOTHING_REMEMBERED = "nothing remembered"

# blake2b's personalization of the earlier version's item hash (see ``legacy_item_hashes``).
_ROW_PERSON = b"batchrunner.row"
_FILE_PERSON = b"batchrunner.file"
_DIGEST = operator.methodcaller("digest")
# Rows read between two calls of ``release_unused``.
RELEASE_ROWS = 1 << 18
RELEASE_EVERY = 4  # pieces of the check's read (of at most CHUNK_ROWS, 65,536 rows)


def release_unused() -> None:
    """Give the memory Arrow's pool holds free back to the system (``wiring.
    use_lean_memory_pool``'s jemalloc purges its arenas): the check's reads and hashes would
    otherwise keep tens of megabytes of freed buffers over a 10,000,000-row night."""
    pa.default_memory_pool().release_unused()


# --- the earlier version's item hash ---------------------------------------------------------


def legacy_item_hashes(batch: Batch) -> array[int]:
    """Each item's hash as ``.seen.parquet`` files hold it (blake2b over the JSON of the key
    and the values): used the night after such a file is converted, then never again."""
    if batch.rows is None:
        if batch.path is None:
            return array("q")
        try:
            stat = batch.path.stat()
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime_ns = -1
        record = orjson.dumps([batch.keys[0], os.fspath(batch.path), size, mtime_ns])
        return _signed(hashlib.blake2b(record, digest_size=8, person=_FILE_PERSON).digest())
    names = sorted(batch.rows.schema.names)
    salt = hashlib.blake2b(orjson.dumps(names), digest_size=16).digest()
    new_hash = functools.partial(hashlib.blake2b, digest_size=8, salt=salt, person=_ROW_PERSON)
    columns = [batch.rows.column(name).to_pylist() for name in names]
    try:
        records = map(orjson.dumps, zip(batch.keys, *columns, strict=True))
        return _signed(b"".join(map(_DIGEST, map(new_hash, records))))
    except orjson.JSONEncodeError:
        records = map(_dumps_anything, zip(batch.keys, *columns, strict=True))
        return _signed(b"".join(map(_DIGEST, map(new_hash, records))))


def _dumps_anything(record: tuple[Any, ...]) -> bytes:
    return orjson.dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS)


def _signed(digests: bytes) -> array[int]:
    hashes = array("q")
    hashes.frombytes(digests)
    if sys.byteorder == "big":
        hashes.byteswap()
    return hashes


# --- the remembered items --------------------------------------------------------------------


class SeenItems:
    """The items earlier runs of a job finished, checked against this run's input.

    Made by ``open_seen``. ``check`` reads the input once (duplicate keys, rows done);
    ``filter`` leaves the done rows out of the run's batches; ``remember`` updates the index
    from the committed output, once, at the end.
    """

    def __init__(self, path: Path, index: KeyIndex | None, version: str) -> None:
        self.path = path
        self.version = version  # the run that wrote the index, or NOTHING_REMEMBERED
        self._index = index
        converting = index is not None and index.scheme == LEGACY_SCHEME
        self._spill = Spill(path.with_name(path.name + ".work"), converting=converting)
        self._done: RowBits | None = None
        self._counted = 0  # input rows whose left-out rows are counted into rows_skipped
        self.rows_skipped = 0  # rows filter() left out: done by earlier runs

    def __len__(self) -> int:
        return 0 if self._index is None else self._index.count

    def resume_identity(self, identity: Mapping[str, Any]) -> dict[str, Any]:
        """``identity`` (the job's) with the remembered items it is filtered against.

        A cut-short run is resumed only when they are the same: its journal holds batches
        filtered against them.
        """
        return {**identity, INCREMENTAL_IDENTITY: self.version}

    def check_output(self, output: Path, *, resuming: bool) -> None:
        """Warn when the run is about to replace an earlier run's output: the items that file
        holds are remembered as done, and their results are in it and nowhere else."""
        if output.exists() and not resuming:
            log.warning(
                "%s exists and is replaced; the items it holds are remembered as done and are "
                "not sent again: give each run its own file ({date} or {run_id} in output.path)",
                output,
            )

    def check(self, read: Callable[[], Iterable[Batch | KeyedRows]]) -> None:
        """Read the input (``read()``: the run's rows before the filter, see ``check_reader``)
        once: raise ``InputError`` if a key comes twice, and find the rows already done."""
        legacy = self._index is not None and self._index.scheme == LEGACY_SCHEME
        for keys, items, new_items in ahead(_hashed(read(), legacy=legacy)):
            self._spill.add(keys, items, new_items)
        release_unused()
        duplicates = Duplicates()
        self._done = match(self._spill, self._index, duplicates.add)
        release_unused()
        if duplicates:
            name_examples(duplicates, read())
            self._spill.remove()
            raise InputError(
                f"the input's keys are not unique: {duplicates.describe()}. With "
                "input.incremental each key is remembered with its row: make input.id_column "
                "unique, or leave it out to key rows by their number"
            )

    def filter(self, batches: Iterable[Batch], size: int, *, dry: bool = False) -> Iterator[Batch]:
        """``batches`` (the input, in order) without the rows already done, packed into
        batches of ``size`` rows numbered from 0 (the last may be shorter).

        The first time rows go through, the left-out ones are counted into
        ``rows_skipped`` (unless ``dry``); going through them again is allowed.
        """
        assert self._done is not None, "check the input first"
        done = self._done
        skipped = done.total()
        if skipped == done.count:  # nothing to send: no need to read the input again
            if not dry and self._counted < done.count:
                self.rows_skipped += skipped
                self._counted = done.count
            return
        row = seq = 0
        pending: list[Batch] = []
        pending_rows = 0
        for batch in batches:
            if row // RELEASE_ROWS != (row + len(batch)) // RELEASE_ROWS:
                release_unused()
            left_out = done.get(row, len(batch))
            if not dry and row >= self._counted:
                self.rows_skipped += int(left_out.sum())
                self._counted = row + len(batch)
            row += len(batch)
            kept = batch if not left_out.any() else batch.take(np.flatnonzero(~left_out).tolist())
            offset = 0
            while offset < len(kept):
                take = min(size - pending_rows, len(kept) - offset)
                pending.append(_rows(kept, offset, take))
                pending_rows += take
                offset += take
                if pending_rows == size:
                    yield _packed(pending, seq)
                    seq += 1
                    pending, pending_rows = [], 0
        if pending:
            yield _packed(pending, seq)

    def remember(self, output: Path, *, run_id: str, url: str, trial: bool = False) -> None:
        """Update the index from ``output``, the run's committed output (written aside, then
        renamed into place); a ``trial`` run (``--limit``) leaves it as it was."""
        if trial:
            log.info("--limit: a trial run; its items are not remembered as done")
            self._spill.remove()
            return
        assert self._done is not None, "check the input first"
        unchanged = self._index is not None and self._index.scheme == SCHEME
        if unchanged and self._done.total() == self._done.count:
            self._spill.remove()
            return  # nothing sent, nothing changes: the index stays as it is
        release_unused()  # what the run's batches and answers used
        done_before = self._done.total()
        keep, forgotten = _finished_rows(output, self._done)
        metadata = {
            "scheme": SCHEME,
            "run_id": run_id,
            "url": url,
            "updated": datetime.now().astimezone().isoformat(),
        }
        index = write_index(self.path, merged(self._spill, self._index, keep), metadata)
        self._spill.remove()
        log.info(
            "remembered %s items in %s: %s finished ok in this run; %s error rows are sent again "
            "next time",
            f"{index.count:,}", self.path, f"{keep.total() - done_before:,}",
            f"{forgotten:,}",
        )  # fmt: skip


def _hashed(
    batches: Iterable[Batch | KeyedRows], *, legacy: bool
) -> Iterator[tuple[U64, U64, U64 | None]]:
    """Each batch's key hashes and item hashes (and today's item hashes, for a ``legacy``
    index: looked up with the old hash, remembered with today's)."""
    for number, batch in enumerate(batches, 1):
        if number % RELEASE_EVERY == 0:
            release_unused()
        keys, items = batch_hashes(batch)
        if not legacy:
            yield keys, items, None
            continue
        if isinstance(batch, KeyedRows):
            batch = Batch(0, batch.keys.to_pylist(), batch.rows)
        old = np.frombuffer(legacy_item_hashes(batch), np.int64).view(np.uint64)
        yield keys, old, items


def ahead(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``items``, made by a thread of their own up to ``depth`` ahead: the next pieces are
    read and hashed while this one is spilled (Arrow and numpy mostly without the GIL: the
    check on two cores). What the thread raises is raised here; leaving early stops it."""
    queue: Queue[tuple[bool, Any]] = Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        end: BaseException | None = None
        try:
            for item in items:
                queue.put((True, item))
                if stop.is_set():
                    break
        except BaseException as exc:  # raised again in the caller's thread
            end = exc
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        queue.put((False, end))

    thread = threading.Thread(target=produce, name="batchrunner-check", daemon=True)
    thread.start()
    more = True
    try:
        while more:
            more, value = queue.get()
            if more:
                yield value
            elif value is not None:
                raise value
    finally:
        stop.set()
        while more:  # drained, so that the thread's last put goes through
            more, _ = queue.get()
        thread.join()


def _rows(batch: Batch, offset: int, count: int) -> Batch:
    if offset == 0 and count == len(batch):
        return batch
    return batch.take(list(range(offset, offset + count)))


def _packed(pieces: list[Batch], seq: int) -> Batch:
    if len(pieces) == 1:
        piece = pieces[0]
        return Batch(seq, piece.keys, piece.rows, piece.path, piece.kept)
    keys = [key for piece in pieces for key in piece.keys]
    rows = _concat([piece.rows for piece in pieces if piece.rows is not None])
    kept = _concat([piece.kept for piece in pieces if piece.kept is not None])
    return Batch(seq, keys, rows, None, kept)


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch | None:
    if not batches:
        return None
    target = batches[-1].schema  # a column widened mid-stream: the latest types
    return pa.concat_batches([b if b.schema == target else b.cast(target) for b in batches])


def _finished_rows(output: Path, done: RowBits) -> tuple[RowBits, int]:
    """The input rows to remember (done before, or ok in ``output``): ``done``, its bits set
    in place (12.5 MB at 100,000,000 rows: no copy), and how many of the rows the run sent
    ended in error. The output holds the sent rows, in input order."""
    statuses = (
        flag_values(pc.equal(rows.column(0), STATUS_OK))  # (imports pandas, if installed)
        for rows in pq.ParquetFile(output).iter_batches(columns=["_status"])
    )
    waiting = np.zeros(0, bool)
    errors = 0
    window = 1 << 16  # rows: their numbers and statuses, a few MB
    for start in range(0, done.count, window):
        count = min(window, done.count - start)
        sent = np.flatnonzero(~done.get(start, count)).astype(np.uint64) + np.uint64(start)
        while len(waiting) < len(sent):
            more = next(statuses, None)
            assert more is not None, "the output holds every row the run sent"
            waiting = np.concatenate([waiting, more])
        ok, waiting = waiting[: len(sent)], waiting[len(sent) :]
        done.set(sent[ok])
        errors += int((~ok).sum())
    return done, errors


def check_reader(
    source: Source, size: int, limit: int | None
) -> Callable[[], Iterator[Batch | KeyedRows]]:
    """How ``SeenItems.check`` reads ``source``: a table's keys and sent fields as Arrow
    columns (no Python text per key), other inputs as batches of ``size``."""
    if isinstance(source, TabularSource):
        return functools.partial(source.iter_keyed, limit=limit)
    return functools.partial(source.iter_batches, size, limit=limit)


def name_examples(duplicates: Duplicates, batches: Iterable[Batch | KeyedRows]) -> None:
    """Fill in the keys of ``duplicates``' examples from ``batches`` (the input again)."""
    wanted = duplicates.example_rows()
    row = 0
    for batch in batches:
        count = len(batch.keys)
        for place in (r - row for r in wanted if row <= r < row + count):
            key = batch.keys[place]
            duplicates.texts[row + place] = key.as_py() if isinstance(key, pa.Scalar) else key
        row += count
        if row > max(wanted, default=0):
            break


def open_seen(path: Path, *, url: str, legacy: Path | None = None) -> SeenItems:
    """The items earlier runs finished, from the index at ``path`` (none if it does not
    exist); an earlier version's ``legacy`` file (``.seen.parquet``) is converted first.

    Raises ``StateError`` if the file cannot be read: sending every item again because of a
    damaged file is a decision for a person.
    """
    if not path.exists() and legacy is not None and legacy.exists():
        _convert(legacy, path)
    if not path.exists():
        log.info("incremental: nothing remembered yet (%s): every item is sent", path)
        return SeenItems(path, None, NOTHING_REMEMBERED)
    try:
        index = read_index(path)
    except UnreadableIndex as exc:
        raise StateError(_unreadable(path, str(exc))) from exc
    version = str(index.metadata.get("run_id", path.stat().st_mtime_ns))
    log.info(
        "incremental: %s items remembered in %s; only new and changed items are sent",
        f"{index.count:,}", path,
    )  # fmt: skip
    earlier_url = index.metadata.get("url")
    if earlier_url is not None and earlier_url != url:
        log.info(
            "incremental: the remembered items were scored by %s, this run sends to %s; "
            "to score them again, remove %s",
            earlier_url, url, path,
        )  # fmt: skip
    return SeenItems(path, index, version)


def _convert(legacy: Path, path: Path) -> None:
    """Write the index of an earlier version's ``.seen.parquet``, once, then remove it."""
    spill = Spill(path.with_name(path.name + ".work"))
    try:
        file = pq.ParquetFile(legacy)
        names = file.schema_arrow.names
        if "key" not in names or "item" not in names:
            raise StateError(_unreadable(legacy, "it has no column 'key' or 'item'"))
        document = orjson.loads((file.schema_arrow.metadata or {}).get(SEEN_METADATA_KEY, b"{}"))
        for rows in file.iter_batches(columns=["key", "item"]):
            items = pc.fill_null(pc.cast(rows.column(1), pa.int64()), 0)
            items = np.frombuffer(items.buffers()[1], np.int64, len(items), items.offset * 8)
            spill.add(key_hashes(rows.column(0)), items.view(np.uint64))
        partitions = ((part.sorted("key"), part.sorted("item")) for _, part in spill.partitions())
        metadata = {
            "scheme": LEGACY_SCHEME,
            "run_id": str(document.get("run_id", legacy.stat().st_mtime_ns)),
            "url": document.get("url"),
            "updated": document.get("updated"),
            "converted_from": legacy.name,
        }
        index = write_index(path, partitions, metadata)
    except (OSError, pa.ArrowException, orjson.JSONDecodeError) as exc:
        raise StateError(_unreadable(legacy, str(exc))) from exc
    finally:
        spill.remove()
    legacy.unlink()
    log.info(
        "incremental: %s remembered items converted from %s to %s",
        f"{index.count:,}", legacy, path,
    )  # fmt: skip


def _unreadable(path: Path, reason: str) -> str:
    return (
        f"cannot read the items earlier runs finished from {path} ({reason}); remove it to "
        f"send every item again and remember them anew, or run with "
        f"--set input.incremental=false to send every item without it"
    )


def remove_work(path: Path) -> None:
    """Remove what a run of the index at ``path`` left aside (its spill folder)."""
    shutil.rmtree(path.with_name(path.name + ".work"), ignore_errors=True)
