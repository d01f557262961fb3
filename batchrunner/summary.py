"""The run summary: what a finished run says of itself, typed, and as JSON.

``build_summary`` makes a ``RunSummary`` from the run's final ``StatsSnapshot``. The same
summary goes into the output file's metadata and beside it, as ``<output>.summary.json``
(``to_json``: the keys, their order and their values are a contract with users and
schedulers). ``from_json`` reads one back (``inspect``, ``retry``): a summary written by an
older version may lack the newer figures, which then read as zero or absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchrunner.report import LatencySummary, StatsSnapshot


@dataclass(frozen=True, slots=True)
class RowCounts:
    """Rows of the output by status; ``skipped``: done by earlier runs (input.incremental);
    ``resumed``: of ``ok`` and ``error``, those an interrupted run had finished."""

    total: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    resumed: int = 0


@dataclass(frozen=True, slots=True)
class ErrorFigures:
    """Error rows of one kind: how many, and the first one's key and message."""

    rows: int = 0
    example_key: str | None = None
    example: str | None = None


@dataclass(frozen=True, slots=True)
class Timeline:
    """Rows finished in each ``bucket_s`` seconds since the run started."""

    bucket_s: float = 1.0
    rows: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenFigures:
    """Language models: the tokens the run spent (JSON ``in``, ``out``), and their rate."""

    tokens_in: int = 0
    tokens_out: int = 0
    per_second: float | None = None


@dataclass(frozen=True, slots=True)
class BlockFigures:
    """A Ray run's blocks: how many, and how many an earlier run had finished."""

    total: int = 0
    reused: int = 0


@dataclass(frozen=True, slots=True)
class RetryFigures:
    """What ``batchrunner retry`` did (JSON ``from`` is ``source``)."""

    source: str = ""
    retried: int = 0
    now_ok: int = 0
    still_error: int = 0


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A finished run: counts, throughput, latency percentiles, errors by kind, the job's
    fingerprint, start and end. The optional parts are there when they apply: ``tokens``
    (language models), ``duplicate_keys`` (input.id_column not unique), ``engine``,
    ``actors`` and ``blocks`` (a Ray run), ``retry`` (``batchrunner retry``)."""

    job: str = ""
    run_id: str = ""
    outcome: str = ""
    fingerprint: str = ""
    input: str = ""
    output: str = ""
    url: str = ""
    started: str = ""
    finished: str = ""
    elapsed_s: float = 0.0
    rows: RowCounts = RowCounts()
    error_rate: float = 0.0
    max_error_rate: float = 0.0
    requests: int = 0
    retries: int = 0
    splits: int = 0
    throttled: int = 0
    rows_per_second: float | None = None
    latency_ms: LatencySummary = field(default_factory=LatencySummary)
    errors: tuple[tuple[str, ErrorFigures], ...] = ()  # by kind, most rows first
    retries_by_reason: tuple[tuple[str, int], ...] = ()
    timeline: Timeline = Timeline()
    tokens: TokenFigures | None = None
    duplicate_keys: Mapping[str, Any] | None = None
    engine: str | None = None
    actors: int | None = None
    blocks: BlockFigures | None = None
    retry: RetryFigures | None = None

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON-ready data, as ``<output>.summary.json`` holds it."""
        latency = self.latency_ms
        document: dict[str, Any] = {
            "job": self.job,
            "run_id": self.run_id,
            "outcome": self.outcome,
            "fingerprint": self.fingerprint,
            "input": self.input,
            "output": self.output,
            "url": self.url,
            "started": self.started,
            "finished": self.finished,
            "elapsed_s": self.elapsed_s,
            "rows": {
                "total": self.rows.total,
                "ok": self.rows.ok,
                "error": self.rows.error,
                "skipped": self.rows.skipped,
                "resumed": self.rows.resumed,
            },
            "error_rate": self.error_rate,
            "max_error_rate": self.max_error_rate,
            "requests": self.requests,
            "retries": self.retries,
            "splits": self.splits,
            "throttled": self.throttled,
            "rows_per_second": self.rows_per_second,
            "latency_ms": {
                "mean": latency.mean,
                "p50": latency.p50,
                "p95": latency.p95,
                "p99": latency.p99,
                "max": latency.max,
            },
            "errors": {
                kind: {"rows": e.rows, "example_key": e.example_key, "example": e.example}
                for kind, e in self.errors
            },
            "retries_by_reason": dict(self.retries_by_reason),
            # rows finished per bucket since the start: throughput over time (inspect --html)
            "timeline": {"bucket_s": self.timeline.bucket_s, "rows": list(self.timeline.rows)},
        }
        if self.tokens is not None:
            document["tokens"] = {
                "in": self.tokens.tokens_in,
                "out": self.tokens.tokens_out,
                "per_second": self.tokens.per_second,
            }
        if self.duplicate_keys is not None:
            document["duplicate_keys"] = dict(self.duplicate_keys)
        if self.engine is not None:
            document["engine"] = self.engine
        if self.actors is not None:
            document["actors"] = self.actors
        if self.blocks is not None:
            document["blocks"] = {"total": self.blocks.total, "reused": self.blocks.reused}
        if self.retry is not None:
            document["retry"] = {
                "from": self.retry.source,
                "retried": self.retry.retried,
                "now_ok": self.retry.now_ok,
                "still_error": self.retry.still_error,
            }
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RunSummary:
        """A summary read back from ``to_json``'s data. What an older version did not write
        reads as zero (counts) or absent (None, empty); ``ValueError`` when a figure there is
        of the wrong type (a damaged or foreign file)."""
        try:
            return _from_json(document)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a batchrunner run summary: {exc}") from None


