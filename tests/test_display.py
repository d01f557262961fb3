from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from batchrunner.display import (
    ProgressView,
    format_duration,
    plain_table,
    progress_fields,
    progress_line,
    shorten,
    summary_rows,
)
from batchrunner.report import StatsSnapshot
from batchrunner.summary import RunSummary


def figures(**changes: object) -> StatsSnapshot:
    values: dict[str, object] = {
        "batches_read": 30,
        "rows_read": 3000,
        "rows_ok": 1190,
        "rows_error": 10,
        "requests": 14,
        "retries": 2,
        "in_flight": 8,
        "elapsed_s": 2.0,
        "total": None,
    }
    values.update(changes)
    return StatsSnapshot(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0:00"), (59.6, "1:00"), (61, "1:01"), (3725, "1:02:05")]
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_progress_line_with_a_total() -> None:
    line = progress_line(figures(total=12_000))
    assert line == (
        "1,200 of 12,000 rows (10%), 600 rows/s, 8 in flight, 2 retries, 10 errors, ETA 0:18"
    )


def test_progress_line_without_a_total_has_no_eta() -> None:
    assert progress_line(figures()) == "1,200 rows, 600 rows/s, 8 in flight, 2 retries, 10 errors"


def test_progress_line_says_100_percent_only_when_done() -> None:
    assert "(99%)" in progress_line(figures(total=1201))


def test_progress_fields_are_the_same_figures() -> None:
    assert progress_fields(figures(total=12_000)) == {
        "rows_done": 1200,
        "rows_total": 12_000,
        "rows_total_estimated": False,
        "rows_ok": 1190,
        "rows_error": 10,
        "rows_per_second": 600.0,
        "in_flight": 8,
        "requests": 14,
        "retries": 2,
        "elapsed_s": 2.0,
        "eta_s": 18.0,
    }


def render(view: ProgressView) -> str:
    console = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    console.print(view)
    return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]


def test_progress_view_spins_with_counts_while_the_total_is_unknown() -> None:
    view = ProgressView("nightly")
    assert "nightly: starting" in render(view)
    view.update(figures())
    text = render(view)
    assert "nightly: 1,200 rows, 600 rows/s, 8 in flight" in text
    assert "━" not in text  # no bar without a total


def test_progress_view_draws_a_bar_when_the_total_is_known() -> None:
    view = ProgressView("nightly")
    view.update(figures(total=2400))
    text = render(view)
    assert "━" in text
    assert "nightly: 1,200 of 2,400 rows (50%)" in text


def test_summary_rows() -> None:
    summary = {
        "job": "j",
        "run_id": "r1",
        "started": "2024-05-01T02:00:00+02:00",
        "elapsed_s": 75.0,
        "rows": {"total": 10, "ok": 8, "error": 2, "skipped": 5},
        "requests": 4,
        "retries": 1,
        "rows_per_second": 0.13,
        "latency_ms": {"p50": 10.0, "p95": 20.04, "p99": 1234.5},
        "errors": {
            "http_503": {"rows": 1, "example_key": "k7", "example": "HTTP 503\n  busy"},
            "timeout": {"rows": 1, "example_key": "k9", "example": "timed out"},
        },
        "output": "out/j.parquet",
    }
    assert plain_table(
        "j: done", summary_rows(RunSummary.from_json(summary), Path("s.json"))
    ) == "\n".join(
        [
            "j: done",
            "  run         r1, started 2024-05-01T02:00:00+02:00",
            "  rows        8 ok, 2 errors, 5 skipped",
            "  throughput  0 rows/s (10 rows in 1:15); 4 requests, 1 retries",
            "  latency     p50 10.0 ms, p95 20.0 ms, p99 1,234.5 ms",
            "  errors      http_503: 1 rows, e.g. key k7: HTTP 503 busy",
            "              timeout: 1 rows, e.g. key k9: timed out",
            "  output      out/j.parquet",
            "  summary     s.json",
        ]
    )


def test_summary_rows_of_a_sparse_summary() -> None:
    # a summary from another version may lack figures: shown as unknown, never a crash
    rows = dict(summary_rows(RunSummary.from_json({"job": "old"})))
    assert rows["rows"] == "0 ok, 0 errors, 0 skipped"
    assert rows["latency"] == "no answers"
    assert rows["output"] == "?"


def test_summary_rows_of_a_night_with_nothing_new() -> None:
    nothing_new = {"rows": {"total": 0, "ok": 0, "error": 0, "skipped": 1500}}
    rows = dict(summary_rows(RunSummary.from_json(nothing_new)))
    assert rows["rows"] == "nothing new: 1,500 items already done"
    # an empty input is not "nothing new": nothing was done before either
    empty_input = {"rows": {"total": 0, "ok": 0, "error": 0, "skipped": 0}}
    empty = dict(summary_rows(RunSummary.from_json(empty_input)))
    assert empty["rows"] == "0 ok, 0 errors, 0 skipped"


def test_shorten() -> None:
    assert shorten("a\n b", 10) == "a b"
    assert shorten("x" * 20, 10) == "x" * 9 + "…"
