"""The reading stage: the input, batch by batch, in order, onto the pipeline's queue.

Batches are read and converted in a worker thread, a few per hop. On the way they are
counted (``statistics()``), left out when an earlier run finished them (a resume's
finished batches; ``input.incremental``'s filter), fingerprinted (what is sent for each, for
a resume to check), and their keys kept for the duplicate-key check at the end.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections.abc import Collection, Iterator
from itertools import islice
from pathlib import Path

from batchrunner.checkpoint import DIGEST_BYTES, Checkpoint, Scan, keys_digest
from batchrunner.errors import DataError, InputError
from batchrunner.incremental import SeenItems, name_examples
from batchrunner.items import Batch
from batchrunner.job import TABULAR, InputKind, Job
from batchrunner.keyhash import content_digest
from batchrunner.keyspill import Duplicates, Spill
from batchrunner.report import ReadStatistics
from batchrunner.sources import Source

log = logging.getLogger("batchrunner")

# Rows hashed together when the input is checked before a run (keys, rows done).
CHECK_BATCH_ROWS = 65_536


class Reading:
    """Reads ``source`` for a run of ``job``: ``batch_size`` items a batch, the first
    ``limit`` items (all when None), only the items of ``only_keys`` when given (``batchrunner
    retry``), without those ``seen`` holds (``input.incremental``).

    ``finished`` holds one flag per batch seq, set by the finishing stage once the batch's
    rows are journaled (and by a resume, for those the interrupted run finished): such a
    batch is counted but not queued.
    """

    def __init__(
        self,
        job: Job,
        source: Source,
        kind: InputKind,
        batch_size: int,
        *,
        limit: int | None,
        only_keys: Collection[str] | None,
        seen: SeenItems | None,
        stopping: asyncio.Event,
    ) -> None:
        self.job = job
        self.source = source
        self.kind = kind
        self.batch_size = batch_size
        self.limit = limit
        self._only_keys = only_keys
        self._seen = seen
        self._stopping = stopping
        self.rows_per_batch: array[int] = array("q")  # batches_read is its length
        self._rows_read = 0
        self.finished = bytearray()
        self._checkpoint: Checkpoint | None = None  # what the run resumed from
        self._read_everything = False
        self._digests = bytearray()  # DIGEST_BYTES per seq: what is sent for it
        self._keys: Spill | None = None  # the keys read, for the duplicate-key check
        self.data_error: DataError | None = None  # the input turned bad mid-run

    def statistics(self) -> ReadStatistics:
        """What has been read so far (a frozen copy)."""
        skipped = self._seen.rows_skipped if self._seen is not None else 0
        return ReadStatistics(len(self.rows_per_batch), self._rows_read, skipped)

    def start(self, checkpoint: Checkpoint, state: Path) -> None:
        """Read on from ``checkpoint`` (its finished batches are not sent again); the run's
        state folder ``state`` holds the keys read (``input.id_column``)."""
        self._checkpoint = checkpoint
        self.finished = checkpoint.finished
        if self._wants_duplicate_check():
            self._keys = Spill(state / "keys")

    def _wants_duplicate_check(self) -> bool:
        return self.kind == TABULAR and bool(self.job.input.id_column) and self._seen is None

    def is_finished(self, seq: int) -> bool:
        return seq < len(self.finished) and self.finished[seq] == 1

    def digest(self, seq: int) -> bytes:
        """What was sent for batch ``seq`` (read already), as journaled with it."""
        return bytes(self._digests[seq * DIGEST_BYTES : (seq + 1) * DIGEST_BYTES])

    def total(self) -> tuple[int | None, bool]:
        """Items this run will finish, when known, and whether that is an estimate."""
        if self._read_everything:
            return self._rows_read, False
        total = _expected_rows(self.source, self.limit)
        estimated = False
        skipped = self._seen.rows_skipped if self._seen is not None else 0
        if total is None:
            # CSV, JSON lines: extrapolated from the bytes read, until read through.
            total = self.source.estimated_rows()
            if total is not None:
                estimated = True
                total = max(total, self._rows_read + skipped)
                total = total if self.limit is None else min(total, self.limit)
        if total is not None:
            total -= skipped  # input.incremental: done by earlier runs
        return total, estimated

    def batches(self, *, dry: bool = False) -> Iterator[Batch]:
        """The input's batches from the first; ``dry``: neither counted nor fingerprinted."""
        batches = self.source.iter_batches(self.batch_size, limit=self.limit)
        if self._only_keys is not None:
            batches = _only(batches, self._only_keys)
        # input.incremental: rows done by earlier runs leave here, before a batch is counted,
        # journaled or sent; the rest are packed into full batches.
        if self._seen is not None:
            batches = self._seen.filter(batches, self.batch_size, dry=dry)
        return batches if dry else self._fingerprinted(batches)

    def _fingerprinted(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        # In the reader's thread, the first time each batch goes through: the digest of what
        # is sent for it (journaled with it, for a resume to check), and its keys (for the
        # duplicate-key check at the end).
        for batch in batches:
            if batch.seq == len(self._digests) // DIGEST_BYTES:
                keys, digest = content_digest(batch)
                self._digests.extend(digest)
                if self._keys is not None:
                    self._keys.add(keys, keys)
            yield batch

    def scan_for_resume(self, state: Path) -> Scan:
        """The input as it is now, batch by batch, read before a resume (see ``Scan``); a key
        found twice stops the run (``InputError``): results are matched to rows by key."""
        keys_digests, contents = bytearray(), bytearray()
        spill = Spill(state / "keys") if self._wants_duplicate_check() else None
        for batch in self.batches(dry=True):
            keys, digest = content_digest(batch)
            keys_digests.extend(keys_digest(batch.keys))
            contents.extend(digest)
            if spill is not None:
                spill.add(keys, keys)
        if spill is not None:
            duplicates = spill.duplicates()
            spill.remove()
            if duplicates:
                name_examples(duplicates, self._check_batches())
                raise InputError(
                    f"the input's keys are not unique: {duplicates.describe()}. A resumed run "
                    "matches finished results to rows by key: make input.id_column unique, "
                    "or re-run with --no-resume to start fresh"
                )
        return Scan(bytes(keys_digests), bytes(contents))

    def _check_batches(self) -> Iterator[Batch]:
        return self.source.iter_batches(CHECK_BATCH_ROWS, limit=self.limit)

    def duplicates(self) -> Duplicates | None:
        """Keys the run read more than once (input.id_column): logged, and in the summary."""
        if self._keys is None:
            return None
        try:
            if self._rows_read < self._keys.rows:  # stopped early: not the whole input
                return None
            duplicates = self._keys.duplicates()
        finally:
            self._keys.remove()
        if not duplicates:
            return None
        name_examples(duplicates, self._check_batches())
        log.warning(
            "the input's keys are not unique (input.id_column %r): %s; their results cannot be "
            "told apart by _key",
            self.job.input.id_column, duplicates.describe(),
        )  # fmt: skip
        return duplicates

    async def read(self, batches: asyncio.Queue[Batch | None]) -> None:
        """The stage: put each batch to send on ``batches``, then None."""
        iterator = self.batches()
        # Reading and converting happens in a worker thread, a few batches per hop, so the
        # event loop keeps sending while pyarrow parses (it releases the GIL) or the walk
        # lists folders.
        per_hop = max(1, 4096 // self.batch_size)
        while not self._stopping.is_set():
            try:
                chunk = await asyncio.to_thread(_take, iterator, per_hop)
            except InputError as error:
                if not self.rows_per_batch:
                    raise  # found before anything could be sent: the job is invalid (exit 2)
                # Requests went out: read no further, let those in flight finish and be
                # journaled, then stop (see the runner), so that a re-run resumes.
                self.data_error = DataError(
                    f"{error}. The run stopped once the requests in flight had finished; "
                    "its finished rows are kept: fix the input (or the setting named) and "
                    "re-run the same command to resume"
                )
                break
            for batch in chunk:
                self.count(batch)
            exhausted = len(chunk) < per_hop
            if exhausted:
                self.check_nothing_finished_beyond_input()
            self._read_everything = exhausted  # from now on the total is known exactly
            for batch in chunk:
                if len(batch) and not self.is_finished(batch.seq):  # not by an earlier run
                    await batches.put(batch)
            if exhausted:
                break
        await batches.put(None)

    def count(self, batch: Batch) -> None:
        """Count ``batch``, read for the first time."""
        assert batch.seq == len(self.rows_per_batch), "batches must come in input order"
        if self._checkpoint is not None and self.is_finished(batch.seq):
            # Read for the first time, so finished by the unfinished run: is it the same?
            self._checkpoint.check_keys(batch.seq, batch.keys)
        self.rows_per_batch.append(len(batch))
        self._rows_read += len(batch)

    def check_nothing_finished_beyond_input(self) -> None:
        # The whole input is read: the unfinished run cannot have finished more (a --limit
        # stops early on purpose, and the output then covers only what it read).
        if self._checkpoint is not None and self.limit is None:
            self._checkpoint.check_length(len(self.rows_per_batch))


def _expected_rows(source: Source, limit: int | None) -> int | None:
    # Only what is cheap (Parquet metadata): counting a CSV would read it twice.
    rows = source.count_rows()
    if rows is None:
        return None
    return rows if limit is None else min(rows, limit)


def _only(batches: Iterator[Batch], keys: Collection[str]) -> Iterator[Batch]:
    """``batches`` with only the items whose key is in ``keys`` (a batch may come out empty:
    nothing to send)."""
    for batch in batches:
        wanted = [index for index, key in enumerate(batch.keys) if key in keys]
        yield batch if len(wanted) == len(batch) else batch.take(wanted)


def _take(iterator: Iterator[Batch], count: int) -> list[Batch]:
    return list(islice(iterator, count))
