"""The library API: what a Python program (a script, a scheduler's task) calls.

Load a job, plan it, run it on either engine, read an output back. Nothing here prints or
exits: failures raise ``BatchRunnerError`` subclasses (see ``errors``), and a run that
finished reports how it went in a ``RunReport``, whose ``exit_code`` is the one the command
line would have used. ``batchrunner/__init__.py`` re-exports these names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrunner.errors import InputError
from batchrunner.job.loading import load_job
from batchrunner.job.settings import Engine, Job
from batchrunner.wiring import RunOutcome, RunReport

if TYPE_CHECKING:
    from batchrunner.inspection import Inspection
    from batchrunner.report import StatsSnapshot
    from batchrunner.storage import ObjectPath
    from batchrunner.wiring import Plan

__all__ = [
    "Engine",
    "Outcome",
    "RunReport",
    "job_from_settings",
    "plan",
    "read_output",
    "run",
]

Outcome = RunOutcome  # the library's name for how a finished run went


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
    from batchrunner.wiring import plan_job

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

        return run_on_ray(job, resume=resume)
    from batchrunner.engines.local import run_job

    return run_job(
        job,
        limit=limit,
        resume=resume,
        on_progress=on_progress,
        progress_interval=progress_interval,
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
