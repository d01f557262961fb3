"""Incremental runs: the items earlier runs finished, and the filter that leaves them out.

With ``input.incremental = true`` a job remembers, in ``.batchrunner/<name>.seen.parquet``
beside its output, every item a run finished ok: its key, and its *item hash*, 64 bits of
blake2b over the item's key and content. A later run hashes every item it reads and sends
only those whose hash is not remembered: new items, and changed ones (another content,
another hash).

    a row's content     the fields it sends, as the JSON values they are sent as (1 and 1.0
                        differ, as in the request), by column name
    a file's content    its path, size and modification time (ns); the file is not read

The file is read once, when a run starts, into a set of item hashes, and is replaced
(written aside, renamed) only after the run's output is committed. A run cut short leaves
it as it was, so that resuming filters exactly as the cut-short run did: its journal holds
the filtered batches. When the output is committed, each of its rows updates its key: an
ok row's key is remembered with the row's item hash (replacing what the key had), an error
row's key is forgotten, so that it is sent again next time. Keys the run did not send keep
what they had.

Memory: the set costs about 70 bytes per remembered item (a Python int and its slot in
the set); the hashes of the items a run sends, 8 bytes each until the run ends. Updating
the file streams it and the output; it holds the keys the run sent.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator
import os
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from itertools import compress
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrunner.errors import StateError
from batchrunner.items import STATUS_OK, Batch
from batchrunner.job import INCREMENTAL_IDENTITY
from batchrunner.report import RunStats
from batchrunner.writing import fsync

log = logging.getLogger("batchrunner")

SEEN_SCHEMA = pa.schema([("key", pa.string()), ("item", pa.int64())])
SEEN_METADATA_KEY = b"batchrunner.seen"
#: The version of an empty memory: no file yet, or one that was removed.
NOTHING_REMEMBERED = "nothing remembered"

# blake2b's personalization (at most 16 bytes) keeps row and file hashes apart.
_ROW_PERSON = b"batchrunner.row"
_FILE_PERSON = b"batchrunner.file"
_DIGEST = operator.methodcaller("digest")


# --- item hashes -----------------------------------------------------------------------------


def item_hashes(batch: Batch) -> array[int]:
    """Each item's hash (its key and content, 64 bits), in row order."""
    if batch.rows is None:
        return _file_hashes(batch)
    names = sorted(batch.rows.schema.names)
    # The names salt every row's hash: a column sent under another name, or one column
    # more, makes every row new, as the service sees it.
    salt = hashlib.blake2b(orjson.dumps(names), digest_size=16).digest()
    new_hash = functools.partial(hashlib.blake2b, digest_size=8, salt=salt, person=_ROW_PERSON)
    # Column by column into Python values, then one JSON array per row (the key, then the
    # values) and its blake2b, all in C: a Python loop per row would double the cost.
    columns = [batch.rows.column(name).to_pylist() for name in names]
    try:
        records = map(orjson.dumps, zip(batch.keys, *columns, strict=True))
        return _hashes(b"".join(map(_DIGEST, map(new_hash, records))))
    except orjson.JSONEncodeError:
        # A value JSON cannot hold (an interval, say) still gets a hash: its text. The
        # request fails too, and an error row is not remembered.
        records = map(_dumps_anything, zip(batch.keys, *columns, strict=True))
        return _hashes(b"".join(map(_DIGEST, map(new_hash, records))))


def _dumps_anything(record: tuple[Any, ...]) -> bytes:
    return orjson.dumps(record, default=str, option=orjson.OPT_NON_STR_KEYS)


def _file_hashes(batch: Batch) -> array[int]:
    if batch.path is None:
        return array("q")
    try:
        stat = batch.path.stat()
        size, mtime_ns = stat.st_size, stat.st_mtime_ns
    except OSError:
        size = mtime_ns = -1  # gone or unreadable: sent, and its error row is not remembered
    record = orjson.dumps([batch.keys[0], os.fspath(batch.path), size, mtime_ns])
    return _hashes(hashlib.blake2b(record, digest_size=8, person=_FILE_PERSON).digest())


def _hashes(digests: bytes) -> array[int]:
    hashes = array("q")
    hashes.frombytes(digests)
    if sys.byteorder == "big":  # the same numbers on every machine: the file may move
        hashes.byteswap()
    return hashes


# --- the remembered items --------------------------------------------------------------------


class Remembered(NamedTuple):
    """What a run's update did to the remembered items."""

    items: int  # remembered now, in all
    added: int  # this run's ok rows
    forgotten: int  # this run's error rows: their keys are sent again next time


