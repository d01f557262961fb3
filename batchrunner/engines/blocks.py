"""The finished blocks of a Ray run, kept so that a re-run does not send them again.

A Ray run keeps its state where the local engine does (see ``checkpoint``), in
``.batchrunner/<name>.state/ray/``: ``manifest.json`` (the job's identity) and ``parts/``,
one Parquet file per finished block (``Parts``). For an output in a bucket the manifest
stays on the driver's disk and the parts go to the same place beside the output in its
bucket, so that actors on any node write and find them with no shared disk. A part is
named by a digest of its block's keys, in order (``block_name``), and written whole or
absent (aside then renamed; one PUT). Its metadata holds the block's counts (rows, ok,
error rows by kind), so that a re-run can count a block it reuses without reading its rows.

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
from batchrunner.objectfiles import seekable
from batchrunner.report import ErrorKindSummary, FinishStatistics, RunStatistics
from batchrunner.retry import is_transient_kind
from batchrunner.storage import ObjectPath

BLOCK_METADATA_KEY = b"batchrunner.block"
NAME_BYTES = 16  # a block's name: 32 hex digits, no collision in any real input


def block_name(keys: Sequence[str]) -> str:
    """A block's stable identity: a digest of its keys, in order."""
    return hashlib.blake2b(orjson.dumps(list(keys)), digest_size=NAME_BYTES).hexdigest()


@dataclass(frozen=True, slots=True)
class Parts:
    """Where a Ray run's finished blocks are written: a local (or shared) folder, or a
    prefix in a bucket, so that actors on any node reach them. Given to the actors."""

    where: Path | ObjectPath

    def part(self, name: str) -> Path | ObjectPath:
        if isinstance(self.where, Path):
            return self.where / f"{name}.parquet"
        return self.where.child(f"{self.where.key}{name}.parquet")

    def names(self) -> list[str]:
        """The blocks finished so far (any run's), in name order."""
        where = self.where
        if isinstance(where, Path):
            found = [path.stem for path in where.glob("*.parquet")] if where.is_dir() else []
        else:
            found = [
                name.removesuffix(".parquet")
                for name, folder, _ in where.store.listing(where)
                if not folder and name.endswith(".parquet")
            ]
        return sorted(found)

    def write(self, name: str, table: pa.Table, stats: RunStatistics) -> None:
        """Write a finished block's rows, with its counts in the metadata, whole or absent:
        aside then renamed on disk, one PUT in a bucket."""
        table = table.replace_schema_metadata(_with_counts(table.schema.metadata, stats))
        path = self.part(name)
        if isinstance(path, ObjectPath):
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            path.store.put_bytes(sink.getvalue().to_pybytes(), path)
            return
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(table, temporary)
        os.replace(temporary, path)

    def reusable(self, name: str) -> RunStatistics | None:
        """The counts of block ``name``'s part, or None when the block must be sent (again):
        no part, a part that cannot be read, or one with rows worth another try."""
        try:
            metadata = self.schema(name).metadata or {}
        except (OSError, pa.ArrowException):
            return None
        return _counts(metadata)

    def schema(self, name: str) -> pa.Schema:
        """Block ``name``'s columns (its part's footer)."""
        return pq.read_schema(seekable(self.part(name)))

    def read(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        """Block ``name``'s rows (only ``columns`` if given)."""
        return pq.read_table(seekable(self.part(name)), columns=columns)

    def clear(self) -> None:
        """Remove every part (a run that starts fresh, or is done)."""
        where = self.where
        if isinstance(where, Path):
            shutil.rmtree(where, ignore_errors=True)
            return
        with contextlib.suppress(OSError):
            where.store.filesystem.delete_dir_contents(where.location, missing_dir_ok=True)

    def __str__(self) -> str:
        return str(self.where)


@dataclass(frozen=True, slots=True)
class RayState:
    """One Ray run's state: ``folder/manifest.json`` (the job's identity) on the driver's
    disk, and its ``parts``: ``folder/parts/``, or a prefix in the output's bucket."""

    folder: Path
    parts: Parts

    @classmethod
    def of(cls, paths: StatePaths, output: Path | ObjectPath, job_name: str) -> RayState:
        """The state in the job's state folder ``paths`` (see ``StatePaths.for_output``);
        the parts there too, or, for an output in a bucket, in the same place beside it:
        ``.batchrunner/<name>.state/ray/parts/`` in its bucket."""
        folder = paths.state / "ray"
        if isinstance(output, ObjectPath):
            prefix = output.with_name(f".batchrunner/{job_name}.state/ray/parts/")
            return cls(folder, Parts(prefix))
        return cls(folder, Parts(folder / "parts"))

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.json"

    def remove(self) -> None:
        """Drop the state (the run is done); the job's state folder too, once it is empty."""
        self.parts.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        # Not empty: the local engine's unfinished state is there, not ours to remove.
        with contextlib.suppress(OSError):
            self.folder.parent.rmdir()


def open_ray_state(
    state: RayState, identity: Mapping[str, Any], *, resume: bool
) -> tuple[RayState, str | None]:
    """``state``, for a run of ``identity``, and a note for the log.

    With ``resume`` and a state of the same identity, its parts are kept; anything else
    starts fresh (the parts of a changed job could answer for other rows).
    """
    same, note = resumable(state.manifest, identity, resume=resume, run="Ray run", held="blocks")
    if same:
        kept = len(state.parts.names())
        return state, f"resuming: {kept:,} finished blocks are kept in {state.parts}"
    start_fresh(state.folder, state.manifest, identity)
    state.parts.clear()
    if isinstance(state.parts.where, Path):
        state.parts.where.mkdir(parents=True, exist_ok=True)
    return state, note


def _with_counts(
    metadata: Mapping[bytes, bytes] | None, stats: RunStatistics
) -> dict[bytes, bytes]:
    finishing = stats.finishing
    record = {
        "rows": finishing.rows_ok + finishing.rows_error,
        "ok": finishing.rows_ok,
        "errors": {
            error.kind: [error.rows, error.example_key, error.example_message]
            for error in finishing.errors
        },
    }
    return {**(metadata or {}), BLOCK_METADATA_KEY: orjson.dumps(record)}


def _counts(metadata: Mapping[bytes, bytes]) -> RunStatistics | None:
    try:
        record = orjson.loads(metadata[BLOCK_METADATA_KEY])
        errors = tuple(
            ErrorKindSummary(str(kind), int(rows), key, message)
            for kind, (rows, key, message) in record["errors"].items()
        )
        ok, error = int(record["ok"]), int(record["rows"]) - int(record["ok"])
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
        return None
    if any(is_transient_kind(summary.kind) for summary in errors):
        return None
    return RunStatistics(finishing=FinishStatistics(rows_ok=ok, rows_error=error, errors=errors))
