"""Run statistics and the summary: counts, throughput, latency percentiles, errors by kind.

Latencies go into a log-bucketed histogram (about 1% resolution), so a run of a hundred
million requests keeps a few kilobytes of them, not a list.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_GROWTH = 1.02  # each bucket is 2% wider than the last: percentiles within 1%
_LOG_GROWTH = math.log(_GROWTH)
_FLOOR_MS = 0.01


class LatencyHistogram:
    """Counts latencies in milliseconds; answers percentiles."""

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

    def percentile(self, fraction: float) -> float | None:
        """The latency below which ``fraction`` (0..1) of the samples fall, or None if empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for bucket in sorted(self._buckets):
            seen += self._buckets[bucket]
            if seen >= rank:
                # the bucket's geometric middle, within the range of values seen
                middle: float = _FLOOR_MS * _GROWTH ** (bucket + 0.5)
                return min(max(middle, self.min_ms), self.max_ms)
        return self.max_ms

    @property
    def mean_ms(self) -> float | None:
        return self.total_ms / self.count if self.count else None


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """What the run has done so far: the progress display and the summary read this."""

    batches_read: int
    rows_read: int
    rows_ok: int
    rows_error: int
    requests: int
    retries: int
    in_flight: int
    elapsed_s: float

    @property
    def rows_done(self) -> int:
        return self.rows_ok + self.rows_error

    @property
    def rows_per_second(self) -> float:
        return self.rows_done / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(slots=True)
class ErrorTally:
    """Error rows of one kind: how many, and the first example."""

    rows: int = 0
    example_key: str | None = None
    example_message: str | None = None


@dataclass
class RunStats:
    """Mutable counters of one run; ``snapshot()`` hands out a frozen copy."""

    batches_read: int = 0
    rows_read: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    requests: int = 0
    retries: int = 0
    splits: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    errors: dict[str, ErrorTally] = field(default_factory=dict)

    def record_error_rows(self, kind: str, rows: int, key: str, message: str) -> None:
        tally = self.errors.setdefault(kind, ErrorTally())
        tally.rows += rows
        if tally.example_key is None:
            tally.example_key, tally.example_message = key, message

    def snapshot(self, in_flight: int, elapsed_s: float) -> StatsSnapshot:
        return StatsSnapshot(
            batches_read=self.batches_read,
            rows_read=self.rows_read,
            rows_ok=self.rows_ok,
            rows_error=self.rows_error,
            requests=self.requests,
            retries=self.retries,
            in_flight=in_flight,
            elapsed_s=elapsed_s,
        )


def build_summary(
    stats: RunStats,
    *,
    job_name: str,
    fingerprint: str,
    run_id: str,
    input_path: str,
    output_path: str,
    url: str,
    started: str,
    finished: str,
    elapsed_s: float,
    outcome: str,
    max_error_rate: float,
) -> dict[str, Any]:
    """The run summary as plain JSON-ready data (the same in the file metadata and beside it)."""
    rows = stats.rows_ok + stats.rows_error
    latency = stats.latency
    percentiles = {
        name: _round(latency.percentile(fraction))
        for name, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
    }
    return {
        "job": job_name,
        "run_id": run_id,
        "outcome": outcome,
        "fingerprint": fingerprint,
        "input": input_path,
        "output": output_path,
        "url": url,
        "started": started,
        "finished": finished,
        "elapsed_s": round(elapsed_s, 3),
        "rows": {"total": rows, "ok": stats.rows_ok, "error": stats.rows_error},
        "error_rate": round(stats.rows_error / rows, 6) if rows else 0.0,
        "max_error_rate": max_error_rate,
        "requests": stats.requests,
        "retries": stats.retries,
        "splits": stats.splits,
        "rows_per_second": round(rows / elapsed_s, 1) if elapsed_s > 0 else None,
        "latency_ms": {
            "mean": _round(latency.mean_ms),
            **percentiles,
            "max": _round(latency.max_ms if latency.count else None),
        },
        "errors": {
            kind: {"rows": t.rows, "example_key": t.example_key, "example": t.example_message}
            for kind, t in sorted(stats.errors.items(), key=lambda item: -item[1].rows)
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
