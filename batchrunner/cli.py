"""The command line: a thin typer app over the library; the only place that prints or exits.

Exit codes: 0 done; 1 done but the error rate is above ``max_error_rate``; 2 the job or its
input is invalid (nothing sent); 3 aborted by the service (e.g. the token is refused);
65 the input turned out bad mid-run (state kept); 74 a local write failed (disk full; state
kept); 75 another run holds the job's lock; 130 interrupted.

Where output goes: ``run`` writes log lines and progress to stderr (text or JSON objects; a
live display when stderr is a terminal) and its final summary to stdout (a table, or with
``--log-format json`` the summary as one JSON object); ``validate``, ``cron`` and
``inspect`` write their product to stdout and notes to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import orjson
import typer

from batchrunner import __version__
from batchrunner.errors import (
    BatchRunnerError,
    InputError,
    ScheduleError,
    SettingError,
    WriteError,
)
from batchrunner.job import DEFAULT_TOKEN_ENV, OPTION_SETTINGS, Job, load_job
from batchrunner.report import StatsSnapshot
from batchrunner.startup import lean_process

if TYPE_CHECKING:
    from rich.console import Console

    from batchrunner.runner import RunResult
    from batchrunner.schedule import Schedule
    from batchrunner.storage import ObjectPath

EXIT_OK = 0
EXIT_TOO_MANY_ERRORS = 1
EXIT_INVALID = 2
EXIT_ABORTED = 3
EXIT_INTERRUPTED = 130
SHOWN_BODY_CHARS = 2000
LIVE_REFRESHES_PER_SECOND = 4
SHOWN_ERROR_ROWS_IN_HTML = 10  # inspect --html lists the first error rows

log = logging.getLogger("batchrunner")

app = typer.Typer(
    name="batchrunner",
    help="Run a model deployed as a REST inference service over a whole dataset.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: [brackets] are shown, not read as markup
)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class Engine(StrEnum):
    local = "local"
    ray = "ray"


def _fail(error: BatchRunnerError, log_format: LogFormat = LogFormat.text) -> NoReturn:
    _say_error(str(error), log_format)
    raise typer.Exit(error.exit_code)


def _say_error(message: str, log_format: LogFormat) -> None:
    # With JSON logs (cron, log shippers) every line on stderr is a JSON object, even this.
    if log_format is LogFormat.json:
        log.error("%s", message)
    else:
        typer.echo(f"error: {message}", err=True)


def _load(job_file: Path | None, overrides: dict[str, Any], assignments: list[str]) -> Job:
    if job_file is None and (
        overrides.get("input.path") is None or overrides.get("service.url") is None
    ):
        raise SettingError("give a job file, or at least --input and --url (and --output)")
    return load_job(job_file, overrides=overrides, assignments=assignments)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"batchrunner {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Run a model deployed as a REST inference service over a whole dataset."""
    sys.unraisablehook = _quiet_unraisable


