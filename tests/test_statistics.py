"""Each stage of a run counts its own part (``statistics()``), and the run's snapshot is
those parts combined: checked on real runs against the embedded reference service."""

from __future__ import annotations

import asyncio
import random
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from batchrunner.engines.local import Runner
from batchrunner.job import load_job
from batchrunner.report import (
    ErrorKindSummary,
    FinishStatistics,
    FinishTally,
    ReadStatistics,
    RunStatistics,
)
from batchrunner.service import ServiceOptions, fault_middleware
from batchrunner.service.faults import FaultSettings, poisoned
from batchrunner.wiring import RunReport
from tests.clocks import FakeClock
from tests.conftest import TOKEN, read_output, write_csv, write_job
from tests.servers import ThreadedService

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
POISON = FaultSettings(poison_rate=0.02, error_rate=0.1, seed=3)


def flowers(name: str, count: int, start: int = 0) -> tuple[Path, set[str]]:
    """A CSV of ``count`` made-up flowers keyed from ``start``, and the keys of those the
    service refuses (``POISON``)."""
    rng = random.Random(start)
    rows = [
        (str(start + n), *(round(rng.uniform(0.5, 7.5), 1) for _ in FEATURES)) for n in range(count)
    ]
    bad = {
        row[0]
        for row in rows
        if poisoned(dict(zip(FEATURES, row[1:], strict=True)), POISON.poison_rate, POISON.seed)
    }
    return write_csv(Path(f"{name}.csv"), ["id", *FEATURES], rows), bad


def run(service: ThreadedService, data: Path, name: str) -> tuple[Runner, RunReport]:
    job = load_job(
        write_job(
            Path(f"{name}.toml"),
            f'name = "{name}"\n[input]\npath = "{data}"\nid_column = "id"\n'
            f'[service]\nurl = "{service.url}"\n[batch]\nsize = 20\nconcurrency = 4\n'
            "[retry]\nmax_attempts = 12\n",
        ),
        assignments=["max_error_rate=0.5"],
    )
    runner = Runner(job, clock=FakeClock(), rng=random.Random(0), handle_signals=False)
    return runner, asyncio.run(runner.run())


def test_each_stage_counts_its_part_of_a_real_run() -> None:
    data, bad = flowers("day", 300)
    assert bad  # the seed poisons a few rows: splits, error rows
    with ThreadedService(
        ServiceOptions(model="iris", token=TOKEN), [fault_middleware(POISON)]
    ) as service:
        runner, report = run(service, data, "day")
        seen = service.stats
    stages = runner.statistics()
    with pytest.raises(FrozenInstanceError):  # a copy: the stages' own counters stay theirs
        stages.dispatch.requests = 0  # type: ignore[misc]

    assert stages.reading == ReadStatistics(batches_read=15, rows_read=300, rows_skipped=0)

    dispatch = stages.dispatch
    assert dispatch.requests == seen.requests == sum(seen.by_status.values())
    assert dispatch.latency.count == dispatch.requests  # every request was answered
    # random 503s are retried (and counted by reason); poisoned rows' 400s are split
    assert dict(dispatch.retries_by_reason) == {"http_503": seen.by_status[503]}
    assert dispatch.retries == seen.by_status[503] > 0
    assert 0 < dispatch.splits <= seen.by_status[400]
    assert (dispatch.throttled, dispatch.tokens_in, dispatch.tokens_out) == (0, 0, 0)

    finishing = stages.finishing
    assert (finishing.rows_ok, finishing.rows_error, finishing.rows_resumed) == (
        300 - len(bad),
        len(bad),
        0,
    )
    [errors] = finishing.errors
    assert (errors.kind, errors.rows) == ("model_error", len(bad))
    assert errors.example_key in bad
    assert sum(finishing.timeline) == 300
    out = read_output("out/day.parquet")
    assert {r["_key"] for r in out if r["_status"] == "error"} == bad
    # every answer the output keeps came from a request the dispatcher counted
    assert len({r["_request_uuid"] for r in out}) <= dispatch.requests

    # The run's snapshot is the stages' figures combined, and the summary says the same.
    final = report.stats
    assert final == stages.snapshot(
        0, final.elapsed_s, total=300, concurrency_limit=final.concurrency_limit
    )
    assert (final.requests, final.retries, final.splits) == (
        dispatch.requests,
        dispatch.retries,
        dispatch.splits,
    )
    summary = report.summary.to_json()
    assert summary["rows"] == {
        "total": 300,
        "ok": finishing.rows_ok,
        "error": finishing.rows_error,
        "skipped": 0,
        "resumed": 0,
    }
    assert (summary["requests"], summary["retries"], summary["splits"]) == (
        dispatch.requests,
        dispatch.retries,
        dispatch.splits,
    )
    assert summary["retries_by_reason"] == dict(dispatch.retries_by_reason)


