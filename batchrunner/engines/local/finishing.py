"""The finishing stage: finished batches into the run's journal, counted as they go.

Batches that finished together share a journal message (one table, one write); each batch's
digest (what was sent for it) is logged first, for a resume to check. Then its rows are
counted by status and error kind, on the run's timeline (``statistics()``), and the first
failures are logged one by one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from itertools import chain

import pyarrow as pa

from batchrunner.checkpoint import DigestLog
from batchrunner.items import Batch, Outcome
from batchrunner.report import FinishStatistics, FinishTally
from batchrunner.sink import Journal, outcome_table
from batchrunner.wiring import NOT_SENT

log = logging.getLogger("batchrunner")

# How many failed batches are logged one by one before the log only counts them.
LOGGED_FAILURES = 20
# Batches that finished together share a journal message of up to about this many rows.
JOURNAL_MESSAGE_ROWS = 8192


class Finishing:
    """Journals a run's finished batches and counts their rows.

    ``finished`` holds one flag per batch seq, set here once the batch is journaled;
    ``digest(seq)`` is what was sent for batch seq; ``elapsed()`` is the time since the run
    started (the timeline's); ``resumed`` is what an interrupted run had finished.
    """

    def __init__(
        self,
        journal: Journal,
        digest_log: DigestLog,
        finished: bytearray,
        digest: Callable[[int], bytes],
        elapsed: Callable[[], float],
        *,
        result_fields: Sequence[str] | None,
        resumed: FinishStatistics,
    ) -> None:
        self.journal = journal
        self._digest_log = digest_log
        self._finished = finished
        self._digest = digest
        self._elapsed = elapsed
        self._result_fields = result_fields
        self._counts = FinishTally.starting_from(resumed)
        self._field_types: dict[str, pa.DataType] = {}  # result fields' types, as seen so far
        self._failures_logged = 0

    def statistics(self) -> FinishStatistics:
        """The rows finished so far (a frozen copy)."""
        return self._counts.statistics()

    def close(self) -> None:
        """Close the digest log (the journal is closed by whoever opened it)."""
        self._digest_log.close()

    async def write(self, outcomes: asyncio.Queue[list[Outcome] | None]) -> None:
        """The stage: journal what comes on ``outcomes`` (each batch's, in row order) until
        None."""
        # What finished together goes in one journal message: one table to build and one
        # write for many small batches (an image each) rather than one per batch.
        ended = False
        while not ended and (finished := await outcomes.get()) is not None:
            together = [finished]
            rows = sum(len(outcome.batch) for outcome in finished)
            while rows < JOURNAL_MESSAGE_ROWS and not outcomes.empty():
                more = outcomes.get_nowait()
                if more is None:
                    ended = True
                    break
                together.append(more)
                rows += sum(len(outcome.batch) for outcome in more)
            self.append(together)

    def append(self, together: list[list[Outcome]]) -> None:
        """Journal the outcomes of one or more batches (``together``: each batch's, in row
        order), then count them."""
        kept = _kept_names(together[0][0].batch)
        # What was sent for each batch, before the batch is journaled: a resume checks it.
        self._digest_log.append(
            (seq, self._digest(seq)) for seq in (finished[0].batch.seq for finished in together)
        )
        self.journal.append(
            outcome_table(
                list(chain.from_iterable(together)),
                kept,
                self._field_types,
                self._result_fields,
            )
        )
        for finished in together:
            seq = finished[0].batch.seq
            if seq >= len(self._finished):
                self._finished.extend(bytes(seq + 1 - len(self._finished)))
            self._finished[seq] = 1
            for outcome in finished:
                self._count(outcome)

    def _count(self, outcome: Outcome) -> None:
        kind = self._counts.count_outcome(outcome, self._elapsed())
        if kind is None or kind == NOT_SENT:
            return
        self._failures_logged += 1
        if self._failures_logged <= LOGGED_FAILURES:
            _log_failure(outcome)
        elif self._failures_logged == LOGGED_FAILURES + 1:
            log.warning("more batches failed; the summary counts them all")


def _kept_names(batch: Batch) -> list[str]:
    return batch.kept.schema.names if batch.kept is not None else []


def _log_failure(outcome: Outcome) -> None:
    batch = outcome.batch
    if outcome.attempts == 0:  # refused before sending: a file too large or unreadable
        log.warning("key %s was not sent: %s", batch.keys[0], outcome.error)
        return
    log.warning(
        "batch %d (%d rows from key %s) failed after %d attempts: %s",
        batch.seq, len(batch), batch.keys[0], outcome.attempts, outcome.error,
    )  # fmt: skip
