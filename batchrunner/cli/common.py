"""What every command shares: the typer app, log setup, how errors and notes are said, the
run summary shown."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
import typer

from batchrunner.errors import (
    BatchRunnerError,
    SettingError,
)
from batchrunner.job.loading import load_job
from batchrunner.job.settings import Job

if TYPE_CHECKING:
    from rich.console import Console

    from batchrunner.storage import ObjectPath
    from batchrunner.summary import RunSummary


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


def fail(error: BatchRunnerError, log_format: LogFormat = LogFormat.text) -> NoReturn:
    say_error(str(error), log_format)
    raise typer.Exit(error.exit_code)


def say_error(message: str, log_format: LogFormat) -> None:
    # With JSON logs (cron, log shippers) every line on stderr is a JSON object, even this.
    if log_format is LogFormat.json:
        log.error("%s", message)
    else:
        typer.echo(f"error: {message}", err=True)


def say_note(message: str, log_format: LogFormat) -> None:
    if log_format is LogFormat.json:
        log.info("%s", message)
    else:
        typer.echo(message, err=True)


def load(job_file: Path | None, overrides: dict[str, Any], assignments: list[str]) -> Job:
    if job_file is None and (
        overrides.get("input.path") is None or overrides.get("service.url") is None
    ):
        raise SettingError("give a job file, or at least --input and --url (and --output)")
    return load_job(job_file, overrides=overrides, assignments=assignments)


def stderr_console(*, force_terminal: bool) -> Console:
    from rich.console import Console

    # force_terminal: --progress asks for the live display even where stderr is no terminal.
    return Console(stderr=True, highlight=False, force_terminal=True if force_terminal else None)


def show_summary(
    summary: RunSummary, summary_path: Path | ObjectPath, log_format: LogFormat
) -> None:
    from batchrunner.display import plain_table, rich_table, summary_rows, summary_title

    # The summary is the run's product: stdout (`run job.toml > summary.txt`, `| jq`); log
    # lines and progress stay on stderr.
    if log_format is LogFormat.json:
        typer.echo(orjson.dumps(summary.to_json()).decode())
        return
    title = summary_title(summary)
    rows = summary_rows(summary, summary_path)
    if sys.stdout.isatty():
        from rich.console import Console

        Console(highlight=False).print(rich_table(title, rows))
    else:
        typer.echo(plain_table(title, rows))


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


def configure_logging(log_format: LogFormat, console: Console | None = None) -> None:
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
