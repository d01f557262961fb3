from __future__ import annotations

import random

import pytest

from batchrunner.report import LatencyHistogram, RunStats, build_summary


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


def test_summary_counts_and_errors() -> None:
    stats = RunStats(rows_ok=8, rows_error=2, requests=4, retries=1)
    stats.record_error_rows("http_503", 2, "k7", "HTTP 503")
    stats.latency.add(10.0)
    summary = build_summary(
        stats,
        job_name="j",
        fingerprint="f",
        run_id="r",
        input_path="in.csv",
        output_path="out.parquet",
        url="embedded:iris",
        started="s",
        finished="e",
        elapsed_s=2.0,
        outcome="done",
        max_error_rate=0.5,
    )
    assert summary["rows"] == {"total": 10, "ok": 8, "error": 2}
    assert summary["error_rate"] == 0.2
    assert summary["rows_per_second"] == 5.0
    assert summary["errors"] == {
        "http_503": {"rows": 2, "example_key": "k7", "example": "HTTP 503"}
    }
    assert summary["latency_ms"]["p50"] == 10.0
