"""How a run looks to a person: progress figures, the summary table, the plan.

Builds text and rich renderables from a ``StatsSnapshot``, a run summary or a ``Plan``, and
never prints (``cli`` does). The live display, the periodic log line and that line's JSON
fields show the same figures, read from the same snapshot. How an output looks
(``inspect``) is ``outputview``'s, with the same summary table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from batchrunner.report import StatsSnapshot
from batchrunner.summary import RowCounts, RunSummary

if TYPE_CHECKING:  # rich is imported where a terminal needs it: a run's start-up does not
    from rich.console import RenderableType
    from rich.table import Table

    from batchrunner.job.settings import Job
    from batchrunner.wiring import Plan

OUTCOME_TITLES = {
    "done": "done",
    "too_many_errors": "done, with too many errors",
    "aborted": "aborted",
}
SHOWN_BODY_CHARS = 2000  # the first request shown by --dry-run, at most
EXAMPLE_CHARS = 120  # an error message shown as an example, in a table
BAR_WIDTH = 24

Rows = list[tuple[str, str]]


# --- progress -------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour up."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, whole_seconds = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{whole_seconds:02d}"
    return f"{minutes}:{whole_seconds:02d}"


def progress_line(snapshot: StatsSnapshot) -> str:
    """The figures of a snapshot as one line of text (a log line, the live display's text)."""
    fraction = snapshot.fraction_done
    done = f"{snapshot.rows_done:,}"
    if snapshot.total is not None:
        done += f" of {'~' if snapshot.total_estimated else ''}{snapshot.total:,}"
    done += " rows"
    if fraction is not None:
        done += f" ({math.floor(fraction * 100)}%)"  # floor: 100% only when it is
    parts = [
        done,
        f"{snapshot.rows_per_second:,.0f} rows/s",
        f"{snapshot.in_flight:,} in flight",
        f"{snapshot.retries:,} retries",
        f"{snapshot.rows_error:,} errors",
    ]
    eta = snapshot.eta_s
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return ", ".join(parts)


def progress_fields(snapshot: StatsSnapshot) -> dict[str, Any]:
    """The figures of a snapshot as JSON-ready fields (a JSON log line)."""
    eta = snapshot.eta_s
    return {
        "rows_done": snapshot.rows_done,
        "rows_total": snapshot.total,
        "rows_total_estimated": snapshot.total_estimated,
        "rows_ok": snapshot.rows_ok,
        "rows_error": snapshot.rows_error,
        "rows_per_second": round(snapshot.rows_per_second, 1),
        "in_flight": snapshot.in_flight,
        "requests": snapshot.requests,
        "retries": snapshot.retries,
        "elapsed_s": round(snapshot.elapsed_s, 3),
        "eta_s": None if eta is None else round(eta, 1),
    }


class ProgressView:
    """The live display: a bar when the total is known, else a spinner; and the figures.

    Give it to ``rich.live.Live``, which draws it on every refresh; ``update`` hands it the
    latest snapshot. The spinner lives as long as the view, so that it turns.
    """

    def __init__(self, job_name: str) -> None:
        self.job_name = job_name
        from rich.spinner import Spinner

        self.snapshot: StatsSnapshot | None = None
        self._spinner = Spinner("dots")

    def update(self, snapshot: StatsSnapshot) -> None:
        self.snapshot = snapshot

    def __rich__(self) -> RenderableType:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        grid = Table.grid(padding=(0, 1))
        snapshot = self.snapshot
        if snapshot is None:
            grid.add_row(self._spinner, Text(f"{self.job_name}: starting"))
            return grid
        indicator: RenderableType = self._spinner
        if snapshot.fraction_done is not None:
            indicator = ProgressBar(
                total=snapshot.total, completed=snapshot.rows_done, width=BAR_WIDTH
            )
        grid.add_row(indicator, Text(f"{self.job_name}: {progress_line(snapshot)}"))
        return grid


# --- the run summary ------------------------------------------------------------------------------


def summary_title(summary: RunSummary) -> str:
    outcome = summary.outcome or "?"
    return f"{summary.job or '?'}: {OUTCOME_TITLES.get(outcome, outcome)}"


def summary_rows(summary: RunSummary, summary_path: object | None = None) -> Rows:
    """The run summary as (label, value) rows: the end of a run, and ``inspect``.

    A summary written by another version may lack a figure: it shows as zero or "?".
    """
    counts = summary.rows
    latency = summary.latency_ms
    rate = summary.rows_per_second
    rows: Rows = [
        ("run", f"{summary.run_id or '?'}, started {summary.started or '?'}"),
        ("rows", _rows_text(counts)),
        (
            "throughput",
            f"{'-' if rate is None else format(rate, ',.0f')} rows/s "
            f"({counts.total:,} rows in {_elapsed(summary.elapsed_s or 0.0)}); "
            f"{summary.requests:,} requests, {summary.retries:,} retries",
        ),
    ]
    if latency.p50 is None:
        rows.append(("latency", "no answers"))
    else:
        shown = (("p50", latency.p50), ("p95", latency.p95), ("p99", latency.p99))
        rows.append(("latency", ", ".join(f"{p} {v or 0:,.1f} ms" for p, v in shown)))
    tokens = summary.tokens
    if tokens is not None:
        rate = tokens.per_second
        rows.append(
            (
                "tokens",
                f"{tokens.tokens_in:,} in, {tokens.tokens_out:,} out"
                + ("" if rate is None else f" ({rate:,.0f} tokens/s)"),
            )
        )
    for number, (kind, tally) in enumerate(summary.errors):
        rows.append(
            (
                "errors" if number == 0 else "",
                _error_kind_text(kind, tally.rows, tally.example_key, tally.example),
            )
        )
    retry = summary.retry
    if retry is not None:
        rows.append(
            (
                "retried",
                f"{retry.retried:,} error rows of {retry.source or '?'}: "
                f"{retry.now_ok:,} now ok, {retry.still_error:,} still failing",
            )
        )
    rows.append(("output", summary.output or "?"))
    if summary_path is not None:
        rows.append(("summary", str(summary_path)))
    return rows


def _rows_text(counts: RowCounts) -> str:
    skipped = counts.skipped
    if not counts.total and skipped:
        # input.incremental, a night with no new or changed item: the usual figures are zeros
        return f"nothing new: {skipped:,} items already done"
    return f"{counts.ok:,} ok, {counts.error:,} errors, {skipped:,} skipped"


def _elapsed(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 60 else format_duration(seconds)


def _error_kind_text(kind: str, rows: int, key: str | None, message: str | None) -> str:
    return f"{kind}: {_error_tally_text(rows, key, message)}"


def _error_tally_text(rows: int, key: str | None, message: str | None) -> str:
    text = f"{rows:,} rows"
    if key is not None:
        text += f", e.g. key {key}"
        if message:
            text += f": {shorten(message, EXAMPLE_CHARS)}"
    return text


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def plain_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A title, then one indented ``label  value`` line per row, the values aligned."""
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join([title, *(f"  {label:<{width}}  {value}".rstrip() for label, value in rows)])


def rich_table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    """The same rows as ``plain_table``, as a rich table for a terminal."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False, box=box.ROUNDED)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    return table


def plan_text(plan: Plan, *, dry_run: bool) -> str:
    """What ``validate`` shows of a job's plan; with ``dry_run``, the first request too."""
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
        f"service:      {plan.url} ({job.service.protocol}), {describe_concurrency(job)} in flight",
        f"auth:         {plan.auth}",
        f"output:       {plan.output}",
    ]
    if plan.storage is not None:
        lines.append(f"storage:      {plan.storage}")
    if job.input.incremental:
        from batchrunner.checkpoint import StatePaths

        seen = StatePaths.for_output(plan.output, job.name, job.run.state_dir).seen
        lines.append(f"incremental:  items finished by earlier runs are left out (see {seen})")
    if dry_run:
        lines.append(f"\nfirst request: POST {plan.url}")
        for name, value in plan.headers.items():
            lines.append(f"  {name}: {value}")
        if plan.first_request_error is not None:
            lines.append(f"  (the first item would not be sent: {plan.first_request_error})")
        elif plan.first_request is None:
            lines.append("  (no rows: nothing would be sent)")
        else:
            body = plan.first_request_preview
            if body is None:
                body = orjson.dumps(
                    orjson.loads(plan.first_request), option=orjson.OPT_INDENT_2
                ).decode()
            if len(body) > SHOWN_BODY_CHARS:
                body = body[:SHOWN_BODY_CHARS] + f"\n  ... ({len(body):,} characters in all)"
            lines.append(body)
        lines.append("\ndry run: nothing was sent")
    return "\n".join(lines)


def describe_concurrency(job: Job) -> str:
    batch = job.batch
    text = (
        f"auto (up to {batch.max_concurrency})"
        if batch.concurrency == "auto"
        else str(batch.concurrency)
    )
    if batch.rate_limit:
        text += f", at most {batch.rate_limit:g} requests/s"
    return text
