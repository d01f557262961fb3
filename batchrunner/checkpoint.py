"""Run state for resume: where it lives, whether it belongs to this job, what it already holds.

A run keeps its state beside its output, in ``.batchrunner/``: ``<name>.lock`` (see
``lock``), ``<name>.state/`` holding ``manifest.json`` (the job's identity) and the
journal parts (see ``sink.Journal``), and with ``input.incremental`` ``<name>.seen.parquet``,
the items earlier runs finished (see ``incremental``; it outlives every run). A run that ends
well assembles the output and removes the state; one that is killed, interrupted or aborted
leaves it, and the next run of the same job picks it up: batches already finished are not
sent again. Batches whose rows failed for a reason that says nothing against the rows (a
timeout, a 503, a refused token) are dropped from the state on resume, so that they are sent
again. A changed job starts fresh.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.job import fingerprint, identity_changes
from batchrunner.report import RunStats
from batchrunner.retry import is_transient_kind
from batchrunner.sink import (
    SEQ,
    Journal,
    journal_parts,
    next_generation,
    read_journal,
    write_json_atomically,
)

log = logging.getLogger("batchrunner")

MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class StatePaths:
    """Where one job's lock and state live, for one output path."""

    lock: Path
    state: Path
    seen: Path  # input.incremental: the items earlier runs finished

    @classmethod
    def beside(cls, output: Path, job_name: str) -> StatePaths:
        folder = output.parent / ".batchrunner"
        return cls(
            lock=folder / f"{job_name}.lock",
            state=folder / f"{job_name}.state",
            seen=folder / f"{job_name}.seen.parquet",
        )

    @property
    def manifest(self) -> Path:
        return self.state / MANIFEST


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a run starts from: the journal to append to and the batches already finished."""

    journal: Journal
    finished: bytearray  # finished[seq] == 1: batch seq's rows are in the journal
    resumed_rows: int
    note: str | None  # for the log: resumed, or why not


def open_checkpoint(
    paths: StatePaths, identity: Mapping[str, Any], *, resume: bool, stats: RunStats
) -> Checkpoint:
    """Prepare the state folder for a run and return what it already holds.

    With ``resume`` and a state of the same job identity, finished batches are kept (and
    counted into ``stats``); anything else starts fresh.
    """
    note = None
    manifest = _read_manifest(paths.manifest)
    if manifest is not None and resume:
        if manifest.get("fingerprint") == fingerprint(identity):
            return _resume(paths, stats)
        changes = identity_changes(manifest.get("identity", {}), identity)
        note = (
            "starting fresh: the job changed since its unfinished run ("
            + "; ".join(changes or ["its identity"])
            + ")"
        )
    elif manifest is not None:
        note = "starting fresh (--no-resume): the unfinished run's results are discarded"
    if paths.state.exists():
        shutil.rmtree(paths.state)
    paths.state.mkdir(parents=True)
    write_json_atomically(
        paths.manifest, {"fingerprint": fingerprint(identity), "identity": dict(identity)}
    )
    return Checkpoint(Journal(paths.state), bytearray(), 0, note)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


def _resume(paths: StatePaths, stats: RunStats) -> Checkpoint:
    # Rewrite the journal keeping each finished batch once, then drop the old parts. A crash
    # half-way leaves both copies: the next resume keeps the first of each, so it is safe.
    old_parts = journal_parts(paths.state)
    finished = bytearray()
    kept_batches = resent_batches = kept_rows = 0
    compacted = paths.state / "compacted"
    if compacted.exists():
        shutil.rmtree(compacted)
    generation = next_generation(paths.state)
    journal = Journal(compacted, generation)
    for batch in read_journal(old_parts):
        seq = batch.column(SEQ)[0].as_py()
        if seq < len(finished) and finished[seq]:
            continue
        if _worth_resending(batch):
            resent_batches += 1
            continue
        if seq >= len(finished):
            finished.extend(bytes(seq + 1 - len(finished)))
        finished[seq] = 1
        journal.append(batch)
        kept_batches += 1
        kept_rows += batch.num_rows
        _count(batch, stats)
    journal.close()
    for part in journal_parts(compacted):
        part.rename(paths.state / part.name)
    compacted.rmdir()
    for part in old_parts:
        part.unlink()
    note = f"resuming: {kept_rows:,} rows in {kept_batches:,} finished batches are kept" + (
        f"; {resent_batches:,} failed batches are sent again" if resent_batches else ""
    )
    return Checkpoint(Journal(paths.state, generation + 1), finished, kept_rows, note)


def _worth_resending(batch: pa.RecordBatch) -> bool:
    kinds = batch.column("_error_kind")
    if kinds.null_count == len(kinds):
        return False
    return any(is_transient_kind(kind) for kind in pc.unique(kinds.drop_null()).to_pylist())


def _count(batch: pa.RecordBatch, stats: RunStats) -> None:
    errors = batch.filter(pc.equal(batch.column("_status"), "error"))
    stats.rows_ok += batch.num_rows - errors.num_rows
    stats.rows_error += errors.num_rows
    kinds = errors.column("_error_kind")
    counts = pc.value_counts(kinds)
    for kind, count in zip(
        counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
    ):
        of_kind = pc.is_null(kinds) if kind is None else pc.equal(kinds, kind)
        first = errors.filter(of_kind).slice(0, 1).to_pylist()[0]
        stats.record_error_rows(kind or "error", count, first["_key"], first["_error"] or "")
