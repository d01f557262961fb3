"""The library API: what a Python program (a script, a scheduler's task) calls.

Load a job, plan it, run it on either engine, read an output back. Nothing here prints or
exits: failures raise ``BatchRunnerError`` subclasses (see ``errors``), and a run that
finished reports how it went in a ``RunReport``, whose ``exit_code`` is the one the command
line would have used. ``batchrunner/__init__.py`` re-exports these names.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrunner.errors import InputError
from batchrunner.job import Job, load_job

if TYPE_CHECKING:
    from batchrunner.inspection import Inspection
    from batchrunner.report import StatsSnapshot
    from batchrunner.runner import Plan
    from batchrunner.storage import ObjectPath

# The exit codes of the command line, for a run that finished (see the README's table).
EXIT_DONE = 0
EXIT_TOO_MANY_ERRORS = 1
EXIT_ABORTED = 3


class Outcome(enum.StrEnum):
    """How a finished run went."""

    DONE = "done"  # error rows, if any, within max_error_rate
    TOO_MANY_ERRORS = "too_many_errors"  # the output is written, but over max_error_rate
    ABORTED = "aborted"  # a fatal service condition stopped it; re-running resumes


class Engine(enum.StrEnum):
    """Where a run's requests are made from."""

    LOCAL = "local"  # this process: one asyncio pipeline, one Parquet file
    RAY = "ray"  # Ray Data: a folder of Parquet parts (pip install 'batchrunner[ray]')


_EXIT_CODES = {
    Outcome.DONE: EXIT_DONE,
    Outcome.TOO_MANY_ERRORS: EXIT_TOO_MANY_ERRORS,
    Outcome.ABORTED: EXIT_ABORTED,
}


@dataclass(frozen=True, slots=True)
class RunReport:
    """A finished run, whichever the engine: where its output is, and how it went."""

    engine: Engine
    outcome: Outcome
    output: Path | ObjectPath  # a file (local, or in a bucket) or a folder of parts (ray)
    summary_path: Path | ObjectPath  # <output>.summary.json
    summary: Mapping[str, Any]  # what summary_path holds
    rows: int
    rows_ok: int
    rows_error: int
    abort_reason: str | None = None  # with Outcome.ABORTED: why

    @property
    def exit_code(self) -> int:
        """The command line's exit code for this run (0, 1 or 3)."""
        return _EXIT_CODES[self.outcome]

    @property
    def error_rate(self) -> float:
        finished = self.rows_ok + self.rows_error
        return self.rows_error / finished if finished else 0.0


def job_from_settings(**sections: Any) -> Job:
    """Build a job from keyword settings, as a job file would hold them.

    ``job_from_settings(name="iris", input={"path": "samples/iris.csv"},
    service={"url": "embedded:iris"}, batch={"size": 20})``: each keyword is a top-level
    setting or a section (a mapping). Validated like a job file; ``${VAR}`` is expanded.
    Raises ``SettingError`` naming the setting that is wrong.
    """
    return load_job(None, overrides=dict(_dotted(sections)))


def _dotted(settings: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def plan(job: Job, *, limit: int | None = None) -> Plan:
    """What a run of ``job`` would do (files, rows, batches, the first request); sends nothing.

    Raises ``JobError`` when the job or its input is invalid.
    """
    from batchrunner.runner import plan_job

    return plan_job(job, limit=limit)


def run(
    job: Job,
    *,
    engine: Engine | str = Engine.LOCAL,
    limit: int | None = None,
    resume: bool = True,
    on_progress: Callable[[StatsSnapshot], None] | None = None,
    progress_interval: float = 10.0,
) -> RunReport:
    """Run ``job`` to the end and report how it went.

    ``limit``: the first N items only (local engine). ``resume``: re-use the finished batches
    of an interrupted run of the same job (the default). ``on_progress`` is called with a
    snapshot of the figures every ``progress_interval`` seconds (local engine).
    Raises ``JobError`` (invalid job or input, nothing sent), ``AuthError`` (the token or login
    was refused before anything finished), ``LockedError`` (another run holds the job's
    lock), ``RunInterrupted`` (a signal; the state is kept).
    """
    engine = Engine(engine)
    if engine is Engine.RAY:
        if limit is not None:
            raise InputError("limit is not available with the ray engine")
        from batchrunner.engines.ray import run_on_ray

        ray_result = run_on_ray(job, resume=resume)
        return RunReport(
            engine=engine,
            outcome=Outcome(ray_result.outcome),
            output=ray_result.output,
            summary_path=ray_result.summary_path,
            summary=ray_result.summary,
            rows=ray_result.rows,
            rows_ok=ray_result.rows_ok,
            rows_error=ray_result.rows_error,
        )
    from batchrunner.runner import run_job

    result = run_job(
        job,
        limit=limit,
        resume=resume,
        on_progress=on_progress,
        progress_interval=progress_interval,
    )
    stats = result.stats
    return RunReport(
        engine=engine,
        outcome=Outcome(result.outcome),
        output=result.output,
        summary_path=result.summary_path,
        summary=result.summary,
        rows=stats.rows_ok + stats.rows_error,
        rows_ok=stats.rows_ok,
        rows_error=stats.rows_error,
        abort_reason=result.abort_reason,
    )


def read_output(path: str | Path | ObjectPath, *, error_rows: int = 5) -> Inspection:
    """Read a batchrunner output back (what ``inspect`` shows): rows by status, error kinds
    with examples, the result fields, the run's summary, and the first ``error_rows`` error
    rows. Raises ``InputError`` when ``path`` is not a batchrunner output. An ``s3://`` or
    ``obs://`` text is reached through the standard AWS variables; a run's ``output`` in a
    bucket, through its job's ``[storage]``.
    """
    from batchrunner.inspection import inspect_output, output_path
    from batchrunner.storage import ObjectPath

    where = path if isinstance(path, ObjectPath) else output_path(str(path))
    return inspect_output(where, error_limit=error_rows)