def _from_json(document: Mapping[str, Any]) -> RunSummary:
    get = document.get
    rows = _section(document, "rows")
    latency = _section(document, "latency_ms")
    timeline = _section(document, "timeline")
    tokens, blocks, retry = get("tokens"), get("blocks"), get("retry")
    return RunSummary(
        job=str(get("job", "")),
        run_id=str(get("run_id", "")),
        outcome=str(get("outcome", "")),
        fingerprint=str(get("fingerprint", "")),
        input=str(get("input", "")),
        output=str(get("output", "")),
        url=str(get("url", "")),
        started=str(get("started", "")),
        finished=str(get("finished", "")),
        elapsed_s=get("elapsed_s", 0.0),
        rows=RowCounts(**{name: int(rows.get(name, 0)) for name in RowCounts.__slots__}),
        error_rate=get("error_rate", 0.0),
        max_error_rate=get("max_error_rate", 0.0),
        requests=int(get("requests", 0)),
        retries=int(get("retries", 0)),
        splits=int(get("splits", 0)),
        throttled=int(get("throttled", 0)),
        rows_per_second=get("rows_per_second"),
        latency_ms=LatencySummary(**{p: latency.get(p) for p in LatencySummary.__slots__}),
        errors=tuple(
            (str(kind), ErrorFigures(int(e.get("rows", 0)), e.get("example_key"), e.get("example")))
            for kind, e in _section(document, "errors").items()
        ),
        retries_by_reason=tuple(
            (str(reason), int(count))
            for reason, count in _section(document, "retries_by_reason").items()
        ),
        timeline=Timeline(
            timeline.get("bucket_s", 1.0), tuple(int(n) for n in timeline.get("rows", ()))
        ),
        tokens=None
        if tokens is None
        else TokenFigures(
            int(tokens.get("in", 0)), int(tokens.get("out", 0)), tokens.get("per_second")
        ),
        duplicate_keys=get("duplicate_keys"),
        engine=get("engine"),
        actors=get("actors"),
        blocks=None
        if blocks is None
        else BlockFigures(int(blocks.get("total", 0)), int(blocks.get("reused", 0))),
        retry=None
        if retry is None
        else RetryFigures(
            str(retry.get("from", "")),
            int(retry.get("retried", 0)),
            int(retry.get("now_ok", 0)),
            int(retry.get("still_error", 0)),
        ),
    )


def _section(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = document.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} is not an object")
    return value


def build_summary(
    snapshot: StatsSnapshot,
    *,
    job_name: str,
    fingerprint: str,
    run_id: str,
    input_path: str,
    output_path: str,
    url: str,
    started: str,
    finished: str,
    outcome: str,
    max_error_rate: float,
) -> RunSummary:
    """The run summary of a run whose final figures are ``snapshot``."""
    rows = snapshot.rows_done
    elapsed_s = snapshot.elapsed_s
    tokens = None
    if snapshot.tokens_in or snapshot.tokens_out:  # language models: what the run spent
        tokens = TokenFigures(
            snapshot.tokens_in,
            snapshot.tokens_out,
            round((snapshot.tokens_in + snapshot.tokens_out) / elapsed_s, 1)
            if elapsed_s > 0
            else None,
        )
    return RunSummary(
        job=job_name,
        run_id=run_id,
        outcome=outcome,
        fingerprint=fingerprint,
        input=input_path,
        output=output_path,
        url=url,
        started=started,
        finished=finished,
        elapsed_s=round(elapsed_s, 3),
        rows=RowCounts(
            rows,
            snapshot.rows_ok,
            snapshot.rows_error,
            snapshot.rows_skipped,
            snapshot.rows_resumed,
        ),
        error_rate=round(snapshot.rows_error / rows, 6) if rows else 0.0,
        max_error_rate=max_error_rate,
        requests=snapshot.requests,
        retries=snapshot.retries,
        splits=snapshot.splits,
        throttled=snapshot.throttled,
        rows_per_second=round(snapshot.rows_per_second, 1) if elapsed_s > 0 else None,
        latency_ms=snapshot.latency,
        errors=tuple(
            (e.kind, ErrorFigures(e.rows, e.example_key, e.example_message))
            for e in snapshot.errors
        ),
        retries_by_reason=snapshot.retries_by_reason,
        timeline=Timeline(snapshot.timeline_bucket_s, snapshot.timeline),
        tokens=tokens,
    )
