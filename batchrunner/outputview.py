"""How an output looks to a person (``batchrunner inspect``): its summary, rows by status
and error kinds, the error rows, the first rows, a field's counts, and the charts of its
run (throughput, latency) as text or rich renderables. Never prints (``cli`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from batchrunner.display import (
    EXAMPLE_CHARS,
    _elapsed,
    _error_tally_text,
    plain_table,
    shorten,
    summary_rows,
    summary_title,
)
from batchrunner.summary import RunSummary, Timeline

if TYPE_CHECKING:  # rich is imported where a terminal needs it
    from rich.console import RenderableType

    from batchrunner.inspection import FieldCounts, HeadRows, Inspection

MESSAGE_CHARS = 500  # an error message listed by `inspect --errors`
SHOWN_ERROR_KINDS = 10


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
