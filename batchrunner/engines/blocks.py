"""The finished blocks of a Ray run, kept so that a re-run does not send them again.

A Ray run keeps its state beside its output, as the local engine does (see ``checkpoint``),
in ``.batchrunner/<name>.state/ray/``: ``manifest.json`` (the job's identity) and
``parts/``, one Parquet file per finished block. A part is named by a digest of its block's
keys, in order (``block_name``), and written aside then renamed into place, so it is whole
or absent. Its metadata holds the block's counts (rows, ok, error rows by kind), so that a
re-run can count a block it reuses without reading its rows.

The unit of resume is the block: the rows one actor call receives (for a table, about
``batch.size`` x 2 x ``batch.concurrency`` rows as Ray's reader cut them; for images, 2 x
``batch.concurrency`` files in walk order). A re-run of the same job (same fingerprint)
forms the same blocks, finds their parts and sends only the blocks that have none, or whose
part holds rows that failed for a reason worth another try (a timeout, a 503: see
``retry.is_transient_kind``). Correctness never rests on the blocks coming out the same: a
part is used only by a block with exactly its keys, and the output is made of the parts of
this run's blocks alone (stale ones are removed with the state).

Nothing here imports Ray: the driver and the actors both use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchrunner.checkpoint import StatePaths, resumable, start_fresh
from batchrunner.report import ErrorKindSummary, FinishStatistics, RunStatistics
from batchrunner.retry import is_transient_kind

BLOCK_METADATA_KEY = b"batchrunner.block"
NAME_BYTES = 16  # a block's name: 32 hex digits, no collision in any real input


def block_name(keys: Sequence[str]) -> str:
    """A block's stable identity: a digest of its keys, in order."""
    return hashlib.blake2b(orjson.dumps(list(keys)), digest_size=NAME_BYTES).hexdigest()


@dataclass(frozen=True, slots=True)
class RayState:
    """Where one Ray run keeps its finished blocks: ``folder/manifest.json``, ``folder/parts/``."""

    folder: Path

    @classmethod
    def beside(cls, output: Path, job_name: str) -> RayState:
        return cls(StatePaths.beside(output, job_name).state / "ray")

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.json"

    @property
    def parts(self) -> Path:
        return self.folder / "parts"

    def part(self, name: str) -> Path:
        return self.parts / f"{name}.parquet"

    def finished_parts(self) -> list[Path]:
        """The parts written so far (any run's), in name order."""
        return sorted(self.parts.glob("*.parquet")) if self.parts.is_dir() else []

    def remove(self) -> None:
        """Drop the state (the run is done); the job's state folder too, once it is empty."""
        shutil.rmtree(self.folder, ignore_errors=True)
        # Not empty: the local engine's unfinished state is there, not ours to remove.
        with contextlib.suppress(OSError):
            self.folder.parent.rmdir()


def open_ray_state(
    output: Path, job_name: str, identity: Mapping[str, Any], *, resume: bool
) -> tuple[RayState, str | None]:
    """The state of a run of ``identity`` writing ``output``, and a note for the log.

    With ``resume`` and a state of the same identity, its parts are kept; anything else
    starts fresh (the parts of a changed job could answer for other rows).
    """
    state = RayState.beside(output, job_name)
    same, note = resumable(state.manifest, identity, resume=resume, run="Ray run", held="blocks")
    if same:
        parts = state.finished_parts()
        return state, f"resuming: {len(parts):,} finished blocks are kept in {state.parts}"
    start_fresh(state.folder, state.manifest, identity)
    state.parts.mkdir()
    return state, note


def write_part(path: Path, table: pa.Table, stats: RunStatistics) -> None:
    """Write a finished block's rows, with its counts in the metadata, aside then in place."""
    finishing = stats.finishing
    record = {
        "rows": finishing.rows_ok + finishing.rows_error,
        "ok": finishing.rows_ok,
        "errors": {
            error.kind: [error.rows, error.example_key, error.example_message]
            for error in finishing.errors
        },
    }
    metadata = dict(table.schema.metadata or {})
    metadata[BLOCK_METADATA_KEY] = orjson.dumps(record)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table.replace_schema_metadata(metadata), temporary)
    os.replace(temporary, path)


def reusable_part(path: Path) -> RunStatistics | None:
    """The counts of the finished block at ``path`` (rows finished; nothing read or sent
    now), or None when it must be sent (again): no part, a part that cannot be read, or one
    with rows worth another try."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        record = orjson.loads(metadata[BLOCK_METADATA_KEY])
        errors = tuple(
            ErrorKindSummary(str(kind), int(rows), key, message)
            for kind, (rows, key, message) in record["errors"].items()
        )
        ok, error = int(record["ok"]), int(record["rows"]) - int(record["ok"])
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError, orjson.JSONDecodeError):
        return None
    if any(is_transient_kind(summary.kind) for summary in errors):
        return None
    return RunStatistics(finishing=FinishStatistics(rows_ok=ok, rows_error=error, errors=errors))
