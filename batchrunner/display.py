"""How runs and outputs look to a person: progress figures, the summary table, an inspection.

Builds text and rich renderables from a ``StatsSnapshot``, a run summary, a ``Plan`` or an
``Inspection``, and never prints (``cli`` does). The live display, the periodic log line and
that line's JSON fields show the same figures, read from the same snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from batchrunner.report import StatsSnapshot
from batchrunner.summary import RowCounts, RunSummary, Timeline

if TYPE_CHECKING:  # rich is imported where a terminal needs it: a run's start-up does not
    from rich.console import RenderableType
    from rich.table import Table

    from batchrunner.inspection import FieldCounts, HeadRows, Inspection
    from batchrunner.job import Job
    from batchrunner.wiring import Plan

OUTCOME_TITLES = {
    "done": "done",
    "too_many_errors": "done, with too many errors",
    "aborted": "aborted",
}
SHOWN_BODY_CHARS = 2000  # the first request shown by --dry-run, at most
EXAMPLE_CHARS = 120  # an error message shown as an example, in a table
MESSAGE_CHARS = 500  # an error message listed by `inspect --errors`
SHOWN_ERROR_KINDS = 10
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


# --- an inspection --------------------------------------------------------------------------------


def inspection_text(inspection: Inspection) -> str:
    """What ``batchrunner inspect`` shows of a file, as plain text."""
    sections = [f"{inspection.path}: {inspection.rows:,} rows"]
    folder = inspection.path.is_dir()
    beside = folder or inspection.path.suffix.lower() in (".csv", ".jsonl")
    if inspection.summary is not None:
        where = f"{inspection.path.name}.summary.json" if beside else "the file's metadata"
        title = f"run summary (from {where}): {summary_title(inspection.summary)}"
        sections.append(plain_table(title, summary_rows(inspection.summary)))
    elif beside:
        what = "folder" if folder else "file"
        sections.append(
            f"run summary: none (no {inspection.path.name}.summary.json beside the {what})"
        )
    else:
        sections.append("run summary: none in the file's metadata (not written by batchrunner run)")
    sections.append(
        plain_table("rows by status", [(status, f"{n:,}") for status, n in inspection.statuses])
    )
    if inspection.duplicate_keys:
        sections.append(
            f"duplicate keys: {inspection.duplicate_keys:,} rows repeat an earlier row's _key"
        )
    kinds = inspection.error_kinds
    if kinds:
        rows = [
            (k.kind, _error_tally_text(k.rows, k.example_key, k.example_message))
            for k in kinds[:SHOWN_ERROR_KINDS]
        ]
        if len(kinds) > SHOWN_ERROR_KINDS:
            rows.append(("", f"(and {len(kinds) - SHOWN_ERROR_KINDS} more kinds)"))
        sections.append(plain_table("error kinds", rows))
    fields = inspection.fields
    sections.append(plain_table("result fields", list(fields) or [("(none)", "")]))
    return "\n\n".join(sections)


def error_rows_text(inspection: Inspection) -> str:
    """The error rows ``inspect --errors`` lists: key, kind and message, one a line."""
    shown = inspection.error_rows
    total = sum(k.rows for k in inspection.error_kinds)
    if not shown:
        return "error rows: none"
    rows = [
        (f"key {row.key}", f"{row.kind or '-'}: {shorten(row.message or '', MESSAGE_CHARS)}")
        for row in shown
    ]
    title = f"error rows ({len(shown):,} of {total:,})" if total > len(shown) else "error rows"
    return plain_table(title, rows)


# --- the results themselves -----------------------------------------------------------------------

CELL_CHARS = 24  # a value shown by `inspect --head`
COUNT_BAR_WIDTH = 20


def cell_text(value: Any, limit: int = CELL_CHARS) -> str:
    """A value as one short cell: null as ``-``, nested values as JSON, long text cut."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list | dict):
        import orjson

        text = orjson.dumps(value, default=str).decode()
    else:
        text = str(value)
    return shorten(text, limit)


