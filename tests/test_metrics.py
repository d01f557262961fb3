"""The metrics file: real runs' figures in Prometheus' text format, read back by the
``prometheus_client`` parser (what node_exporter's textfile collector accepts)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchrunner.job import load_job
from batchrunner.metrics import RunState, read_last_success, render_metrics
from batchrunner.report import (
    LATENCY_BOUNDS_MS,
    DispatchStatistics,
    FinishStatistics,
    LatencyHistogram,
    RunStatistics,
)
from batchrunner.watch import run_watched
from tests.conftest import write_csv, write_job


def parse(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as (name, sorted labels but job) -> value; checks each has job="..."."""
    samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("job_name") != ""
            samples[sample.name, tuple(sorted(labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def job_file(rows: int = 6, bad: int = 0, name: str = "nightly") -> Path:
    records = [(f"r{i}", 5.1, 3.5, 1.4, "" if i < bad else 0.2) for i in range(rows)]
    data = write_csv(
        Path("data.csv"),
        ["id", "sepal_length", "sepal_width", "petal_length", "petal_width"],
        records,
    )
    return write_job(
        Path(f"{name}.toml"),
        f'name = "{name}"\n[input]\npath = "{data}"\nid_column = "id"\n'
        '[service]\nurl = "embedded:iris"\n[batch]\nsize = 2\n'
        '[report]\nmetrics_file = "metrics/{name}.prom"\n',
    )


def test_a_successful_run(invoke) -> None:
    before = time.time()
    result = invoke("run", str(job_file()))
    assert result.exit_code == 0, result.stderr
    samples = parse(Path("metrics/nightly.prom"))
    assert value(samples, "batchrunner_run_rows", status="ok") == 6
    assert value(samples, "batchrunner_run_rows", status="error") == 0
    assert value(samples, "batchrunner_run_rows", status="skipped") == 0
    assert value(samples, "batchrunner_run_requests") == 3
    assert value(samples, "batchrunner_run_in_flight_requests") == 0
    assert value(samples, "batchrunner_run_concurrency_limit") == 8
    assert value(samples, "batchrunner_run_in_progress") == 0
    assert value(samples, "batchrunner_run_success") == 1
    assert value(samples, "batchrunner_run_exit_code") == 0
    assert value(samples, "batchrunner_run_duration_seconds") > 0
    assert before <= value(samples, "batchrunner_last_run_timestamp_seconds") <= time.time()
    success = value(samples, "batchrunner_last_success_timestamp_seconds")
    assert value(samples, "batchrunner_last_run_timestamp_seconds") <= success <= time.time()
    # the latency histogram: three answers, cumulative buckets up to +Inf
    assert value(samples, "batchrunner_run_request_latency_seconds_count") == 3
    assert value(samples, "batchrunner_run_request_latency_seconds_bucket", le="+Inf") == 3
    assert value(samples, "batchrunner_run_request_latency_seconds_sum") > 0
    buckets = [
        value(samples, "batchrunner_run_request_latency_seconds_bucket", le=str(bound / 1000))
        for bound in LATENCY_BOUNDS_MS
    ]
    assert buckets == sorted(buckets) and buckets[-1] == 3
    assert not list(Path("metrics").glob(".*"))  # nothing left aside


def test_a_failed_run_keeps_the_last_success(invoke) -> None:
    assert invoke("run", str(job_file())).exit_code == 0
    success = read_last_success(Path("metrics/nightly.prom"), "nightly")
    assert success is not None
    failed = invoke("run", str(job_file(bad=2)), "--no-resume")
    assert failed.exit_code == 1
    samples = parse(Path("metrics/nightly.prom"))
    assert value(samples, "batchrunner_run_success") == 0
    assert value(samples, "batchrunner_run_exit_code") == 1
    assert value(samples, "batchrunner_run_rows", status="error") == 2
    assert value(samples, "batchrunner_last_success_timestamp_seconds") == success
    assert value(samples, "batchrunner_last_run_timestamp_seconds") > success


def test_invalid_input_after_a_valid_job_is_a_failed_run(invoke) -> None:
    job = job_file()
    Path("data.csv").unlink()
    result = invoke("run", str(job), "--metrics-file", "elsewhere.prom")
    assert result.exit_code == 2
    samples = parse(Path("elsewhere.prom"))  # the option beats the job file
    assert value(samples, "batchrunner_run_exit_code") == 2
    assert value(samples, "batchrunner_run_success") == 0
    assert ("batchrunner_last_success_timestamp_seconds", ()) not in samples
    assert not Path("metrics").exists()


def test_written_during_the_run() -> None:
    job = load_job(job_file(rows=40))
    seen: list[str] = []

    def tick(snapshot: object) -> None:
        seen.append(Path("metrics/nightly.prom").read_text())

    run_watched(
        job,
        on_progress=tick,
        progress_interval=0.001,
        metrics_interval=0.0,
        handle_signals=False,
    )
    assert seen, "no progress tick"
    assert all('batchrunner_run_in_progress{job_name="nightly"} 1\n' in text for text in seen)
    assert all("batchrunner_run_exit_code" not in text for text in seen)
    assert (
        'batchrunner_run_in_progress{job_name="nightly"} 0\n'
        in Path("metrics/nightly.prom").read_text()
    )


def test_render_escapes_labels_and_counts_retry_reasons() -> None:
    latencies = LatencyHistogram()
    for latency in (3.0, 40.0, 700.0):
        latencies.add(latency)
    stats = RunStatistics(
        dispatch=DispatchStatistics(
            requests=5,
            retries=2,
            latency=latencies.statistics(),
            retries_by_reason=(("http_503", 1), ("timeout", 1)),
        ),
        finishing=FinishStatistics(rows_ok=3),
    )
    text = render_metrics(
        RunState(job='we"ird\\job', started=1.5), stats.snapshot(0, 2.0), last_success=None
    )
    path = Path("m.prom")
    path.write_text(text)
    samples = parse(path)
    assert value(samples, "batchrunner_run_retries", reason="http_503") == 1
    assert value(samples, "batchrunner_run_retries", reason="timeout") == 1
    assert value(samples, "batchrunner_run_request_latency_seconds_bucket", le="0.005") == 1
    assert value(samples, "batchrunner_run_request_latency_seconds_bucket", le="0.05") == 2
    assert value(samples, "batchrunner_run_request_latency_seconds_bucket", le="1.0") == 3
    assert value(samples, "batchrunner_run_in_progress") == 1
    assert 'job_name="we\\"ird\\\\job"' in text
    assert read_last_success(path, 'we"ird\\job') is None
    assert re.search(r"^# TYPE batchrunner_run_request_latency_seconds histogram$", text, re.M)


@pytest.mark.parametrize(
    "text", ["", "garbage\n", 'batchrunner_last_success_timestamp_seconds{job="x"} nan\n']
)
def test_a_missing_or_odd_earlier_file_has_no_last_success(text: str) -> None:
    Path("old.prom").write_text(text)
    assert read_last_success(Path("old.prom"), "x") is None
    assert read_last_success(Path("missing.prom"), "x") is None