def _quiet_unraisable(unraisable: Any) -> None:
    """Arrow reports a CSV line it cannot decode for our invalid-row handler (``_open_csv``'s
    ``record``) as "Exception ignored ... Traceback" on stderr; the read then fails with the
    line's own error, which the run reports. Anything else goes to Python's default hook."""
    where = getattr(unraisable.object, "__qualname__", "")
    if isinstance(unraisable.exc_value, UnicodeDecodeError) and where.startswith("_open_csv."):
        log.debug("a bad CSV line could not be decoded for its handler: %s", unraisable.exc_value)
        return
    sys.__unraisablehook__(unraisable)


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
    url: Annotated[str | None, typer.Option(help="Service URL, or embedded:<model>.")] = None,
    concurrency: Annotated[
        str | None, typer.Option(help='Requests in flight: a number, or "auto".')
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per request.")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Only the first N items (to try a job).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override any setting: --set section.key=value (repeatable)."),
    ] = None,
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
    progress_interval: Annotated[
        float,
        typer.Option("--progress-interval", min=0.01, help="Seconds between progress log lines."),
    ] = 10.0,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="Log lines as text or JSON objects.")
    ] = LogFormat.text,
    engine: Annotated[
        Engine,
        typer.Option(
            "--engine",
            help="local: this process, one Parquet file; ray: Ray Data, a folder of Parquet "
            "parts (needs pip install 'batchrunner[ray]').",
        ),
    ] = Engine.local,
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
    console = _stderr_console(force_terminal=live) if live or on_terminal else None
    _configure_logging(log_format, console if live else None)
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
    from batchrunner.runner import (
        OUTCOME_ABORTED,
        OUTCOME_DONE,
        plan_job,
        use_lean_memory_pool,
    )
    from batchrunner.watch import run_watched

    use_lean_memory_pool()
    try:
        job = _load(job_file, overrides, set_ or [])
        if dry_run:
            plan = plan_job(job, limit=limit, folder_output=engine is Engine.ray)
            _show_plan(plan, dry_run=True)
            return
        if engine is Engine.ray:
            _run_ray(job, limit, log_format, resume=not no_resume)
            return
        if live and console is not None:
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
        _fail(error, log_format)
    except OSError as error:  # a local write none of the stages expected: still no traceback
        where = f"{error.filename}: " if error.filename else ""
        _fail(WriteError(f"{where}{error.strerror or error}; re-run to resume"), log_format)
    except KeyboardInterrupt:
        if log_format is LogFormat.json:
            log.warning("interrupted")
        else:
            typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _show_summary(result, log_format)
    if result.outcome == OUTCOME_ABORTED:
        _say_error(f"run aborted: {result.abort_reason}", log_format)
        raise typer.Exit(EXIT_ABORTED)
    if result.outcome != OUTCOME_DONE:
        rate = result.summary["error_rate"]
        _say_error(
            f"error rate {rate:.2%} is above max_error_rate {job.max_error_rate:.2%}; "
            "the output was written (see the error rows' _error column)",
            log_format,
        )
        raise typer.Exit(EXIT_TOO_MANY_ERRORS)


def _run_ray(job: Job, limit: int | None, log_format: LogFormat, *, resume: bool) -> None:
    from batchrunner.engines.ray import run_on_ray

    if limit is not None:
        raise InputError("--limit is not available with --engine ray")
    result = run_on_ray(job, resume=resume)
    reused = f", {result.blocks_reused:,} finished earlier" if result.blocks_reused else ""
    log.info(
        "ray run done: %s rows (%s ok, %s errors) in %.1f s with %d actors, %s blocks%s: "
        "output folder %s, summary %s",
        f"{result.rows:,}", f"{result.rows_ok:,}", f"{result.rows_error:,}",
        result.seconds, result.actors, f"{result.blocks:,}", reused, result.output,
        result.summary_path,
    )  # fmt: skip
    if result.error_rate > job.max_error_rate:
        _say_error(
            f"error rate {result.error_rate:.2%} is above max_error_rate "
            f"{job.max_error_rate:.2%}; the output was written (see the error rows' _error "
            "column)",
            log_format,
        )
        raise typer.Exit(EXIT_TOO_MANY_ERRORS)


def _stderr_console(*, force_terminal: bool) -> Console:
    from rich.console import Console

    # force_terminal: --progress asks for the live display even where stderr is no terminal.
    return Console(stderr=True, highlight=False, force_terminal=True if force_terminal else None)


def _run_live(
    job: Job, limit: int | None, console: Console, *, resume: bool, metrics_interval: float
) -> RunResult:
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


def _show_summary(result: RunResult, log_format: LogFormat) -> None:
    _show_summary_of(result.summary, result.summary_path, log_format)


def _show_summary_of(
    summary: dict[str, Any], summary_path: Path | ObjectPath, log_format: LogFormat
) -> None:
    from batchrunner.display import plain_table, rich_table, summary_rows, summary_title

    # The summary is the run's product: stdout (`run job.toml > summary.txt`, `| jq`); log
    # lines and progress stay on stderr.
    if log_format is LogFormat.json:
        typer.echo(orjson.dumps(summary).decode())
        return
    title = summary_title(summary)
    rows = summary_rows(summary, summary_path)
    if sys.stdout.isatty():
        from rich.console import Console

        Console(highlight=False).print(rich_table(title, rows))
    else:
        typer.echo(plain_table(title, rows))