def head_text(head: HeadRows) -> str:
    """``inspect --head``: the first rows as an aligned table, one row a line."""
    shown = len(head.rows)
    title = f"{head.path}: first {shown:,} of {head.total:,} rows"
    if not shown:
        return f"{head.path}: no rows"
    cells = [list(head.columns), *([cell_text(v) for v in row] for row in head.rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(head.columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]
    return "\n".join([title, *("  " + line for line in lines)])


def counts_text(counts: FieldCounts, limit: int) -> str:
    """``inspect --counts FIELD``: each value, its rows, share and a bar; most rows first."""
    distinct = len(counts.counts)
    title = (
        f"{counts.field} in {counts.path}: {counts.rows:,} rows, "
        f"{distinct:,} distinct value{'' if distinct == 1 else 's'}"
    )
    shown = counts.counts[:limit]
    if not shown:
        return title
    top = shown[0][1]
    rows = []
    for value, number in shown:
        share = number / counts.rows if counts.rows else 0.0
        bar = "█" * max(1, round(COUNT_BAR_WIDTH * number / top)) if number else ""
        rows.append(
            (cell_text(value, EXAMPLE_CHARS), f"{number:>{len(f'{top:,}')},}  {share:6.1%}  {bar}")
        )
    if distinct > len(shown):
        rest = sum(n for _, n in counts.counts[len(shown) :])
        rows.append((f"(and {distinct - len(shown):,} more)", f"{rest:,}"))
    return plain_table(title, rows)


# --- charts in the terminal -----------------------------------------------------------------------

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 60
HISTOGRAM_WIDTH = 40


def throughput_series(summary: RunSummary | None) -> tuple[list[float], float]:
    """Rows per second in each bucket of the summary's timeline, and the bucket's seconds."""
    timeline = summary.timeline if summary is not None else Timeline()
    bucket = float(timeline.bucket_s or 1.0)
    return [n / bucket for n in timeline.rows], bucket


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """``values`` as one line of block characters (averaged down to ``width``)."""
    if not values:
        return ""
    if len(values) > width:  # each mark: the mean of its share of the buckets
        step = len(values) / width
        spans = [
            values[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)]
            for i in range(width)
        ]
        values = [sum(span) / len(span) for span in spans]
    top = max(values)
    if top <= 0:
        return SPARK_BLOCKS[0] * len(values)
    last = len(SPARK_BLOCKS) - 1
    return "".join(SPARK_BLOCKS[min(last, round(v / top * last))] for v in values)


def latency_label(low: float, high: float | None) -> str:
    """A latency bin, short: ``20-50 ms``, ``500 ms-1 s``, ``2-5 s``, ``>= 30 s``."""

    def ms(value: float) -> str:
        return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"

    if high is None:
        return f">= {ms(low)}"
    if (low >= 1000) == (high >= 1000):  # one unit for both ends
        number = ms(low).split()[0]
        return f"{number}-{ms(high)}"
    return f"{ms(low)}-{ms(high)}"


def latency_histogram_rows(
    bins: Sequence[tuple[float, float | None, int]],
) -> list[tuple[str, int]]:
    """The bins from the first to the last with rows in them, as (label, rows)."""
    used = [i for i, (_, _, rows) in enumerate(bins) if rows]
    if not used:
        return []
    return [(latency_label(low, high), rows) for low, high, rows in bins[used[0] : used[-1] + 1]]


def charts_text(inspection: Inspection) -> str:
    """The throughput sparkline and the latency histogram as plain text ('' if neither)."""
    sections = []
    rates, bucket = throughput_series(inspection.summary)
    if rates:
        seconds = bucket * len(rates)
        sections.append(
            f"throughput (rows/s over {_elapsed(seconds)}; peak {max(rates):,.0f})\n  "
            + sparkline(rates)
        )
    rows = latency_histogram_rows(inspection.latency_bins)
    if rows:
        top = max(n for _, n in rows)
        width = max(len(label) for label, _ in rows)
        lines = [
            f"  {label:>{width}}  {_bar(n, top):<{HISTOGRAM_WIDTH}}  {n:,}" for label, n in rows
        ]
        sections.append("latency (rows by their request's latency)\n" + "\n".join(lines))
    return "\n\n".join(sections)


def charts_renderable(inspection: Inspection) -> RenderableType | None:
    """The same charts for a terminal, drawn by rich (colours, a box)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    parts: list[RenderableType] = []
    rates, _ = throughput_series(inspection.summary)
    if rates:
        parts.append(Text("throughput, rows/s", style="bold"))
        parts.append(Text(sparkline(rates), style="green"))
        parts.append(Text(f"peak {max(rates):,.0f} rows/s over {len(rates)} buckets", style="dim"))
    rows = latency_histogram_rows(inspection.latency_bins)
    if rows:
        top = max(n for _, n in rows)
        width = max(len(label) for label, _ in rows)
        parts.append(Text("latency, rows", style="bold"))
        for label, n in rows:
            line = Text(f"{label:>{width}}  ")
            line.append(_bar(n, top), style="cyan")
            line.append(f"  {n:,}")
            parts.append(line)
    return Panel(Group(*parts), title="charts", title_align="left") if parts else None


def _bar(rows: int, top: int) -> str:
    return "█" * max(1, round(HISTOGRAM_WIDTH * rows / top)) if rows else ""


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
