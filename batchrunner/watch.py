"""A run watched from outside: Prometheus metrics while it goes, a notification when it ends.

``run_watched`` runs a job like ``run_job`` and, as the job's ``[report]`` and ``[notify]``
ask, writes the metrics file every ``metrics_interval`` seconds and at the end, then sends the
notification. Whatever the end (done, too many errors, invalid input, aborted, interrupted),
both happen before the result is returned or the error raised again; neither changes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from batchrunner.engines.local import run_job
from batchrunner.errors import BatchRunnerError, RunInterrupted
from batchrunner.job.settings import Job
from batchrunner.metrics import RunState, read_last_success, render_metrics, write_metrics
from batchrunner.notify import RunEnd, send_notifications
from batchrunner.report import StatsSnapshot
from batchrunner.summary import RunSummary
from batchrunner.wiring import RunOutcome, RunReport

log = logging.getLogger("batchrunner")

EXIT_INTERRUPTED = RunInterrupted.exit_code


def metrics_path(job: Job) -> Path | None:
    """``report.metrics_file`` with ``{name}`` filled, or None."""
    template = job.report.metrics_file
    return None if template is None else Path(template.replace("{name}", job.name))


class MetricsWriter:
    """Writes the job's metrics file: on progress (at most every ``interval`` seconds) and
    at the end. A file that cannot be written is logged, once, and the run goes on."""

    def __init__(self, path: Path, job_name: str, *, interval: float) -> None:
        self.path = path
        self._job = job_name
        self._interval = interval
        self._state = RunState(job=job_name, started=time.time())
        self._last_success = read_last_success(path, job_name)
        self._last_write = -float("inf")
        self._failed = False
        self.snapshot: StatsSnapshot | None = None

    def progress(self, snapshot: StatsSnapshot) -> None:
        self.snapshot = snapshot
        now = time.monotonic()
        if now - self._last_write >= self._interval:
            self._last_write = now
            self._write()

    def end(self, exit_code: int, snapshot: StatsSnapshot | None) -> None:
        finished = time.time()
        if snapshot is not None:
            self.snapshot = snapshot
        if exit_code == 0:
            self._last_success = finished
        self._state = RunState(
            job=self._job,
            started=self._state.started,
            running=False,
            succeeded=exit_code == 0,
            exit_code=exit_code,
            finished=finished,
        )
        self._write()

    def _write(self) -> None:
        try:
            write_metrics(self.path, render_metrics(self._state, self.snapshot, self._last_success))
        except OSError as exc:
            if not self._failed:
                log.warning(
                    "report.metrics_file: cannot write %s: %s", self.path, exc.strerror or exc
                )
            self._failed = True


def run_watched(
    job: Job,
    *,
    on_progress: Callable[[StatsSnapshot], None] | None = None,
    progress_interval: float = 10.0,
    metrics_interval: float = 10.0,
    environ: Mapping[str, str] | None = None,
    run: Callable[..., RunReport] = run_job,
    **options: Any,
) -> RunReport:
    """Run ``job`` (``run_job``'s options), with its metrics file and notification."""
    path = metrics_path(job)
    metrics = None if path is None else MetricsWriter(path, job.name, interval=metrics_interval)
    if metrics is None and job.notify is None:
        return run(job, on_progress=on_progress, progress_interval=progress_interval, **options)

    def progress(snapshot: StatsSnapshot) -> None:
        if metrics is not None:
            metrics.progress(snapshot)
        if on_progress is not None:
            on_progress(snapshot)

    interval = progress_interval if on_progress is not None else metrics_interval
    if on_progress is not None and metrics is not None:
        interval = min(progress_interval, metrics_interval)
    try:
        result = run(job, on_progress=progress, progress_interval=interval, **options)
    except BatchRunnerError as error:
        _ended(job, metrics, error.exit_code, None, str(error), None, environ)
        raise
    except KeyboardInterrupt:
        _ended(job, metrics, EXIT_INTERRUPTED, None, "interrupted", None, environ)
        raise
    code = result.exit_code
    _ended(job, metrics, code, result.stats, _result_message(result), result.summary, environ)
    return result


def _ended(
    job: Job,
    metrics: MetricsWriter | None,
    exit_code: int,
    snapshot: StatsSnapshot | None,
    message: str,
    summary: RunSummary | None,
    environ: Mapping[str, str] | None,
) -> None:
    if metrics is not None:
        metrics.end(exit_code, snapshot)
    if job.notify is not None:
        send_notifications(job.notify, RunEnd(job.name, exit_code, message, summary), environ)


def _result_message(result: RunReport) -> str:
    summary = result.summary
    text = (
        f"{summary.rows.ok:,} rows ok, {summary.rows.error:,} errors in {summary.elapsed_s:.1f} s"
    )
    if result.outcome == RunOutcome.TOO_MANY_ERRORS:
        text += (
            f"; error rate {summary.error_rate:.2%} is above max_error_rate "
            f"{summary.max_error_rate:.2%}"
        )
    elif result.outcome == RunOutcome.ABORTED:
        text += f"; aborted: {result.abort_reason}"
    return f"{text}; output {result.output}"
