"""``inspect``: an output read back, as text, charts, CSV or an HTML page."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from batchrunner.errors import (
    BatchRunnerError,
)

if TYPE_CHECKING:
    pass

from batchrunner.cli.common import (
    app,
    fail,
)
from batchrunner.job.loading import load_job

SHOWN_ERROR_ROWS_IN_HTML = 10  # inspect --html lists the first error rows


@app.command()
def inspect(
    output_file: Annotated[
        str,
        typer.Argument(
            metavar="OUTPUT",
            help="An output of batchrunner run: a file, a folder of parts, or in a bucket "
            "(s3://BUCKET/KEY, obs://BUCKET/KEY).",
        ),
    ],
    job_file: Annotated[
        Path | None,
        typer.Option(
            "--job",
            help="For an output in a bucket: reach it with this job file's [storage] "
            "(default: the standard AWS variables: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL...).",
        ),
    ] = None,
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
    from batchrunner.inspection import count_values, head_rows, inspect_output, output_path
    from batchrunner.outputview import counts_text, error_rows_text, head_text, inspection_text

    try:
        storage = load_job(job_file).storage if job_file is not None else None
        output = output_path(output_file, storage)
        if head is not None or counts is not None:
            if head is not None:
                typer.echo(head_text(head_rows(output, head)))
            if counts is not None:
                if head is not None:
                    typer.echo("")
                typer.echo(counts_text(count_values(output, counts), limit))
            return
        wanted = max(limit if errors else 0, SHOWN_ERROR_ROWS_IN_HTML if html is not None else 0)
        inspection = inspect_output(output, error_limit=wanted)
        if html is not None:
            from batchrunner.htmlreport import write_report

            write_report(inspection, html)
    except BatchRunnerError as error:
        fail(error)
    typer.echo(inspection_text(inspection))
    _show_charts(inspection)
    if html is not None:
        typer.echo(f"report written to {html}", err=True)
    if errors:
        typer.echo("")
        typer.echo(error_rows_text(inspection))


def _show_charts(inspection: Any) -> None:
    from batchrunner.outputview import charts_renderable, charts_text

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
