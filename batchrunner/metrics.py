"""A run's figures in Prometheus' text format, for node_exporter's textfile collector.

Batch jobs live too briefly to be scraped, so the run writes a ``.prom`` file that
node_exporter (``--collector.textfile.directory``) serves: during the run every progress
interval, and once more at its end, each time written aside and renamed into place (the
collector never reads half a file). Every sample carries the label ``job_name`` (in
Prometheus ``job`` is the scrape job's).

``batchrunner_last_success_timestamp_seconds`` must outlive failed runs (an alert asks how
long ago the last *success* was), so a run that fails carries the value over from the file
it replaces.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from batchrunner.report import LATENCY_BOUNDS_MS, StatsSnapshot

PREFIX = "batchrunner"
LAST_SUCCESS = f"{PREFIX}_last_success_timestamp_seconds"
_LAST_SUCCESS_LINE = re.compile(
    rf'^{LAST_SUCCESS}{{job_name="(?P<job>(?:[^"\\]|\\.)*)"}} (?P<value>\S+)$', re.MULTILINE
)


@dataclass(frozen=True, slots=True)
class RunState:
    """Where the run is: started (Unix time), still running or ended, and how."""

    job: str
    started: float
    running: bool = True
    succeeded: bool | None = None  # None while running
    exit_code: int | None = None
    finished: float | None = None


def render_metrics(
    state: RunState, snapshot: StatsSnapshot | None, last_success: float | None
) -> str:
    """The text exposition of one run's figures (``snapshot``: None when the run ended
    before it counted anything, e.g. its input was invalid)."""
    job = _label_value(state.job)
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        """``samples``: (the labels beside ``job``, value); a histogram's labels start with
        the sample's suffix and a ``|`` (``_bucket|le="0.5"``)."""
        full = f"{PREFIX}_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            suffix, _, more = labels.rpartition("|")
            inner = f'job_name="{job}"' + (f",{more}" if more else "")
            lines.append(f"{full}{suffix}{{{inner}}} {_number(value)}")

    metric(
        "last_run_timestamp_seconds", "gauge", "When the job's latest run started (Unix time).",
        [("", state.started)],
    )  # fmt: skip
    if last_success is not None:
        metric(
            "last_success_timestamp_seconds", "gauge",
            "When the job's latest successful run (exit code 0) ended (Unix time).",
            [("", last_success)],
        )  # fmt: skip
    metric(
        "run_in_progress", "gauge", "1 while the latest run goes on, 0 once it has ended.",
        [("", 1.0 if state.running else 0.0)],
    )  # fmt: skip
    if state.exit_code is not None:
        metric(
            "run_exit_code", "gauge", "The latest run's exit code (see the README's table).",
            [("", float(state.exit_code))],
        )  # fmt: skip
        metric(
            "run_success", "gauge", "1 if the latest run succeeded (exit code 0), else 0.",
            [("", 1.0 if state.succeeded else 0.0)],
        )  # fmt: skip
    if snapshot is None:
        return "\n".join(lines) + "\n"
    metric(
        "run_rows", "gauge", "Rows of the latest run, by status (skipped: done by earlier runs).",
        [
            ('status="ok"', snapshot.rows_ok),
            ('status="error"', snapshot.rows_error),
            ('status="skipped"', snapshot.rows_skipped),
        ],
    )  # fmt: skip
    if snapshot.total is not None:
        metric(
            "run_rows_expected", "gauge", "Rows the latest run will finish, when known.",
            [("", snapshot.total)],
        )  # fmt: skip
    metric(
        "run_requests", "gauge", "Requests the latest run sent (retries included).",
        [("", snapshot.requests)],
    )  # fmt: skip
    metric(
        "run_retries", "gauge", "Requests the latest run sent again, by the error that caused it.",
        [(f'reason="{_label_value(reason)}"', n) for reason, n in snapshot.retries_by_reason],
    )  # fmt: skip
    metric(
        "run_throttled", "gauge", "Answers 429 (the service asked to slow down).",
        [("", snapshot.throttled)],
    )  # fmt: skip
    buckets = list(snapshot.latency_buckets) or [0] * len(LATENCY_BOUNDS_MS)
    histogram: list[tuple[str, float]] = [
        (f'_bucket|le="{bound / 1000!r}"', count)
        for bound, count in zip(LATENCY_BOUNDS_MS, buckets, strict=True)
    ]
    histogram.append(('_bucket|le="+Inf"', snapshot.latency_count))
    histogram.append(("_sum|", round(snapshot.latency_sum_ms / 1000, 6)))
    histogram.append(("_count|", snapshot.latency_count))
    metric(
        "run_request_latency_seconds", "histogram", "Latency of the latest run's answers.",
        histogram,
    )  # fmt: skip
    metric(
        "run_in_flight_requests", "gauge", "Requests in flight now.",
        [("", snapshot.in_flight)],
    )  # fmt: skip
    if snapshot.concurrency_limit is not None:
        metric(
            "run_concurrency_limit", "gauge",
            "The bound on requests in flight (with concurrency = \"auto\" it adapts).",
            [("", snapshot.concurrency_limit)],
        )  # fmt: skip
    metric(
        "run_duration_seconds", "gauge", "How long the latest run has taken so far.",
        [("", round(snapshot.elapsed_s, 3))],
    )  # fmt: skip
    return "\n".join(lines) + "\n"


def read_last_success(path: Path, job: str) -> float | None:
    """The last success of ``job`` recorded in an earlier metrics file, if any."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for match in _LAST_SUCCESS_LINE.finditer(text):
        if match["job"] == _label_value(job):
            try:
                value = float(match["value"])
            except ValueError:
                return None
            return value if math.isfinite(value) else None
    return None


def write_metrics(path: Path, text: str) -> None:
    """Write ``text`` aside (a name the collector ignores) and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.chmod(temporary, 0o644)  # node_exporter often runs as another user
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))
