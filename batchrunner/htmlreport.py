"""``inspect --html``: one self-contained HTML page about a run and its output.

The page holds the run's summary, throughput over time (from the summary's timeline), the
latency distribution (from the rows' ``_latency_ms``), errors by kind with samples, and the
result fields' most frequent values. Charts are inline SVG and the style sheet is inline:
the file loads nothing from anywhere (it can be mailed, or opened on a machine offline).
Every value from the output is HTML-escaped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import suppress
from html import escape
from pathlib import Path
from typing import Any

from batchrunner.errors import InputError
from batchrunner.inspection import FieldCounts, Inspection, count_values
from batchrunner.report import LatencySummary
from batchrunner.summary import RunSummary, Timeline

CHART_WIDTH = 720
CHART_HEIGHT = 180
SHOWN_VALUES = 10  # per result field
COUNTED_FIELDS = 20  # result fields whose values the report counts
SHOWN_ERROR_ROWS = 10
VALUE_CHARS = 80

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2933;
       margin: 0; background: #f5f7fa; }
main { max-width: 980px; margin: 0 auto; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d9e2ec; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 16px 0 6px; }
.sub { color: #52606d; margin: 0 0 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #d9e2ec; border-radius: 8px; padding: 10px 14px;
        min-width: 120px; }
.card b { display: block; font-size: 20px; }
.card span { color: #52606d; font-size: 12px; }
.ok b { color: #1f7a4d; } .error b { color: #b42318; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e4e7eb;
         vertical-align: top; }
th { background: #eef2f7; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font: 12px ui-monospace, Menlo, Consolas, monospace; word-break: break-all; }
svg { background: #fff; border: 1px solid #d9e2ec; border-radius: 8px; }
svg text { font: 11px system-ui, sans-serif; fill: #52606d; }
.outcome-done { color: #1f7a4d; } .outcome-too_many_errors, .outcome-aborted { color: #b42318; }
.empty { color: #7b8794; font-style: italic; }
"""


def write_report(inspection: Inspection, path: Path) -> None:
    """Count the result fields' values and write the page to ``path`` (aside, renamed);
    ``InputError`` when it cannot be written."""
    fields = [name for name, _ in inspection.fields[:COUNTED_FIELDS]]
    counts = [count_values(inspection.path, name) for name in fields]
    page = render_report(inspection, counts)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(page, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        raise InputError(f"--html: cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with suppress(OSError):  # nothing was written aside, or it is gone
            temporary.unlink(missing_ok=True)


def render_report(
    inspection: Inspection, field_counts: Sequence[FieldCounts], *, title: str | None = None
) -> str:
    """The page, as text: write it to a ``.html`` file."""
    summary = inspection.summary
    heading = title or f"{summary.job if summary else inspection.path.name}: batchrunner report"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No network: nothing may be loaded, whatever the output holds.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        f"<title>{escape(heading)}</title><style>{_STYLE}</style></head><body><main>",
        f"<h1>{escape(heading)}</h1>",
        _subtitle(inspection, summary),
        _cards(inspection, summary),
        "<h2>Throughput over time</h2>",
        _throughput(summary),
        "<h2>Latency distribution</h2>",
        _latency(inspection),
        "<h2>Errors by kind</h2>",
        _errors(inspection),
        "<h2>Result fields</h2>",
        _fields(inspection, field_counts),
        "<h2>Run summary</h2>",
        _summary_table(summary),
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _subtitle(inspection: Inspection, summary: RunSummary | None) -> str:
    bits = [f"output <code>{escape(str(inspection.path))}</code>"]
    if summary is not None:
        outcome = summary.outcome or "unknown"
        bits.append(
            f'outcome <b class="outcome-{escape(outcome)}">{escape(outcome.replace("_", " "))}</b>'
        )
        bits.append(f"run {escape(summary.run_id or '?')}")
        bits.append(f"started {escape(summary.started or '?')}")
    else:
        bits.append("no run summary found (not written by batchrunner run)")
    return f'<p class="sub">{" · ".join(bits)}</p>'


def _cards(inspection: Inspection, summary: RunSummary | None) -> str:
    statuses = dict(inspection.statuses)
    latency = summary.latency_ms if summary is not None else LatencySummary()
    rate = summary.rows_per_second if summary is not None else None
    cards = [
        ("rows", f"{inspection.rows:,}", ""),
        ("ok", f"{statuses.get('ok', 0):,}", "ok"),
        ("errors", f"{statuses.get('error', 0):,}", "error"),
        ("rows/s", "-" if rate is None else f"{rate:,.0f}", ""),
        ("elapsed", f"{summary.elapsed_s or 0:,.1f} s" if summary else "-", ""),
        ("p50 latency", _ms(latency.p50), ""),
        ("p99 latency", _ms(latency.p99), ""),
        ("requests", f"{summary.requests:,}" if summary else "-", ""),
        ("retries", f"{summary.retries:,}" if summary else "-", ""),
    ]
    inner = "".join(
        f'<div class="card {kind}"><b>{escape(value)}</b><span>{escape(label)}</span></div>'
        for label, value, kind in cards
    )
    return f'<div class="cards">{inner}</div>'


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):,.1f} ms"