def test_the_statistics_of_two_runs_add_up_to_their_sum() -> None:
    # What a Ray run does with its blocks: each is counted apart, the run sums them.
    first_data, first_bad = flowers("first", 150, start=500)
    second_data, second_bad = flowers("second", 100, start=1000)
    assert first_bad and second_bad
    with ThreadedService(
        ServiceOptions(model="iris", token=TOKEN), [fault_middleware(POISON)]
    ) as service:
        first_runner, first = run(service, first_data, "first")
        second_runner, second = run(service, second_data, "second")
        requests = service.stats.requests
    total = first_runner.statistics() + second_runner.statistics()
    summed = total.snapshot(0, 1.0)
    one, two = first.stats, second.stats
    for name in (
        "batches_read",
        "rows_read",
        "rows_ok",
        "rows_error",
        "requests",
        "retries",
        "splits",
        "latency_count",
    ):
        assert getattr(summed, name) == getattr(one, name) + getattr(two, name), name
    assert summed.requests == requests
    assert summed.latency_sum_ms == first_runner.statistics().dispatch.latency.total_ms + (
        second_runner.statistics().dispatch.latency.total_ms
    )
    assert summed.latency_buckets == tuple(
        a + b for a, b in zip(one.latency_buckets, two.latency_buckets, strict=True)
    )
    assert summed.latency.max == max(one.latency.max or 0, two.latency.max or 0)
    reasons = dict(one.retries_by_reason)
    for reason, count in two.retries_by_reason:
        reasons[reason] = reasons.get(reason, 0) + count
    assert dict(summed.retries_by_reason) == reasons
    [errors] = summed.errors
    assert errors.rows == len(first_bad) + len(second_bad)
    assert errors.example_key == one.errors[0].example_key  # the first met is kept
    assert sum(summed.timeline) == 250


def test_finishing_statistics_add_up_across_timelines_of_other_widths() -> None:
    short = FinishTally()
    short.record_finished(3, 0.5)
    short.record_finished(4, 3.5)  # buckets of 1 s: [3, 0, 0, 4]
    long = FinishTally()
    for second in range(200):  # outlasts the buckets: 2 s each
        long.record_finished(1, float(second))
    assert long.timeline_bucket_s == 2.0
    both = short.statistics() + long.statistics()
    assert both.timeline_bucket_s == 2.0
    assert both.timeline[:2] == (3 + 2, 4 + 2)  # short's seconds 0-1 and 2-3, merged
    assert sum(both.timeline) == 207


def test_a_resume_counts_the_kept_rows_as_finished_before() -> None:
    # The finishing stage starts from what the interrupted run finished.
    kept = FinishStatistics(
        rows_ok=5,
        rows_error=1,
        rows_resumed=6,
        errors=(ErrorKindSummary("model_error", 1, "k3", "refused"),),
    )
    tally = FinishTally.starting_from(kept)
    tally.record_error_rows("model_error", 2, "k9", "refused again")
    tally.rows_error += 2
    stats = tally.statistics()
    assert (stats.rows_ok, stats.rows_error, stats.rows_resumed) == (5, 3, 6)
    assert stats.errors == (ErrorKindSummary("model_error", 3, "k3", "refused"),)
    snapshot = RunStatistics(finishing=stats).snapshot(0, 2.0)
    assert snapshot.rows_per_second == 1.0  # only the 2 rows sent now count