class SeenItems:
    """The items earlier runs of a job finished, and the hashes of those this run sends.

    Made by ``open_seen``. ``filter`` leaves the remembered items out of the run's batches;
    ``remember`` updates the file from the committed output, once, at the end.
    """

    def __init__(self, path: Path, items: set[int], version: str) -> None:
        self.path = path
        self.version = version  # the run that wrote the file, or NOTHING_REMEMBERED
        self._items = items
        self._sent = array("q")  # item hashes of the rows this run sends, in output order
        self._next_seq = 0  # batches before it were filtered, and their hashes kept

    def __len__(self) -> int:
        return len(self._items)

    def resume_identity(self, identity: Mapping[str, Any]) -> dict[str, Any]:
        """``identity`` (the job's) with the remembered items it is filtered against.

        A cut-short run is resumed only when they are the same: its journal holds batches
        filtered against them. Any other run (the file removed, input.incremental turned
        off or on) starts fresh and says why.
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

    def filter(self, batches: Iterable[Batch], stats: RunStats) -> Iterator[Batch]:
        """``batches`` without the items already done; a batch keeps its ``seq``, and may
        come out empty (not to be sent).

        The first time each batch goes through, its left-out rows are counted into
        ``stats.rows_skipped`` (the filter is its only writer, possibly from the reader's
        thread) and its kept rows' hashes are kept for ``remember``. Batches must come in
        ``seq`` order from 0; going through them again (after an abort) is allowed.
        """
        for batch in batches:
            hashes = item_hashes(batch)
            kept, kept_hashes = self._leave_out_done(batch, hashes)
            if batch.seq == self._next_seq:
                self._sent.extend(kept_hashes)
                stats.rows_skipped += len(batch) - len(kept)
                self._next_seq += 1
            else:
                assert batch.seq < self._next_seq, "batches must come in seq order"
            yield kept

    def _leave_out_done(self, batch: Batch, hashes: array[int]) -> tuple[Batch, array[int]]:
        if not self._items:
            return batch, hashes
        done = list(map(self._items.__contains__, hashes))
        if not any(done):
            return batch, hashes
        if all(done):
            return batch.take([]), array("q")
        wanted = list(map(operator.not_, done))
        indices = list(compress(range(len(batch)), wanted))
        return batch.take(indices), array("q", compress(hashes, wanted))

    def remember(self, output: Path, *, run_id: str, url: str, trial: bool = False) -> None:
        """Update the file from ``output``, the run's committed output (written aside, then
        renamed into place); a ``trial`` run (``--limit``) leaves it as it was."""
        if trial:
            log.info("--limit: a trial run; its items are not remembered as done")
            return
        if not self._sent:
            return  # nothing sent, nothing changes: the file stays as it is
        self._items = set()  # not needed any more: its memory goes to the update
        remembered = _update(self.path, output, self._sent, run_id=run_id, url=url)
        log.info(
            "remembered %s items in %s: %s finished ok in this run; %s error rows are sent again "
            "next time",
            f"{remembered.items:,}", self.path, f"{remembered.added:,}",
            f"{remembered.forgotten:,}",
        )  # fmt: skip


def open_seen(path: Path, *, url: str) -> SeenItems:
    """The items earlier runs finished, read from ``path`` (none if it does not exist).

    Raises ``StateError`` if the file cannot be read: sending every item again because of a
    damaged file is a decision for a person.
    """
    if not path.exists():
        log.info("incremental: nothing remembered yet (%s): every item is sent", path)
        return SeenItems(path, set(), NOTHING_REMEMBERED)
    try:
        file = pq.ParquetFile(path)
        if file.schema_arrow.get_field_index("item") < 0:
            raise StateError(_unreadable(path, "it has no column 'item'"))
        metadata = (file.schema_arrow.metadata or {}).get(SEEN_METADATA_KEY, b"{}")
        document = orjson.loads(metadata)
        items: set[int] = set()
        for batch in file.iter_batches(columns=["item"]):
            items.update(batch.column(0).to_pylist())
    except (OSError, pa.ArrowException, orjson.JSONDecodeError) as exc:
        raise StateError(_unreadable(path, str(exc))) from exc
    version = str(document.get("run_id", path.stat().st_mtime_ns))
    log.info(
        "incremental: %s items remembered in %s; only new and changed items are sent",
        f"{len(items):,}", path,
    )  # fmt: skip
    earlier_url = document.get("url")
    if earlier_url is not None and earlier_url != url:
        log.info(
            "incremental: the remembered items were scored by %s, this run sends to %s; "
            "to score them again, remove %s",
            earlier_url, url, path,
        )  # fmt: skip
    return SeenItems(path, items, version)


def _unreadable(path: Path, reason: str) -> str:
    return (
        f"cannot read the items earlier runs finished from {path} ({reason}); remove it to "
        f"send every item again and remember them anew, or run with "
        f"--set input.incremental=false to send every item without it"
    )


def _update(path: Path, output: Path, sent: array[int], *, run_id: str, url: str) -> Remembered:
    result = pq.ParquetFile(output)
    assert result.metadata.num_rows == len(sent), "one hash per output row"
    # Every key the run sent replaces what it had: ok rows with their new hash, error rows
    # with nothing. Held as one Arrow array: the run's keys, not the remembered ones.
    sent_keys = None
    if path.exists() and len(sent):
        sent_keys = pa.chunked_array(
            [rows.column(0) for rows in result.iter_batches(columns=["_key"])], pa.string()
        )
    metadata = {
        SEEN_METADATA_KEY: orjson.dumps(
            {"run_id": run_id, "url": url, "updated": datetime.now().astimezone().isoformat()}
        )
    }
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    items = added = 0
    try:
        with pq.ParquetWriter(str(temporary), SEEN_SCHEMA.with_metadata(metadata)) as writer:
            if path.exists():
                for old in pq.ParquetFile(path).iter_batches(columns=SEEN_SCHEMA.names):
                    if sent_keys is not None:
                        old = old.filter(pc.invert(pc.is_in(old.column(0), value_set=sent_keys)))
                    writer.write_batch(old.cast(SEEN_SCHEMA))
                    items += old.num_rows
            offset = 0
            for rows in result.iter_batches(columns=["_key", "_status"]):
                count = rows.num_rows
                hashes = _int64_array(sent[offset : offset + count])
                offset += count
                ok = pc.equal(rows.column(1), STATUS_OK)
                new = pa.record_batch([rows.column(0).filter(ok), hashes.filter(ok)], SEEN_SCHEMA)
                writer.write_batch(new)
                added += new.num_rows
        fsync(temporary)
        os.replace(temporary, path)
        fsync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
    return Remembered(items + added, added, len(sent) - added)


def _int64_array(values: array[int]) -> pa.Array:
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])
