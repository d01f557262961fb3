from __future__ import annotations

import random

import pytest

from batchrunner.report import (
    FinishStatistics,
    FinishTally,
    LatencyHistogram,
    RunStatistics,
    StatsSnapshot,
)


def test_empty_histogram_has_no_percentiles() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile(0.5) is None
    assert histogram.mean_ms is None


@pytest.mark.parametrize("fraction", [0.5, 0.95, 0.99])
def test_percentiles_within_two_percent(fraction: float) -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(3, 1) for _ in range(20_000)]
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(value)
    exact = sorted(values)[int(fraction * len(values)) - 1]
    estimate = histogram.percentile(fraction)
    assert estimate is not None
    assert abs(estimate - exact) / exact < 0.02


def test_percentile_stays_within_the_values_seen() -> None:
    histogram = LatencyHistogram()
    histogram.add(5.0)
    assert histogram.percentile(0.99) == 5.0


def test_snapshot_orders_error_kinds_by_rows_and_keeps_first_example() -> None:
    finishing = FinishTally()
    finishing.record_error_rows("timeout", 1, "a", "timed out")
    finishing.record_error_rows("http_503", 2, "b", "HTTP 503")
    finishing.record_error_rows("http_503", 5, "c", "HTTP 503 again")
    stats = RunStatistics(finishing=finishing.statistics())
    errors = stats.snapshot(in_flight=0, elapsed_s=1.0).errors
    assert [(e.kind, e.rows, e.example_key) for e in errors] == [
        ("http_503", 7, "b"),
        ("timeout", 1, "a"),
    ]


def snapshot(done: int, elapsed_s: float, total: int | None) -> StatsSnapshot:
    return StatsSnapshot(
        batches_read=0,
        rows_read=done,
        rows_ok=done,
        rows_error=0,
        requests=0,
        retries=0,
        in_flight=0,
        elapsed_s=elapsed_s,
        total=total,
    )


def test_eta_at_the_average_rate() -> None:
    halfway = snapshot(done=50, elapsed_s=10.0, total=100)
    assert halfway.rows_per_second == 5.0
    assert halfway.fraction_done == 0.5
    assert halfway.eta_s == 10.0


@pytest.mark.parametrize(
    ("done", "elapsed_s", "total", "eta", "fraction"),
    [
        (0, 0.0, 100, None, 0.0),  # no rate yet
        (10, 1.0, None, None, None),  # total unknown
        (100, 1.0, 100, 0.0, 1.0),  # finished
        (0, 0.0, 0, 0.0, None),  # empty input: nothing left, no fraction of nothing
    ],
)
def test_eta_and_fraction_when_they_cannot_be_told(
    done: int, elapsed_s: float, total: int | None, eta: float | None, fraction: float | None
) -> None:
    figures = snapshot(done, elapsed_s, total)
    assert figures.eta_s == eta
    assert figures.fraction_done == fraction


def test_the_timeline_stays_compact() -> None:
    from batchrunner.report import TIMELINE_BUCKETS

    stats = FinishTally()
    stats.record_finished(5, 0.2)
    stats.record_finished(3, 2.5)
    assert stats.timeline == [5, 0, 3]
    assert stats.timeline_bucket_s == 1.0
    # a run that outlasts the buckets: neighbours merge, each bucket covers twice the time
    stats.record_finished(7, TIMELINE_BUCKETS + 0.5)
    assert stats.timeline_bucket_s == 2.0
    assert len(stats.timeline) <= TIMELINE_BUCKETS
    assert stats.timeline[:2] == [5, 3]
    assert sum(stats.timeline) == 15
    stats.record_finished(1, 10_000.0)
    assert len(stats.timeline) <= TIMELINE_BUCKETS and sum(stats.timeline) == 16
    snapshot = RunStatistics(finishing=stats.statistics()).snapshot(0, 10_000.0)
    assert sum(snapshot.timeline) == 16 and snapshot.timeline_bucket_s == stats.timeline_bucket_s


def test_rows_resumed_from_an_earlier_run_are_not_counted_in_the_rate() -> None:
    stats = RunStatistics(finishing=FinishStatistics(rows_ok=1_000, rows_resumed=900))
    assert stats.snapshot(0, 2.0).rows_per_second == 50.0  # 100 rows sent in 2 s
