"""``cron``: a job's line in the crontab, installed or removed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from batchrunner.errors import (
    BatchRunnerError,
    ScheduleError,
)
from batchrunner.job.loading import load_job
from batchrunner.job.service import DEFAULT_OPENAI_KEY_ENV, DEFAULT_TOKEN_ENV
from batchrunner.job.settings import Job

if TYPE_CHECKING:
    from batchrunner.schedule import Schedule

from batchrunner.cli.common import (
    app,
    fail,
)


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
        fail(error)
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
    openai = service.openai
    if service.token_source == "api_key" and not (openai and openai.api_key_file):
        envs[(openai and openai.api_key_env) or DEFAULT_OPENAI_KEY_ENV] = "its API key"
    return envs