@app.command()
def retry(
    job_file: Annotated[Path, typer.Argument(help="The job file (TOML) that made OUTPUT.")],
    output_file: Annotated[Path, typer.Argument(help="The output whose error rows to retry.")],
    output: Annotated[
        str | None,
        typer.Option(help="Write the new output here instead of replacing OUTPUT."),
    ] = None,
    url: Annotated[str | None, typer.Option(help="Service URL, or embedded:<model>.")] = None,
    concurrency: Annotated[
        str | None, typer.Option(help='Requests in flight: a number, or "auto".')
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override any setting: --set section.key=value (repeatable)."),
    ] = None,
    progress_interval: Annotated[
        float,
        typer.Option("--progress-interval", min=0.01, help="Seconds between progress log lines."),
    ] = 10.0,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="Log lines as text or JSON objects.")
    ] = LogFormat.text,
) -> None:
    """Send the error rows of OUTPUT again and write a new, complete output: the ok rows as
    they were, the retried rows in their place, in input order. OUTPUT is replaced (whole or
    not at all) unless --output names another file. Exit codes as for run."""
    _configure_logging(log_format)
    overrides = {OPTION_SETTINGS["url"]: url, OPTION_SETTINGS["concurrency"]: concurrency}
    from batchrunner.retrying import retry_errors
    from batchrunner.runner import use_lean_memory_pool

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
        _fail(error, log_format)
    except KeyboardInterrupt:
        _say_error("interrupted: the output was left as it was", log_format)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if result is None:
        _say_note(f"{output_file} has no error rows: nothing to retry", log_format)
        return
    _show_summary_of(result.summary, result.summary_path, log_format)
    code = {"done": EXIT_OK, "too_many_errors": EXIT_TOO_MANY_ERRORS}.get(
        result.outcome, EXIT_ABORTED
    )
    if code == EXIT_TOO_MANY_ERRORS:
        _say_error(
            f"error rate {result.summary['error_rate']:.2%} is still above max_error_rate "
            f"{job.max_error_rate:.2%}; the output was written",
            log_format,
        )
    raise typer.Exit(code)


def _say_note(message: str, log_format: LogFormat) -> None:
    if log_format is LogFormat.json:
        log.info("%s", message)
    else:
        typer.echo(message, err=True)


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
    from batchrunner.runner import codec_for, plan_job

    try:
        plan = plan_job(load_job(job_file, assignments=set_ or []))
        asked = None
        if plan.send_schema is not None:
            codec = codec_for(plan.job, plan.kind)
            asked = asyncio.run(ask_service(plan.job, codec, plan.send_schema))
    except BatchRunnerError as error:
        _fail(error)
    _show_plan(plan, dry_run=False)
    if asked is not None:
        typer.echo(f"server:       {asked}")
    typer.echo("job is valid")


