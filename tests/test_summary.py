"""The run summary, typed: built from the final snapshot, written as JSON whose keys and
values users and schedulers read, and read back (also when an older version wrote it)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from batchrunner.engines.local import Runner
from batchrunner.inspection import inspect_output
from batchrunner.job import load_job
from batchrunner.report import DispatchStatistics, FinishTally, LatencyHistogram, RunStatistics
from batchrunner.summary import BlockFigures, RetryFigures, RunSummary, build_summary
from tests.conftest import iris_csv, write_job

SUMMARY_KEYS = [
    "job", "run_id", "outcome", "fingerprint", "input", "output", "url", "started",
    "finished", "elapsed_s", "rows", "error_rate", "max_error_rate", "requests", "retries",
    "splits", "throttled", "rows_per_second", "latency_ms", "errors", "retries_by_reason",
    "timeline",
]  # fmt: skip


def summary_of(
    stats: RunStatistics, elapsed_s: float = 4.0, outcome: str = "too_many_errors"
) -> RunSummary:
    return build_summary(
        stats.snapshot(0, elapsed_s),
        job_name="j",
        fingerprint="f",
        run_id="r",
        input_path="in.csv",
        output_path="out.parquet",
        url="embedded:iris",
        started="s",
        finished="e",
        outcome=outcome,
        max_error_rate=0.1,
    )


def figures() -> RunStatistics:
    finishing = FinishTally(rows_ok=6, rows_error=3)
    finishing.record_error_rows("timeout", 1, "k1", "timed out")
    finishing.record_error_rows("http_503", 2, "k2", "HTTP 503")
    finishing.record_finished(9, 1.5)
    latency = LatencyHistogram()
    latency.add(12.0)
    dispatch = DispatchStatistics(
        requests=5,
        retries=2,
        splits=1,
        throttled=1,
        tokens_in=30,
        tokens_out=10,
        latency=latency.statistics(),
        retries_by_reason=(("http_503", 1), ("timeout", 1)),
    )
    return RunStatistics(dispatch=dispatch, finishing=finishing.statistics())


def test_summary_counts_and_errors() -> None:
    finishing = FinishTally(rows_ok=8, rows_error=2)
    finishing.record_error_rows("http_503", 2, "k7", "HTTP 503")
    latency = LatencyHistogram()
    latency.add(10.0)
    dispatch = DispatchStatistics(requests=4, retries=1, latency=latency.statistics())
    stats = RunStatistics(dispatch=dispatch, finishing=finishing.statistics())
    summary = summary_of(stats, elapsed_s=2.0, outcome="done").to_json()
    assert summary["rows"] == {"total": 10, "ok": 8, "error": 2, "skipped": 0, "resumed": 0}
    assert summary["error_rate"] == 0.2
    assert summary["rows_per_second"] == 5.0
    assert summary["errors"] == {
        "http_503": {"rows": 2, "example_key": "k7", "example": "HTTP 503"}
    }
    assert summary["latency_ms"]["p50"] == 10.0
    assert "tokens" not in summary  # none spent


def test_the_json_has_the_documented_keys_and_values() -> None:
    document = summary_of(figures()).to_json()
    assert list(document) == [*SUMMARY_KEYS, "tokens"]
    assert document == {
        "job": "j",
        "run_id": "r",
        "outcome": "too_many_errors",
        "fingerprint": "f",
        "input": "in.csv",
        "output": "out.parquet",
        "url": "embedded:iris",
        "started": "s",
        "finished": "e",
        "elapsed_s": 4.0,
        "rows": {"total": 9, "ok": 6, "error": 3, "skipped": 0, "resumed": 0},
        "error_rate": 0.333333,
        "max_error_rate": 0.1,
        "requests": 5,
        "retries": 2,
        "splits": 1,
        "throttled": 1,
        "rows_per_second": 2.2,
        "latency_ms": {"mean": 12.0, "p50": 12.0, "p95": 12.0, "p99": 12.0, "max": 12.0},
        "errors": {
            "http_503": {"rows": 2, "example_key": "k2", "example": "HTTP 503"},
            "timeout": {"rows": 1, "example_key": "k1", "example": "timed out"},
        },
        "retries_by_reason": {"http_503": 1, "timeout": 1},
        "timeline": {"bucket_s": 1.0, "rows": [0, 9]},
        "tokens": {"in": 30, "out": 10, "per_second": 10.0},
    }


def test_a_summary_reads_back_as_it_was_written() -> None:
    summary = replace(
        summary_of(figures()),
        duplicate_keys={"keys": 1, "rows": 2, "examples": [{"key": "a", "rows": [1, 2]}]},
        engine="ray",
        actors=2,
        blocks=BlockFigures(3, 1),
        retry=RetryFigures("old.parquet", 3, 2, 1),
    )
    document = summary.to_json()
    assert list(document)[-6:] == [
        "tokens",
        "duplicate_keys",
        "engine",
        "actors",
        "blocks",
        "retry",
    ]
    assert document["retry"] == {"from": "old.parquet", "retried": 3, "now_ok": 2, "still_error": 1}
    again = RunSummary.from_json(orjson.loads(orjson.dumps(document)))
    assert again == summary
    assert orjson.dumps(again.to_json()) == orjson.dumps(document)


def test_an_older_summary_reads_with_its_missing_figures_as_zero() -> None:
    # As an early version wrote it: no splits, throttled, skipped, resumed, timeline.
    old = {
        "job": "nightly",
        "outcome": "done",
        "rows": {"total": 3, "ok": 3, "error": 0},
        "requests": 1,
        "latency_ms": {"p50": 5.0},
        "errors": {},
    }
    summary = RunSummary.from_json(old)
    assert (summary.job, summary.outcome, summary.requests) == ("nightly", "done", 1)
    assert (summary.rows.total, summary.rows.skipped, summary.rows.resumed) == (3, 0, 0)
    assert (summary.splits, summary.throttled, summary.timeline.rows) == (0, 0, ())
    assert (summary.latency_ms.p50, summary.latency_ms.p99) == (5.0, None)
    assert summary.tokens is None and summary.retry is None


@pytest.mark.parametrize(
    "damaged", [{"rows": [1, 2]}, {"errors": {"x": 3}}, {"rows": {"total": "many"}}]
)
def test_a_summary_that_is_not_one_is_refused(damaged: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not a batchrunner run summary"):
        RunSummary.from_json(damaged)


def test_a_runs_summary_file_is_its_typed_summary_as_json() -> None:
    job = load_job(
        write_job(
            Path("iris.toml"),
            f'name = "iris"\n[input]\npath = "{iris_csv()}"\n'
            '[service]\nurl = "embedded:iris"\n[batch]\nsize = 50\n',
        )
    )
    report = asyncio.run(Runner(job, handle_signals=False).run())
    written = report.summary_path.read_bytes()
    assert written == orjson.dumps(report.summary.to_json(), option=orjson.OPT_INDENT_2) + b"\n"
    assert list(orjson.loads(written)) == SUMMARY_KEYS
    # inspect reads the same summary back, from the file's metadata
    assert inspect_output(report.output).summary == report.summary
