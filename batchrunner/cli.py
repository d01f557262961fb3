"""The command line: a thin typer app over the library; the only place that prints or exits.

Exit codes: 0 done; 1 done but the error rate is above ``max_error_rate``; 2 the job or its
input is invalid (nothing sent); 3 aborted by the service (e.g. the token is refused);
75 another run holds the job's lock; 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer

from batchrunner import __version__
from batchrunner.errors import BatchRunnerError, SettingError
from batchrunner.job import OPTION_SETTINGS, Job, load_job
from batchrunner.report import StatsSnapshot

EXIT_OK = 0
EXIT_TOO_MANY_ERRORS = 1
EXIT_INVALID = 2
EXIT_ABORTED = 3
EXIT_INTERRUPTED = 130
SHOWN_BODY_CHARS = 2000

app = typer.Typer(
    name="batchrunner",
    help="Run a model deployed as a REST inference service over a whole dataset.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def _fail(error: BatchRunnerError) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(error.exit_code)


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


@app.command()
def run(
    job_file: Annotated[
        Path | None, typer.Argument(help="The job file (TOML). Optional with --input and --url.")
    ] = None,
    input: Annotated[str | None, typer.Option(help="Input file, folder or glob.")] = None,
    output: Annotated[
        str | None, typer.Option(help="Output Parquet path ({name} {date} {time} {run_id}).")
    ] = None,
    url: Annotated[str | None, typer.Option(help="Service URL, or embedded:<model>.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight.")] = None,
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
            "--progress/--no-progress", help="Show progress (default: when stderr is a terminal)."
        ),
    ] = None,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="Log lines as text or JSON objects.")
    ] = LogFormat.text,
) -> None:
    """Run a job: read the input, call the service, write one Parquet file of results."""
    _configure_logging(log_format)
    overrides = {
        OPTION_SETTINGS["input"]: input,
        OPTION_SETTINGS["output"]: output,
        OPTION_SETTINGS["url"]: url,
        OPTION_SETTINGS["concurrency"]: concurrency,
        OPTION_SETTINGS["batch_size"]: batch_size,
    }
    from batchrunner.runner import OUTCOME_ABORTED, OUTCOME_DONE, plan_job, run_job

    try:
        job = _load(job_file, overrides, set_ or [])
        if dry_run:
            _show_plan(plan_job(job, limit=limit), dry_run=True)
            return
        show_progress = sys.stderr.isatty() if progress is None else progress
        result = run_job(
            job,
            limit=limit,
            on_progress=_progress_printer(show_progress),
            progress_interval=1.0 if show_progress else 10.0,
        )
    except BatchRunnerError as error:
        _fail(error)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if show_progress:
        typer.echo("", err=True)
    typer.echo(_summary_paragraph(result.summary, result.summary_path), err=True)
    if result.outcome == OUTCOME_ABORTED:
        typer.echo(f"error: run aborted: {result.abort_reason}", err=True)
        raise typer.Exit(EXIT_ABORTED)
    if result.outcome != OUTCOME_DONE:
        rate = result.summary["error_rate"]
        typer.echo(
            f"error rate {rate:.2%} is above max_error_rate {job.max_error_rate:.2%}; "
            "the output was written (see the error rows' _error column)",
            err=True,
        )
        raise typer.Exit(EXIT_TOO_MANY_ERRORS)


@app.command()
def validate(
    job_file: Annotated[Path, typer.Argument(help="The job file (TOML).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: section.key=value.")
    ] = None,
) -> None:
    """Check a job file and its input, and print the plan. Sends nothing."""
    from batchrunner.runner import plan_job

    try:
        plan = plan_job(load_job(job_file, assignments=set_ or []))
    except BatchRunnerError as error:
        _fail(error)
    _show_plan(plan, dry_run=False)
    typer.echo("job is valid")


SERVE_TOKEN_ENV = "BATCHRUNNER_SERVE_TOKEN"
SERVE_IAM_PASSWORD_ENV = "BATCHRUNNER_SERVE_IAM_PASSWORD"


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="The model to serve: iris.")] = "iris",
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
) -> None:
    """Run the embedded reference service (a real model behind the ModelArts protocol).

    The token is read from BATCHRUNNER_SERVE_TOKEN; if unset, a random one is made and shown.
    With --iam-user, the service also issues expiring tokens to that user (password in
    BATCHRUNNER_SERVE_IAM_PASSWORD, never on the command line) and accepts them.
    """
    from batchrunner.service import IamAccount, RunningService, ServiceOptions
    from batchrunner.service import serve as serve_forever

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
    options = ServiceOptions(model=model, token=token, iam=account, token_ttl=token_ttl)

    def ready(service: RunningService) -> None:
        typer.echo(f"serving model {model!r} at {service.url}")
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
        typer.echo("press Ctrl-C to stop")

    try:
        serve_forever(options, host, port, on_ready=ready)
    except ValueError as error:
        _fail(SettingError(f"--model: {error}"))
    except OSError as error:
        typer.echo(f"error: cannot listen on {host}:{port}: {error.strerror}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    except KeyboardInterrupt:
        pass


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
        f"key:          {job.input.id_column or 'row number'}",
        f"rows:         {rows} in {batches} requests of up to {job.batch.size}",
        f"service:      {plan.url} ({job.service.protocol}), {job.batch.concurrency} in flight",
        f"auth:         {plan.auth}",
        f"output:       {plan.output}",
    ]
    typer.echo("\n".join(lines))
    if dry_run:
        typer.echo(f"\nfirst request: POST {plan.url}")
        for name, value in plan.headers.items():
            typer.echo(f"  {name}: {value}")
        if plan.first_request is None:
            typer.echo("  (no rows: nothing would be sent)")
        else:
            body = orjson.dumps(
                orjson.loads(plan.first_request), option=orjson.OPT_INDENT_2
            ).decode()
            if len(body) > SHOWN_BODY_CHARS:
                body = body[:SHOWN_BODY_CHARS] + f"\n  ... ({len(body):,} characters in all)"
            typer.echo(body)
        typer.echo("\ndry run: nothing was sent")


def _summary_paragraph(summary: dict[str, Any], summary_path: Path) -> str:
    rows = summary["rows"]
    latency = summary["latency_ms"]
    rate = summary["rows_per_second"]
    text = (
        f"{summary['job']}: {rows['total']:,} rows, {rows['ok']:,} ok, {rows['error']:,} errors "
        f"in {summary['elapsed_s']:.1f} s"
    )
    if rate:
        text += f" ({rate:,.0f} rows/s)"
    text += f"; {summary['requests']:,} requests, {summary['retries']:,} retries"
    if latency["p50"] is not None:
        text += (
            f"; latency p50 {latency['p50']} ms, p95 {latency['p95']} ms, p99 {latency['p99']} ms"
        )
    text += "."
    for kind, tally in summary["errors"].items():
        text += (
            f" {kind}: {tally['rows']:,} rows (e.g. key {tally['example_key']}: "
            f"{tally['example']})."
        )
    text += f" Output: {summary['output']} (summary: {summary_path})."
    return text


def _progress_printer(on_terminal: bool) -> Any:
    log = logging.getLogger("batchrunner")

    def show(snapshot: StatsSnapshot) -> None:
        line = (
            f"{snapshot.rows_done:,} rows done ({snapshot.rows_error:,} errors), "
            f"{snapshot.rows_per_second:,.0f} rows/s, {snapshot.in_flight} in flight, "
            f"{snapshot.retries:,} retries"
        )
        if on_terminal:
            sys.stderr.write("\r" + line + " " * 8)
            sys.stderr.flush()
        else:
            log.info("progress: %s", line)

    return show


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        return orjson.dumps(document).decode()


def _configure_logging(log_format: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format is LogFormat.json:
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        formatter.converter = time.localtime
        handler.setFormatter(formatter)
    logger = logging.getLogger("batchrunner")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main() -> None:
    """The console script."""
    app()
