"""``run``, ``retry`` and ``validate``: a job's run on either engine, its error rows sent again,
its plan shown."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from batchrunner.errors import (
    BatchRunnerError,
    ExitCode,
    InputError,
    WriteError,
)
from batchrunner.job.loading import OPTION_SETTINGS, load_job
from batchrunner.job.settings import Engine, Job
from batchrunner.report import StatsSnapshot

if TYPE_CHECKING:
    from rich.console import Console

    from batchrunner.wiring import Plan, RunReport

from batchrunner.cli.common import (
    LogFormat,
    app,
    configure_logging,
    fail,
    load,
    log,
    say_error,
    say_note,
    show_summary,
    stderr_console,
)

LIVE_REFRESHES_PER_SECOND = 4


# The options run and retry share, declared once.
UrlOption = Annotated[str | None, typer.Option(help="Service URL, or embedded:<model>.")]
ConcurrencyOption = Annotated[
    str | None, typer.Option(help='Requests in flight: a number, or "auto".')
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any setting: --set section.key=value (repeatable)."),
]
ProgressIntervalOption = Annotated[
    float,
    typer.Option("--progress-interval", min=0.01, help="Seconds between progress log lines."),
]
LogFormatOption = Annotated[
    LogFormat, typer.Option("--log-format", help="Log lines as text or JSON objects.")
]


@app.command()
def run(
    job_file: Annotated[
        Path | None, typer.Argument(help="The job file (TOML). Optional with --input and --url.")
    ] = None,
    input: Annotated[str | None, typer.Option(help="Input file, folder or glob.")] = None,
    output: Annotated[
        str | None,
        typer.Option(help="Output path: .parquet, .csv or .jsonl ({name} {date} {time} {run_id})."),
    ] = None,
    url: UrlOption = None,
    concurrency: ConcurrencyOption = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per request.")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Only the first N items (to try a job).")
    ] = None,
    set_: SetOption = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Validate, count, show the first request; send nothing."),
    ] = False,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="Start fresh even if an earlier run was cut short.")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="A live progress display, or a log line every --progress-interval seconds "
            "(default: live when stderr is a terminal).",
        ),
    ] = None,
    progress_interval: ProgressIntervalOption = 10.0,
    log_format: LogFormatOption = LogFormat.text,
    engine: Annotated[
        Engine,
        typer.Option(
            "--engine",
            help="local: this process, one Parquet file; ray: Ray Data, a folder of Parquet "
            "parts (one object in a bucket; needs pip install 'batchrunner[ray]').",
        ),
    ] = Engine.LOCAL,
    metrics_file: Annotated[
        str | None,
        typer.Option(
            "--metrics-file",
            help="Write the run's metrics here in Prometheus' text format (node_exporter's "
            "textfile collector), during the run and at its end.",
        ),
    ] = None,
    max_error_rate: Annotated[
        float | None,
        typer.Option(
            "--max-error-rate",
            min=0.0,
            max=1.0,
            help="The share of error rows (0 to 1) above which the run exits 1 "
            "(default: the job's max_error_rate, 0).",
        ),
    ] = None,
    state_dir: Annotated[
        str | None,
        typer.Option(
            "--state-dir",
            help="Where the run keeps its state (journal, lock, incremental memory); default: "
            ".batchrunner/ beside a local output, in the working folder for a bucket.",
        ),
    ] = None,
) -> None:
    """Run a job: read the input, call the service, write one Parquet file of results."""
    on_terminal = sys.stderr.isatty()
    live = on_terminal if progress is None else progress
    console = stderr_console(force_terminal=live) if live or on_terminal else None
    configure_logging(log_format, console if live else None)
    overrides = {
        OPTION_SETTINGS["input"]: input,
        OPTION_SETTINGS["output"]: output,
        OPTION_SETTINGS["url"]: url,
        OPTION_SETTINGS["concurrency"]: concurrency,
        OPTION_SETTINGS["batch_size"]: batch_size,
        OPTION_SETTINGS["metrics_file"]: metrics_file,
        OPTION_SETTINGS["max_error_rate"]: max_error_rate,
        OPTION_SETTINGS["state_dir"]: state_dir,
    }
    from batchrunner.startup import settle_heap
    from batchrunner.watch import run_watched
    from batchrunner.wiring import plan_job, use_lean_memory_pool

    use_lean_memory_pool()
    try:
        job = load(job_file, overrides, set_ or [])
        settle_heap()
        if dry_run:
            plan = plan_job(job, limit=limit, folder_output=engine is Engine.RAY)
            _show_plan(plan, dry_run=True)
            return
        if engine is Engine.RAY:
            result = _run_ray(job, limit, resume=not no_resume)
        elif live and console is not None:
            result = _run_live(
                job, limit, console, resume=not no_resume, metrics_interval=progress_interval
            )
        else:
            result = run_watched(
                job,
                limit=limit,
                resume=not no_resume,
                on_progress=_log_progress,
                progress_interval=progress_interval,
                metrics_interval=progress_interval,
            )
    except BatchRunnerError as error:
        fail(error, log_format)
    except OSError as error:  # a local write none of the stages expected: still no traceback
        where = f"{error.filename}: " if error.filename else ""
        fail(WriteError(f"{where}{error.strerror or error}; re-run to resume"), log_format)
    except KeyboardInterrupt:
        if log_format is LogFormat.json:
            log.warning("interrupted")
        else:
            typer.echo("interrupted", err=True)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    _finish(result, job, log_format)


def _finish(result: RunReport, job: Job, log_format: LogFormat) -> None:
    """Show how a run went, whichever the engine, and exit with its code."""
    from batchrunner.wiring import RunOutcome

    if result.ray is not None:
        ray = result.ray
        reused = f", {ray.blocks_reused:,} finished earlier" if ray.blocks_reused else ""
        log.info(
            "ray run done: %s rows (%s ok, %s errors) in %.1f s with %d actors, %s blocks%s: "
            "output folder %s, summary %s",
            f"{result.rows:,}", f"{result.rows_ok:,}", f"{result.rows_error:,}",
            ray.seconds, ray.actors, f"{ray.blocks:,}", reused, result.output,
            result.summary_path,
        )  # fmt: skip
    else:
        show_summary(result.summary, result.summary_path, log_format)
    if result.outcome is RunOutcome.ABORTED:
        say_error(f"run aborted: {result.abort_reason}", log_format)
    elif result.outcome is RunOutcome.TOO_MANY_ERRORS:
        say_error(
            f"error rate {result.error_rate:.2%} is above max_error_rate "
            f"{job.max_error_rate:.2%}; the output was written (see the error rows' _error "
            "column)",
            log_format,
        )
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _run_ray(job: Job, limit: int | None, *, resume: bool) -> RunReport:
    from batchrunner.engines.ray import run_on_ray

    if limit is not None:
        raise InputError("--limit is not available with --engine ray")
    return run_on_ray(job, resume=resume)


def _run_live(
    job: Job, limit: int | None, console: Console, *, resume: bool, metrics_interval: float
) -> RunReport:
    from rich.live import Live

    from batchrunner.display import ProgressView
    from batchrunner.watch import run_watched

    view = ProgressView(job.name)
    with Live(view, console=console, transient=True, refresh_per_second=LIVE_REFRESHES_PER_SECOND):
        result = run_watched(
            job,
            limit=limit,
            resume=resume,
            on_progress=view.update,
            progress_interval=1 / LIVE_REFRESHES_PER_SECOND,
            metrics_interval=metrics_interval,
        )
        view.update(result.stats)  # the last frame shows the end, not the last tick
    return result


def _log_progress(snapshot: StatsSnapshot) -> None:
    from batchrunner.display import progress_fields, progress_line

    log.info("progress: %s", progress_line(snapshot), extra={"fields": progress_fields(snapshot)})


@app.command()
def retry(
    job_file: Annotated[Path, typer.Argument(help="The job file (TOML) that made OUTPUT.")],
    output_file: Annotated[Path, typer.Argument(help="The output whose error rows to retry.")],
    output: Annotated[
        str | None,
        typer.Option(help="Write the new output here instead of replacing OUTPUT."),
    ] = None,
    url: UrlOption = None,
    concurrency: ConcurrencyOption = None,
    set_: SetOption = None,
    progress_interval: ProgressIntervalOption = 10.0,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Send the error rows of OUTPUT again and write a new, complete output: the ok rows as
    they were, the retried rows in their place, in input order. OUTPUT is replaced (whole or
    not at all) unless --output names another file. Exit codes as for run."""
    configure_logging(log_format)
    overrides = {OPTION_SETTINGS["url"]: url, OPTION_SETTINGS["concurrency"]: concurrency}
    from batchrunner.retrying import retry_errors
    from batchrunner.wiring import use_lean_memory_pool

    use_lean_memory_pool()
    try:
        job = load_job(job_file, overrides=overrides, assignments=set_ or [])
        target = None if output is None else Path(output)
        result = retry_errors(
            job,
            output_file,
            target=target,
            on_progress=_log_progress,
            progress_interval=progress_interval,
        )
    except BatchRunnerError as error:
        fail(error, log_format)
    except KeyboardInterrupt:
        say_error("interrupted: the output was left as it was", log_format)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    if result is None:
        say_note(f"{output_file} has no error rows: nothing to retry", log_format)
        return
    show_summary(result.summary, result.summary_path, log_format)
    code = result.outcome.exit_code
    if code == ExitCode.TOO_MANY_ERRORS:
        say_error(
            f"error rate {result.summary.error_rate:.2%} is still above max_error_rate "
            f"{job.max_error_rate:.2%}; the output was written",
            log_format,
        )
    raise typer.Exit(code)


@app.command()
def validate(
    job_file: Annotated[Path, typer.Argument(help="The job file (TOML).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: section.key=value.")
    ] = None,
) -> None:
    """Check a job file and its input, and print the plan. Sends no request; where the
    protocol can say (oip-v2, kserve-v1, mlflow), asks the server what its model expects."""
    import asyncio

    from batchrunner.expectations import ask_service
    from batchrunner.wiring import codec_for, plan_job

    try:
        plan = plan_job(load_job(job_file, assignments=set_ or []))
        asked = None
        if plan.send_schema is not None:
            codec = codec_for(plan.job, plan.kind)
            asked = asyncio.run(ask_service(plan.job, codec, plan.send_schema))
    except BatchRunnerError as error:
        fail(error)
    _show_plan(plan, dry_run=False)
    if asked is not None:
        typer.echo(f"server:       {asked}")
    typer.echo("job is valid")


def _show_plan(plan: Plan, *, dry_run: bool) -> None:
    from batchrunner.display import plan_text

    typer.echo(plan_text(plan, dry_run=dry_run))
