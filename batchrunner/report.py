"""Run statistics: each stage's, frozen, and the snapshot that combines them.

Each stage of a run owns its counters and hands out a frozen copy of them, its
``statistics()``: the reading stage a ``ReadStatistics`` (batches and rows read, rows the
incremental filter left out), the dispatcher a ``DispatchStatistics`` (requests, retries,
splits, tokens, latencies), the finishing stage a ``FinishStatistics`` (rows by status, error
kinds, the timeline). A ``RunStatistics`` holds the three; its ``snapshot()`` is the one
object the progress display, the summary, the metrics and the tests read. Statistics add up
with ``+`` (a Ray run sums its blocks').

Latencies go into a log-bucketed histogram (about 1% resolution), so a run of a hundred
million requests keeps a few kilobytes of them, not a list.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest

from batchrunner.items import Outcome

_GROWTH = 1.02  # each bucket is 2% wider than the last: percentiles within 1%
_LOG_GROWTH = math.log(_GROWTH)
_FLOOR_MS = 0.01
#: The upper bounds (ms) of the latency histogram's buckets as reported (metrics, summary).
LATENCY_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
#: The run's timeline keeps at most this many buckets: when a run outlasts them, neighbours
#: are merged and each bucket covers twice the time (a night's run stays a few hundred bytes).
TIMELINE_BUCKETS = 120
TIMELINE_FIRST_BUCKET_S = 1.0


class LatencyHistogram:
    """Counts latencies in milliseconds (a stage's own, mutable); ``statistics()`` hands out
    a frozen copy, which answers percentiles."""

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.min_ms = math.inf

    def add(self, latency_ms: float) -> None:
        value = max(latency_ms, _FLOOR_MS)
        self._buckets[int(math.log(value / _FLOOR_MS) / _LOG_GROWTH)] += 1
        self.count += 1
        self.total_ms += latency_ms
        self.max_ms = max(self.max_ms, latency_ms)
        self.min_ms = min(self.min_ms, latency_ms)

    def statistics(self) -> Latencies:
        return Latencies(
            tuple(sorted(self._buckets.items())),
            self.count,
            self.total_ms,
            self.max_ms,
            self.min_ms,
        )

    def percentile(self, fraction: float) -> float | None:
        """The latency below which ``fraction`` (0..1) of the samples fall, or None if empty."""
        return self.statistics().percentile(fraction)

    @property
    def mean_ms(self) -> float | None:
        return self.total_ms / self.count if self.count else None


@dataclass(frozen=True, slots=True)
class Latencies:
    """A latency histogram, frozen: the buckets' (index, samples) in order, and the totals.
    Those of several stages (a Ray run's blocks) add up with ``+``."""

    buckets: tuple[tuple[int, int], ...] = ()
    count: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0
    min_ms: float = math.inf

    def percentile(self, fraction: float) -> float | None:
        """The latency below which ``fraction`` (0..1) of the samples fall, or None if empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for bucket, samples in self.buckets:
            seen += samples
            if seen >= rank:
                # the bucket's geometric middle, within the range of values seen
                middle: float = _FLOOR_MS * _GROWTH ** (bucket + 0.5)
                return min(max(middle, self.min_ms), self.max_ms)
        return self.max_ms

    def cumulative_counts(self, bounds_ms: tuple[float, ...]) -> tuple[int, ...]:
        """How many samples are at most each bound (within the buckets' 2%), as Prometheus'
        ``le`` buckets count them."""
        counts = []
        for bound in bounds_ms:
            limit = math.log(bound / _FLOOR_MS) / _LOG_GROWTH
            counts.append(sum(n for bucket, n in self.buckets if bucket + 1 <= limit))
        return tuple(counts)

    @property
    def mean_ms(self) -> float | None:
        return self.total_ms / self.count if self.count else None

    def __add__(self, other: Latencies) -> Latencies:
        buckets = Counter(dict(self.buckets))
        buckets.update(dict(other.buckets))
        return Latencies(
            tuple(sorted(buckets.items())),
            self.count + other.count,
            self.total_ms + other.total_ms,
            max(self.max_ms, other.max_ms),
            min(self.min_ms, other.min_ms),
        )


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latency of the answers so far, in milliseconds; None before the first answer."""

    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


@dataclass(frozen=True, slots=True)
class ErrorKindSummary:
    """Error rows of one kind: how many, and the first one's key and message."""

    kind: str
    rows: int
    example_key: str | None
    example_message: str | None


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """What the run has done so far. The progress display, the log lines, the final summary
    and the tests all read this one object, so they always agree."""

    batches_read: int
    rows_read: int
    rows_ok: int
    rows_error: int
    requests: int
    retries: int
    in_flight: int
    elapsed_s: float
    splits: int = 0  # batches halved to isolate a row the service refused
    throttled: int = 0  # answers 429
    tokens_in: int = 0  # language models: prompt tokens the answers counted
    tokens_out: int = 0  # and completion tokens
    #: Items this run will finish, when known: from metadata (Parquet) before reading, or
    #: once the whole input has been read; None until then (CSV and JSON lines streams).
    total: int | None = None
    #: Whether ``total`` is an estimate (CSV, JSON lines: from the bytes read so far).
    total_estimated: bool = False
    #: Items not sent because an earlier run finished them (resume, incremental runs).
    rows_skipped: int = 0
    #: Of rows_ok and rows_error: those an interrupted run finished (resume), not sent now.
    rows_resumed: int = 0
    latency: LatencySummary = LatencySummary()
    errors: tuple[ErrorKindSummary, ...] = ()  # most rows first
    #: Answers with a latency at most each of ``LATENCY_BOUNDS_MS``; and their sum.
    latency_buckets: tuple[int, ...] = ()
    latency_count: int = 0
    latency_sum_ms: float = 0.0
    retries_by_reason: tuple[tuple[str, int], ...] = ()  # the error that caused each retry
    concurrency_limit: int | None = None  # the limiter's bound now (adaptive: it moves)
    #: Rows finished in each ``timeline_bucket_s`` since the run started.
    timeline: tuple[int, ...] = ()
    timeline_bucket_s: float = TIMELINE_FIRST_BUCKET_S

    @property
    def rows_done(self) -> int:
        return self.rows_ok + self.rows_error

    @property
    def rows_per_second(self) -> float:
        """Rows this run finished per second (rows a resumed run kept are not counted)."""
        sent = self.rows_done - self.rows_resumed
        return sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def fraction_done(self) -> float | None:
        """Done over total (0..1), or None while the total is unknown or zero."""
        if not self.total:
            return None
        return min(self.rows_done / self.total, 1.0)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the average rate so far, or None while that cannot be told."""
        if self.total is None:
            return None
        remaining = self.total - self.rows_done
        if remaining <= 0:
            return 0.0
        rate = self.rows_per_second
        return remaining / rate if rate > 0 else None


@dataclass(frozen=True, slots=True)
class ReadStatistics:
    """The reading stage's figures: the input read and what was left out of it."""

    batches_read: int = 0
    rows_read: int = 0
    #: Items not sent because an earlier run finished them (input.incremental's filter).
    rows_skipped: int = 0

    def __add__(self, other: ReadStatistics) -> ReadStatistics:
        return ReadStatistics(**_sums(self, other, _READ_COUNTS))


@dataclass(frozen=True, slots=True)
class DispatchStatistics:
    """The dispatcher's figures: requests sent, and what their answers were."""

    requests: int = 0
    retries: int = 0
    splits: int = 0  # batches halved to isolate a row the service refused
    throttled: int = 0  # answers 429: the service asked us to slow down
    tokens_in: int = 0  # language models: prompt tokens, as the answers' usage says
    tokens_out: int = 0  # completion tokens
    latency: Latencies = Latencies()
    retries_by_reason: tuple[tuple[str, int], ...] = ()  # the error that caused each retry

    def __add__(self, other: DispatchStatistics) -> DispatchStatistics:
        reasons = Counter(dict(self.retries_by_reason))
        reasons.update(dict(other.retries_by_reason))
        return DispatchStatistics(
            **_sums(self, other, _DISPATCH_COUNTS),
            latency=self.latency + other.latency,
            retries_by_reason=tuple(sorted(reasons.items())),
        )


_READ_COUNTS = ("batches_read", "rows_read", "rows_skipped")
_DISPATCH_COUNTS = ("requests", "retries", "splits", "throttled", "tokens_in", "tokens_out")


@dataclass(slots=True)
class DispatchTally:
    """The dispatcher's own counters; ``statistics()`` hands out a frozen copy."""

    requests: int = 0
    retries: int = 0
    splits: int = 0
    throttled: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    retry_reasons: Counter[str] = field(default_factory=Counter)

    def statistics(self) -> DispatchStatistics:
        return DispatchStatistics(
            **{name: getattr(self, name) for name in _DISPATCH_COUNTS},
            latency=self.latency.statistics(),
            retries_by_reason=tuple(sorted(self.retry_reasons.items())),
        )


@dataclass(frozen=True, slots=True)
class FinishStatistics:
    """The finishing stage's figures: rows finished (journaled), by status and error kind,
    and over time."""

    rows_ok: int = 0
    rows_error: int = 0
    rows_resumed: int = 0  # of rows_ok and rows_error: kept from an interrupted run
    errors: tuple[ErrorKindSummary, ...] = ()  # in the order each kind was first met
    #: Rows finished in each ``timeline_bucket_s`` since the run started.
    timeline: tuple[int, ...] = ()
    timeline_bucket_s: float = TIMELINE_FIRST_BUCKET_S

    def __add__(self, other: FinishStatistics) -> FinishStatistics:
        """Both counted together; each error kind's example is the first one met."""
        tally = FinishTally.starting_from(self)
        for error in other.errors:
            tally.record_error_rows(
                error.kind, error.rows, error.example_key, error.example_message
            )
        bucket_s = max(self.timeline_bucket_s, other.timeline_bucket_s)
        mine = _rebucketed(self.timeline, self.timeline_bucket_s, bucket_s)
        theirs = _rebucketed(other.timeline, other.timeline_bucket_s, bucket_s)
        tally.timeline = [a + b for a, b in zip_longest(mine, theirs, fillvalue=0)]
        tally.timeline_bucket_s = bucket_s
        tally.compact()
        tally.rows_ok += other.rows_ok
        tally.rows_error += other.rows_error
        tally.rows_resumed += other.rows_resumed
        return tally.statistics()


@dataclass(slots=True)
class _Tally:
    """Error rows of one kind: how many, and the first example."""

    rows: int = 0
    example_key: str | None = None
    example_message: str | None = None


@dataclass(slots=True)
class FinishTally:
    """The finishing stage's own counters (rows by status, error kinds, the timeline);
    ``statistics()`` hands out a frozen copy. Both engines count what they finish with it,
    and a resume counts what the interrupted run had finished."""

    rows_ok: int = 0
    rows_error: int = 0
    rows_resumed: int = 0
    errors: dict[str, _Tally] = field(default_factory=dict)
    timeline: list[int] = field(default_factory=list)
    timeline_bucket_s: float = TIMELINE_FIRST_BUCKET_S

    @classmethod
    def starting_from(cls, start: FinishStatistics) -> FinishTally:
        """Counters that go on from ``start`` (e.g. the rows a resumed run kept)."""
        return cls(
            start.rows_ok,
            start.rows_error,
            start.rows_resumed,
            {e.kind: _Tally(e.rows, e.example_key, e.example_message) for e in start.errors},
            list(start.timeline),
            start.timeline_bucket_s,
        )

    def count_outcome(self, outcome: Outcome, elapsed_s: float | None = None) -> str | None:
        """Count a finished outcome's rows: ok, or error rows of its kind (which it returns;
        None when ok). ``elapsed_s`` (since the run started) puts the rows on the timeline."""
        rows = len(outcome.batch)
        if elapsed_s is not None:
            self.record_finished(rows, elapsed_s)
        if outcome.ok:
            self.rows_ok += rows
            return None
        self.rows_error += rows
        kind = outcome.error_kind or "error"
        self.record_error_rows(kind, rows, outcome.batch.keys[0], outcome.error or "")
        return kind

    def count_resumed(self, ok: int, error: int) -> None:
        """Count rows an interrupted run finished (their error kinds: ``record_error_rows``)."""
        self.rows_ok += ok
        self.rows_error += error
        self.rows_resumed += ok + error

    def record_finished(self, rows: int, elapsed_s: float) -> None:
        """Add ``rows`` finished ``elapsed_s`` after the start to the timeline."""
        index = int(max(elapsed_s, 0.0) / self.timeline_bucket_s)
        while index >= TIMELINE_BUCKETS:
            self._halve()
            index = int(max(elapsed_s, 0.0) / self.timeline_bucket_s)
        if index >= len(self.timeline):
            self.timeline.extend([0] * (index + 1 - len(self.timeline)))
        self.timeline[index] += rows

    def compact(self) -> None:
        """Merge neighbours until the timeline fits in ``TIMELINE_BUCKETS``."""
        while len(self.timeline) > TIMELINE_BUCKETS:
            self._halve()

    def _halve(self) -> None:
        self.timeline = _rebucketed(
            self.timeline, self.timeline_bucket_s, 2 * self.timeline_bucket_s
        )
        self.timeline_bucket_s *= 2

    def record_error_rows(self, kind: str, rows: int, key: str | None, message: str | None) -> None:
        tally = self.errors.setdefault(kind, _Tally())
        tally.rows += rows
        if tally.example_key is None:
            tally.example_key, tally.example_message = key, message

    def statistics(self) -> FinishStatistics:
        return FinishStatistics(
            self.rows_ok,
            self.rows_error,
            self.rows_resumed,
            tuple(
                ErrorKindSummary(kind, t.rows, t.example_key, t.example_message)
                for kind, t in self.errors.items()
            ),
            tuple(self.timeline),
            self.timeline_bucket_s,
        )


@dataclass(frozen=True, slots=True)
class RunStatistics:
    """The statistics of a run's stages, each as its stage gave it. The snapshot combines
    them; those of several processes (a Ray run's blocks) add up with ``+``."""

    reading: ReadStatistics = ReadStatistics()
    dispatch: DispatchStatistics = DispatchStatistics()
    finishing: FinishStatistics = FinishStatistics()

    def __add__(self, other: RunStatistics) -> RunStatistics:
        return RunStatistics(
            self.reading + other.reading,
            self.dispatch + other.dispatch,
            self.finishing + other.finishing,
        )

    def snapshot(
        self,
        in_flight: int,
        elapsed_s: float,
        total: int | None = None,
        concurrency_limit: int | None = None,
        *,
        total_estimated: bool = False,
    ) -> StatsSnapshot:
        """The stages' figures as one snapshot, with what only the run knows: requests in
        flight now, time since the start, the total when known, the limiter's bound."""
        reading, dispatch, finishing = self.reading, self.dispatch, self.finishing
        latency = dispatch.latency
        return StatsSnapshot(
            batches_read=reading.batches_read,
            rows_read=reading.rows_read,
            rows_ok=finishing.rows_ok,
            rows_error=finishing.rows_error,
            requests=dispatch.requests,
            retries=dispatch.retries,
            splits=dispatch.splits,
            throttled=dispatch.throttled,
            tokens_in=dispatch.tokens_in,
            tokens_out=dispatch.tokens_out,
            in_flight=in_flight,
            elapsed_s=elapsed_s,
            total=total,
            total_estimated=total_estimated,
            rows_skipped=reading.rows_skipped,
            rows_resumed=finishing.rows_resumed,
            latency=LatencySummary(
                mean=_round(latency.mean_ms),
                p50=_round(latency.percentile(0.50)),
                p95=_round(latency.percentile(0.95)),
                p99=_round(latency.percentile(0.99)),
                max=_round(latency.max_ms if latency.count else None),
            ),
            # most rows first; kinds of as many rows in the order first met
            errors=tuple(sorted(finishing.errors, key=lambda error: -error.rows)),
            latency_buckets=latency.cumulative_counts(LATENCY_BOUNDS_MS),
            latency_count=latency.count,
            latency_sum_ms=latency.total_ms,
            retries_by_reason=dispatch.retries_by_reason,
            concurrency_limit=concurrency_limit,
            timeline=finishing.timeline,
            timeline_bucket_s=finishing.timeline_bucket_s,
        )


def _sums(first: object, second: object, names: Iterable[str]) -> dict[str, int]:
    return {name: getattr(first, name) + getattr(second, name) for name in names}


def _rebucketed(timeline: Sequence[int], bucket_s: float, wider_s: float) -> list[int]:
    """``timeline`` (rows per ``bucket_s``) as rows per ``wider_s``, a power of two wider."""
    factor = max(1, round(wider_s / bucket_s))
    return [sum(timeline[i : i + factor]) for i in range(0, len(timeline), factor)]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