SERVE_TOKEN_ENV = "BATCHRUNNER_SERVE_TOKEN"
SERVE_IAM_PASSWORD_ENV = "BATCHRUNNER_SERVE_IAM_PASSWORD"


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Option(help="The model to serve: iris or linear (text input), or colors (images)."),
    ] = "iris",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8080,
    iam_user: Annotated[
        str | None,
        typer.Option(
            help=f"Also answer IAM logins (POST /v3/auth/tokens) of this user; "
            f"the password is read from {SERVE_IAM_PASSWORD_ENV}."
        ),
    ] = None,
    iam_domain: Annotated[
        str | None, typer.Option(help="The IAM user's domain (default: the user name).")
    ] = None,
    iam_project: Annotated[str, typer.Option(help="The IAM user's project.")] = "local",
    token_ttl: Annotated[
        float, typer.Option(min=0.001, help="Seconds an IAM token lives (the real IAM: 86400).")
    ] = 86400.0,
    latency_ms: Annotated[float, typer.Option(min=0, help="Added latency per request.")] = 0.0,
    jitter_ms: Annotated[float, typer.Option(min=0, help="Latency varies by +- this.")] = 0.0,
    capacity: Annotated[
        int | None, typer.Option(min=1, help="Requests in flight above this get 429.")
    ] = None,
    retry_after: Annotated[
        float, typer.Option(min=0, help="Retry-After (s) sent with each 429.")
    ] = 1.0,
    error_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of 503s.")] = 0.0,
    drop_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of connections dropped unanswered.")
    ] = 0.0,
    html_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of HTML 502 pages.")] = 0.0,
    poison_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Share of rows the model fails on (MR.0105).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the fault draws.")] = 0,
    protocol: Annotated[
        str,
        typer.Option(
            help="The protocol whose URL is shown: modelarts, json, kserve-v1, oip-v2 or "
            "mlflow (a text model answers all of them at once)."
        ),
    ] = "modelarts",
) -> None:
    """Run the embedded reference service (a real model behind the ModelArts protocol, and
    KServe v1, OIP v2, MLflow and custom JSON routes for text models).

    The token is read from BATCHRUNNER_SERVE_TOKEN; if unset, a random one is made and shown.
    With --iam-user, the service also issues expiring tokens to that user (password in
    BATCHRUNNER_SERVE_IAM_PASSWORD, never on the command line) and accepts them.
    The fault options rehearse a bad day: throttling, 503s, dropped connections, HTML error
    pages, slow answers and rows the model cannot score, all drawn from --seed.
    """
    from batchrunner.service import (
        FaultSettings,
        IamAccount,
        RunningService,
        ServiceOptions,
        fault_middleware,
    )
    from batchrunner.service import serve as serve_forever

    faults = FaultSettings(
        latency_ms=latency_ms,
        jitter_ms=jitter_ms,
        capacity=capacity,
        retry_after=retry_after,
        error_rate=error_rate,
        drop_rate=drop_rate,
        html_rate=html_rate,
        poison_rate=poison_rate,
        seed=seed,
    )
    token = os.environ.get(SERVE_TOKEN_ENV, "")
    shown = token == ""
    if shown:
        import secrets

        token = secrets.token_urlsafe(24)
    account = None
    if iam_user is not None:
        password = os.environ.get(SERVE_IAM_PASSWORD_ENV, "")
        if not password:
            _fail(
                SettingError(
                    f"--iam-user: set the user's password in the environment variable "
                    f"{SERVE_IAM_PASSWORD_ENV} (a password never goes on the command line)"
                )
            )
        account = IamAccount(iam_user, password, iam_domain or iam_user, iam_project)
    options = ServiceOptions(
        model=model, token=token, iam=account, token_ttl=token_ttl, protocol=protocol
    )

    def ready(service: RunningService) -> None:
        typer.echo(f"serving model {model!r} at {service.url} ({protocol})")
        if shown:
            typer.echo(f"X-Auth-Token: {token}  (a random token for this local service only)")
        else:
            typer.echo(f"X-Auth-Token: the value of {SERVE_TOKEN_ENV}")
        if account is not None:
            typer.echo(
                f"IAM: POST {service.iam_url} logs in user {account.user!r} "
                f"(domain {account.domain!r}, project {account.project!r}) with the password "
                f"in {SERVE_IAM_PASSWORD_ENV}; tokens live {token_ttl:g} s"
            )
        if faults.any:
            typer.echo(f"injecting faults: {faults}")
        typer.echo("press Ctrl-C to stop", nl=True)
        sys.stdout.flush()

    middlewares = [fault_middleware(faults)] if faults.any else []
    try:
        serve_forever(options, host, port, on_ready=ready, extra_middlewares=middlewares)
    except ValueError as error:
        _fail(SettingError(f"--model/--protocol: {error}"))
    except OSError as error:
        typer.echo(f"error: cannot listen on {host}:{port}: {error.strerror}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    except KeyboardInterrupt:
        pass


@app.command()
def cron(
    job_file: Annotated[Path, typer.Argument(help="The job file (TOML).")],
    schedule: Annotated[
        str | None,
        typer.Option(
            help="Required (except with --remove). When to run: cron's five fields, e.g. "
            '"0 2 * * *" (02:00 every day), or @hourly, @daily, @weekly, @monthly.'
        ),
    ] = None,
    install: Annotated[
        bool,
        typer.Option(
            "--install", help="Put the line in your crontab (replacing the job's old one)."
        ),
    ] = False,
    remove: Annotated[
        bool, typer.Option("--remove", help="Take the job's line out of your crontab.")
    ] = False,
    env_file: Annotated[
        Path | None,
        typer.Option(
            "--env-file",
            help="A file of NAME=value lines (the token) the line reads first; only you should "
            "be able to read it.",
        ),
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option("--log", help="Where each run's log lines are appended [logs/<job>.log]."),
    ] = None,
) -> None:
    """Print a crontab line that runs the job on a schedule, or install it in your crontab.

    The line works from cron's bare environment: the batchrunner command and the job by their
    full paths, this folder as the working folder, the secrets read from --env-file (never
    written into the crontab), JSON log lines appended to --log. Exit 0 done; 2 the job,
    schedule or env file is invalid; 1 the crontab command failed.
    """
    from batchrunner.crontab import read_crontab, write_crontab
    from batchrunner.schedule import install_line, parse_schedule, remove_lines

    job_path = job_file.resolve()
    try:
        if install and remove:
            raise ScheduleError("--install and --remove do not go together: choose one")
        if remove:
            # The job file is not read: a deleted job's line can still be removed.
            edit = remove_lines(read_crontab(), job_path)
            if edit.changed:
                write_crontab(edit.table)
        else:
            if schedule is None:
                raise ScheduleError(
                    '--schedule is missing: say when to run, e.g. --schedule "0 2 * * *" '
                    "for 02:00 every day"
                )
            parsed = parse_schedule(schedule)
            job = load_job(job_file)
            line, log_path = _cron_line(job, job_path, parsed, env_file, log_file)
            if install:
                edit = install_line(read_crontab(), line, job_path)
                if edit.changed:
                    write_crontab(edit.table)
    except BatchRunnerError as error:
        _fail(error)
    if remove:
        if edit.changed:
            typer.echo(f"removed from your crontab: {edit.old_lines[0]}", err=True)
        else:
            typer.echo(f"no line in your crontab runs {job_path}: nothing to remove", err=True)
        return
    typer.echo(line)
    if not install:
        typer.echo("add it with `crontab -e`, or run this again with --install", err=True)
        return
    if not edit.changed:
        typer.echo("this line is already in your crontab: nothing changed", err=True)
    elif edit.old_lines:
        typer.echo(f"replaced in your crontab: {edit.old_lines[0]}", err=True)
    else:
        typer.echo("added to your crontab", err=True)
    typer.echo(
        f"each run appends its log to {log_path}; look at a run's output with "
        "`batchrunner inspect <output>.parquet`",
        err=True,
    )


def _cron_line(
    job: Job, job_path: Path, schedule: Schedule, env_file: Path | None, log_file: Path | None
) -> tuple[str, Path]:
    from batchrunner.crontab import check_env_file, locate_executable, make_log_folder
    from batchrunner.schedule import CronJob, cron_line

    secret_envs = _secret_envs(job)
    env_path = None if env_file is None else env_file.resolve()
    if env_path is not None:
        warnings = check_env_file(env_path, secret_envs)
    else:
        warnings = [
            f"the job reads {what} from ${name}, which cron does not set: put "
            f"{name}=... in a file only you can read, and give it with --env-file"
            for name, what in secret_envs.items()
        ]
    log_path = (log_file or Path("logs") / f"{job.name}.log").resolve()
    cron_job = CronJob(
        name=job.name,
        job_file=job_path,
        executable=locate_executable(),
        workdir=Path.cwd(),
        log_file=log_path,
        env_file=env_path,
    )
    line = cron_line(schedule, cron_job)
    make_log_folder(log_path)  # a redirection into a missing folder fails every night
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    return line, log_path


def _secret_envs(job: Job) -> dict[str, str]:
    """The environment variables the job reads secrets from, each with what it holds."""
    service = job.service
    if service.embedded_model is not None:
        return {}
    envs = {}
    if service.token_source == "token_env":
        envs[service.token_env or DEFAULT_TOKEN_ENV] = "its token"
    if service.iam is not None and service.iam.password_env is not None:
        envs[service.iam.password_env] = "its IAM password"
    if service.app is not None and service.app.appcode_env is not None:
        envs[service.app.appcode_env] = "its AppCode"
    return envs


@app.command()
def inspect(
    output_file: Annotated[Path, typer.Argument(help="An output file of batchrunner run.")],
    errors: Annotated[
        bool, typer.Option("--errors", help="List the error rows: key, kind, message.")
    ] = False,
    limit: Annotated[
        int,
        typer.Option(
            min=1,
            help="With --errors: list at most this many rows; with --counts, this many values.",
        ),
    ] = 20,
    head: Annotated[
        int | None,
        typer.Option("--head", min=1, help="Show the first N rows: key, status, result fields."),
    ] = None,
    counts: Annotated[
        str | None,
        typer.Option("--counts", help="Count the values of this result field."),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            help="Also write a report to this HTML file (self-contained: charts inline).",
        ),
    ] = None,
) -> None:
    """Show what an output file holds: the run's summary, rows by status, error kinds with
    example keys, and the result fields' types. Reads the file as a stream.

    With --head N: the first N rows instead; with --counts FIELD: how often each value of
    FIELD occurs."""
    from batchrunner.display import counts_text, error_rows_text, head_text, inspection_text
    from batchrunner.inspection import count_values, head_rows, inspect_output

    try:
        if head is not None or counts is not None:
            if head is not None:
                typer.echo(head_text(head_rows(output_file, head)))
            if counts is not None:
                if head is not None:
                    typer.echo("")
                typer.echo(counts_text(count_values(output_file, counts), limit))
            return
        wanted = max(limit if errors else 0, SHOWN_ERROR_ROWS_IN_HTML if html is not None else 0)
        inspection = inspect_output(output_file, error_limit=wanted)
        if html is not None:
            from batchrunner.htmlreport import write_report

            write_report(inspection, html)
    except BatchRunnerError as error:
        _fail(error)
    typer.echo(inspection_text(inspection))
    _show_charts(inspection)
    if html is not None:
        typer.echo(f"report written to {html}", err=True)
    if errors:
        typer.echo("")
        typer.echo(error_rows_text(inspection))


