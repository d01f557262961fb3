"""``batchrunner retry``: send the error rows of a finished output again, and write it anew.

The error rows' keys are read from the output; the job runs again on its input with only
those items (a run of its own, written to a Parquet file in the state folder beside the
output); then the output is rewritten, streamed in its own order: each ok row as it was,
each error row replaced by its new row. The new output is checked (every retried row used
exactly once, as many rows as before), written aside and renamed over the old one (or
written to another path): whole, or not at all.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.checkpoint import StatePaths
from batchrunner.engines.local import run_job
from batchrunner.errors import CoverageError, InputError
from batchrunner.formats import (
    OutputFormat,
    batch_output_format,
    open_output_writer,
    output_format,
)
from batchrunner.inspection import ROWS_PER_READ, open_output
from batchrunner.items import STATUS_ERROR
from batchrunner.job.settings import Job
from batchrunner.lock import JobLock
from batchrunner.sink import RESERVED, SUMMARY_METADATA_KEY, conform, merge_schemas
from batchrunner.summary import RetryFigures, RowCounts, RunSummary
from batchrunner.wiring import RunOutcome, RunReport
from batchrunner.writing import aside_name, fsync, open_write
from batchrunner.writing import write_json_atomically as write_summary

log = logging.getLogger("batchrunner")


@dataclass(frozen=True, slots=True)
class RetryResult:
    """What a retry did: the new output and its summary (with a ``retry`` section)."""

    outcome: RunOutcome
    output: Path
    summary_path: Path
    summary: RunSummary
    retried: int
    now_ok: int


def error_keys(output: Path) -> tuple[list[str], int, pa.Schema]:
    """The keys of the error rows of ``output`` in file order, its row count, its schema."""
    dataset = open_output(output)
    names = dataset.schema.names
    if "_status" not in names or "_key" not in names:
        raise InputError(f"{output} is not a batchrunner output: it has no _key and _status")
    keys: list[str] = []
    try:
        for batch in dataset.to_batches(batch_size=ROWS_PER_READ, columns=["_key", "_status"]):
            errors = batch.filter(pc.equal(batch.column(1), STATUS_ERROR))
            keys.extend(str(key) for key in errors.column(0).to_pylist())
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{output}: cannot read it: {exc}") from None
    return keys, dataset.count_rows(), dataset.schema


def retry_errors(
    job: Job, output: Path, *, target: Path | None = None, **options: Any
) -> RetryResult | None:
    """Send the error rows of ``output`` again and write the whole output anew to ``target``
    (default: ``output`` itself). None when there is no error row (nothing is written).
    ``options`` go to ``run_job`` (``on_progress``, ``sleep``, ...)."""
    target = target or output
    if output_format(target) is None:
        raise InputError(f"--output: must end in .parquet, .csv or .jsonl, got {str(target)!r}")
    keys, rows, _ = error_keys(output)
    if not keys:
        return None
    state = StatePaths.beside(target, job.name)
    workspace = state.state.parent / f"{job.name}.retry"
    retried_output = workspace / "retried.parquet"
    retry_job = job.model_copy(
        update={
            "input": job.input.model_copy(update={"incremental": False}),
            "output": job.output.model_copy(update={"path": str(retried_output)}),
        }
    )
    log.info("retry: %s error rows of %s are sent again", f"{len(keys):,}", output)
    with JobLock(state.lock, job.name):
        result = run_job(retry_job, resume=False, only_keys=frozenset(keys), **options)
        try:
            summary = _merged_summary(job, output, target, result, rows, len(keys))
            merged_rows = _rewrite(
                output,
                retried_output,
                target,
                len(keys),
                summary,
                format=batch_output_format(job, target),
            )
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
    assert merged_rows == rows
    summary_path = target.with_name(target.name + ".summary.json")
    write_summary(summary_path, summary.to_json())
    retry = summary.retry
    assert retry is not None
    log.info(
        "retry: %s rows retried, %s now ok, %s still failing: output %s",
        f"{retry.retried:,}", f"{retry.now_ok:,}", f"{retry.still_error:,}", target,
    )  # fmt: skip
    return RetryResult(
        RunOutcome(summary.outcome),
        target,
        summary_path,
        summary,
        retry.retried,
        retry.now_ok,
    )


def _merged_summary(
    job: Job, output: Path, target: Path, result: RunReport, rows: int, retried: int
) -> RunSummary:
    sub = result.summary
    counts = sub.rows
    if counts.total != retried:
        missing = retried - counts.total
        raise CoverageError(
            f"{missing:,} of the {retried:,} error rows' keys are not in the input any more "
            f"({job.input.path}): the output was left as it was. Retry with the input the "
            "output was made from, or run the job again"
        )
    now_ok = counts.ok
    still = counts.error
    error_rate = round(still / rows, 6) if rows else 0.0
    outcome = RunOutcome(sub.outcome)
    if outcome is not RunOutcome.ABORTED:
        outcome = (
            RunOutcome.DONE if error_rate <= job.max_error_rate else RunOutcome.TOO_MANY_ERRORS
        )
    return replace(
        sub,
        outcome=outcome,
        output=str(target),
        rows=RowCounts(total=rows, ok=rows - still, error=still),
        error_rate=error_rate,
        retry=RetryFigures(str(output), retried, now_ok, still),
    )


def _rewrite(
    output: Path,
    retried: Path,
    target: Path,
    expected: int,
    summary: RunSummary,
    *,
    format: OutputFormat | None = None,
) -> int:
    """Write ``output`` with its error rows replaced by ``retried``'s rows, to ``target``
    (aside, then renamed). Returns the rows written; ``CoverageError`` when the rows do not
    match one for one."""
    new = open_output(retried).to_table()
    if new.num_rows != expected:
        raise CoverageError(f"the retry gave {new.num_rows:,} rows for {expected:,} error rows")
    positions: dict[str, deque[int]] = defaultdict(deque)
    for index, key in enumerate(new.column("_key").to_pylist()):
        positions[key].append(index)
    old = open_output(output)
    merged = merge_schemas([RESERVED, old.schema, new.schema])
    fields = [f for f in merged if f.name not in RESERVED.names]
    schema = pa.schema(
        [*RESERVED, *fields], metadata={SUMMARY_METADATA_KEY: orjson.dumps(summary.to_json())}
    )
    new = pa.Table.from_batches([conform(b, schema) for b in new.to_batches()], schema)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = aside_name(target)
    written = used = 0
    try:
        kind = format or output_format(target) or OutputFormat.parquet
        with open_write(temporary) as file, open_output_writer(file, schema, kind) as writer:
            for batch in old.to_batches(batch_size=ROWS_PER_READ):
                part = pa.Table.from_batches([conform(batch, schema)], schema)
                statuses = part.column("_status").to_pylist()
                keys = part.column("_key").to_pylist()
                take: list[int] = []
                extra: list[int] = []
                for index, (status, key) in enumerate(zip(statuses, keys, strict=True)):
                    if status == STATUS_ERROR:
                        if not positions.get(key):
                            raise CoverageError(f"error row {key!r} has no retried row")
                        take.append(part.num_rows + len(extra))
                        extra.append(positions[key].popleft())
                    else:
                        take.append(index)
                if extra:
                    combined = pa.concat_tables([part, new.take(pa.array(extra, pa.int64()))])
                    part = combined.take(pa.array(take, pa.int64()))
                    used += len(extra)
                writer.write_table(part)
                written += part.num_rows
        if used != expected:
            raise CoverageError(f"{expected - used:,} retried rows found no error row")
        fsync(temporary)
        os.replace(temporary, target)
        fsync(target.parent)
    finally:
        temporary.unlink(missing_ok=True)
    return written
