"""The command line: a thin typer app over the library; the only place that prints or exits.

One module a group of commands (``running``: run, retry, validate; ``serving``; ``scheduling``:
cron; ``inspecting``), on the app and helpers of ``common``.

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

import sys
from typing import Annotated, Any

from batchrunner.startup import arrow_pool_first, lean_process

arrow_pool_first()  # before the commands' modules bring pyarrow in

import typer  # noqa: E402

from batchrunner import __version__  # noqa: E402
from batchrunner.cli import inspecting, running, scheduling, serving  # noqa: E402
from batchrunner.cli.common import app, log  # noqa: E402

__all__ = ["app", "inspecting", "main", "running", "scheduling", "serving"]


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


def main() -> None:
    """The console script."""
    lean_process(sys.argv[1:])
    app()