def _show_charts(inspection: Any) -> None:
    from batchrunner.display import charts_renderable, charts_text

    if sys.stdout.isatty():
        from rich.console import Console

        renderable = charts_renderable(inspection)
        if renderable is not None:
            Console(highlight=False).print(renderable)
        return
    text = charts_text(inspection)
    if text:
        typer.echo("")
        typer.echo(text)


def _show_plan(plan: Any, *, dry_run: bool) -> None:
    job = plan.job
    files = plan.files
    shown_files = ", ".join(str(f) for f in files[:3]) + (
        f" (+{len(files) - 3} more)" if len(files) > 3 else ""
    )
    rows = "unknown" if plan.rows is None else f"{plan.rows:,}"
    batches = "unknown" if plan.batches is None else f"{plan.batches:,}"
    lines = [
        f"job:          {job.name}",
        f"input:        {shown_files} ({plan.format})",
        f"sends:        {', '.join(plan.send_columns)}",
        f"key:          {plan.key}",
        f"rows:         {rows} in {batches} requests of up to {plan.batch_size}",
        f"service:      {plan.url} ({job.service.protocol}), "
        f"{_describe_concurrency(job)} in flight",
        f"auth:         {plan.auth}",
        f"output:       {plan.output}",
    ]
    if plan.storage is not None:
        lines.append(f"storage:      {plan.storage}")
    if job.input.incremental:
        from batchrunner.checkpoint import StatePaths

        seen = StatePaths.for_output(plan.output, job.name, job.run.state_dir).seen
        lines.append(f"incremental:  items finished by earlier runs are left out (see {seen})")
    typer.echo("\n".join(lines))
    if dry_run:
        typer.echo(f"\nfirst request: POST {plan.url}")
        for name, value in plan.headers.items():
            typer.echo(f"  {name}: {value}")
        if plan.first_request_error is not None:
            typer.echo(f"  (the first item would not be sent: {plan.first_request_error})")
        elif plan.first_request is None:
            typer.echo("  (no rows: nothing would be sent)")
        else:
            body = plan.first_request_preview
            if body is None:
                body = orjson.dumps(
                    orjson.loads(plan.first_request), option=orjson.OPT_INDENT_2
                ).decode()
            if len(body) > SHOWN_BODY_CHARS:
                body = body[:SHOWN_BODY_CHARS] + f"\n  ... ({len(body):,} characters in all)"
            typer.echo(body)
        typer.echo("\ndry run: nothing was sent")


def _describe_concurrency(job: Job) -> str:
    batch = job.batch
    text = (
        f"auto (up to {batch.max_concurrency})"
        if batch.concurrency == "auto"
        else str(batch.concurrency)
    )
    if batch.rate_limit:
        text += f", at most {batch.rate_limit:g} requests/s"
    return text


class _JsonFormatter(logging.Formatter):
    """One JSON object a line; a record's ``fields`` (``extra={"fields": {...}}``) join it."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update(fields)
        return orjson.dumps(document, default=str).decode()


class _ConsoleHandler(logging.Handler):
    """Writes log lines through the rich console, so they scroll above the live display."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        from rich.text import Text

        try:
            # Text: a message is never read as rich markup ("[x]" stays "[x]").
            self._console.print(Text(self.format(record)), soft_wrap=True)
        except Exception:
            self.handleError(record)


def _configure_logging(log_format: LogFormat, console: Console | None = None) -> None:
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if console is None else _ConsoleHandler(console)
    )
    if log_format is LogFormat.json:
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        formatter.converter = time.localtime
        handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def main() -> None:
    """The console script."""
    lean_process(sys.argv[1:])
    app()