def _throughput(summary: RunSummary | None) -> str:
    timeline = summary.timeline if summary is not None else Timeline()
    rows = list(timeline.rows)
    bucket = float(timeline.bucket_s or 1.0)
    if not rows:
        return '<p class="empty">No timeline in the summary (a run of an older version).</p>'
    rates = [n / bucket for n in rows]
    labels = [f"{index * bucket:g} s" for index in range(len(rates))]
    caption = (
        f"Rows finished per second, in buckets of {bucket:g} s "
        f"({len(rates)} buckets, peak {max(rates):,.0f} rows/s)."
    )
    return _bar_chart(rates, labels, "throughput", "#2f80ed", caption, label_every=_every(rates))


def _latency(inspection: Inspection) -> str:
    from batchrunner.outputview import latency_histogram_rows

    rows = latency_histogram_rows(inspection.latency_bins)
    if not rows:
        return '<p class="empty">No latencies in the output (no request was answered).</p>'
    caption = "Rows by the latency of the request that answered them (last attempt)."
    return _bar_chart(
        [float(n) for _, n in rows], [label for label, _ in rows], "latency", "#16a394", caption
    )


def _every(values: Sequence[float]) -> int:
    return max(1, len(values) // 8)


def _bar_chart(
    values: Sequence[float],
    labels: Sequence[str],
    name: str,
    colour: str,
    caption: str,
    *,
    label_every: int = 1,
) -> str:
    left, bottom, top_pad = 56, 34, 12
    width = CHART_WIDTH - left - 12
    height = CHART_HEIGHT - bottom - top_pad
    peak = max(values) or 1.0
    slot = width / len(values)
    bar = max(1.0, slot * 0.8)
    shapes = []
    for fraction in (0.0, 0.5, 1.0):  # grid lines first: the bars are drawn over them
        y = top_pad + height * (1 - fraction)
        shapes.append(
            f'<line x1="{left}" x2="{left + width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e7eb"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{peak * fraction:,.0f}</text>'
        )
    for index, value in enumerate(values):
        h = height * value / peak
        x = left + index * slot + (slot - bar) / 2
        y = top_pad + height - h
        shapes.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
            f"<title>{escape(labels[index])}: {value:,.1f}</title></rect>"
        )
        if index % label_every == 0:
            shapes.append(
                f'<text x="{left + index * slot + slot / 2:.1f}" y="{CHART_HEIGHT - 14}" '
                f'text-anchor="middle">{escape(labels[index])}</text>'
            )
    return (
        f'<figure><svg id="{name}" role="img" aria-label="{escape(caption)}" '
        f'width="{CHART_WIDTH}" height="{CHART_HEIGHT}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(shapes)}</svg>'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _errors(inspection: Inspection) -> str:
    if not inspection.error_kinds:
        return '<p class="empty">No error rows.</p>'
    rows = "".join(
        f'<tr><td><code>{escape(kind.kind)}</code></td><td class="n">{kind.rows:,}</td>'
        f"<td><code>{escape(str(kind.example_key))}</code></td>"
        f"<td>{escape(_cut(kind.example_message or ''))}</td></tr>"
        for kind in inspection.error_kinds
    )
    table = (
        "<table><tr><th>kind</th><th>rows</th><th>example key</th><th>example message</th></tr>"
        f"{rows}</table>"
    )
    samples = inspection.error_rows[:SHOWN_ERROR_ROWS]
    if samples:
        sample_rows = "".join(
            f"<tr><td><code>{escape(str(row.key))}</code></td>"
            f"<td><code>{escape(row.kind or '-')}</code></td>"
            f"<td>{escape(_cut(row.message or ''))}</td></tr>"
            for row in samples
        )
        table += (
            f"<h3>The first {len(samples)} error rows</h3>"
            f"<table><tr><th>key</th><th>kind</th><th>message</th></tr>{sample_rows}</table>"
        )
    return table


def _fields(inspection: Inspection, field_counts: Sequence[FieldCounts]) -> str:
    if not field_counts:
        return '<p class="empty">No result fields.</p>'
    types = dict(inspection.fields)
    sections = []
    for counts in field_counts:
        distinct = len(counts.counts)
        shown = counts.counts[:SHOWN_VALUES]
        top = max((n for _, n in shown), default=1) or 1
        body = "".join(
            f"<tr><td><code>{escape(_cut(value) if value is not None else 'null')}</code></td>"
            f'<td class="n">{n:,}</td><td class="n">{n / counts.rows:.1%}</td>'
            f'<td><svg width="160" height="10" style="border:0"><rect width="{160 * n / top:.1f}" '
            f'height="10" fill="#9aa5b1"/></svg></td></tr>'
            for value, n in shown
        )
        more = (
            f'<tr><td colspan="4" class="empty">and {distinct - len(shown):,} more values</td></tr>'
            if distinct > len(shown)
            else ""
        )
        sections.append(
            f"<h3><code>{escape(counts.field)}</code> "
            f"<small>({escape(types.get(counts.field, '?'))}, {distinct:,} distinct)</small></h3>"
            f"<table><tr><th>value</th><th>rows</th><th>share</th><th></th></tr>{body}{more}"
            "</table>"
        )
    return "".join(sections)


def _summary_table(summary: RunSummary | None) -> str:
    from batchrunner.display import summary_rows

    if summary is None:
        return '<p class="empty">No run summary.</p>'
    rows = "".join(
        f"<tr><th>{escape(label)}</th><td>{escape(value)}</td></tr>"
        for label, value in summary_rows(summary)
    )
    return f"<table>{rows}</table>"


def _cut(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= VALUE_CHARS * 3 else flat[: VALUE_CHARS * 3 - 1] + "…"
