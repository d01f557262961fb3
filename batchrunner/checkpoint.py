"""Run state for resume: where it lives, whether it belongs to this job, what it already holds.

A run keeps its state beside its output, in ``.batchrunner/``: ``<name>.lock`` (see
``lock``), ``<name>.state/`` holding ``manifest.json`` (the job's identity) and the
journal parts (see ``sink.Journal``), and with ``input.incremental`` ``<name>.seen.parquet``,
the items earlier runs finished (see ``incremental``; it outlives every run). A run that ends
well assembles the output and removes the state; one that is killed, interrupted or aborted
leaves it, and the next run of the same job picks it up: batches already finished are not
sent again. Batches whose rows failed for a reason that says nothing against the rows (a
timeout, a 503, a refused token) are dropped from the state on resume, so that they are sent
again. A changed setting is refused while the unfinished run has finished rows (they would be
discarded); changed input files start fresh, with a warning.
Finished batches are known by their ``seq``, their place in the input. The job's identity
proves that the input is the same for a table (each file's size and modification time), but
an image folder's identity is the folder alone (statting every file up front would cost a
walk): a file added in a subfolder shifts the seq of every file after it. So the resume
also keeps a short digest of each finished batch's keys (read from the journal's ``_key``
while compacting), and the run checks every finished batch it reads against it
(``Checkpoint.check_keys``): a batch whose keys differ stops the run with an ``InputError``
before any result can be attached to the wrong file or row.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import InputError, StateError
from batchrunner.job.identity import INCREMENTAL_IDENTITY, fingerprint, identity_changes
from batchrunner.report import FinishStatistics, FinishTally
from batchrunner.retry import is_transient_kind
from batchrunner.sink import (
    Journal,
    by_batch,
    journal_parts,
    next_generation,
    read_journal,
)
from batchrunner.storage import InputPath
from batchrunner.writing import write_json_atomically

log = logging.getLogger("batchrunner")

MANIFEST = "manifest.json"
DIGESTS = "sent.digests"  # DigestLog: what was sent for each journaled batch
DIGEST_BYTES = 8  # per finished batch: a digest of its keys, in order
# Identity parts whose change starts a fresh run (with a warning) rather than being refused.
_STARTS_FRESH = ("files", INCREMENTAL_IDENTITY)


@dataclass(frozen=True, slots=True)
class StatePaths:
    """Where one job's lock and state live, for one output path."""

    lock: Path
    state: Path
    seen: (
        Path  # input.incremental: the items earlier runs finished, as an earlier version kept them
    )
    keys: Path  # input.incremental: the items earlier runs finished (a key index)

    @classmethod
    def beside(cls, output: Path, job_name: str) -> StatePaths:
        return cls.within(output.parent / ".batchrunner", job_name)

    @classmethod
    def for_output(
        cls, output: InputPath, job_name: str, state_dir: str | Path | None
    ) -> StatePaths:
        """``run.state_dir`` when set; else beside a local output, or ``.batchrunner/`` in
        the working folder for an output in a bucket (state always stays on local disk)."""
        if state_dir is not None:
            return cls.within(Path(state_dir), job_name)
        if isinstance(output, Path):
            return cls.beside(output, job_name)
        return cls.within(Path(".batchrunner"), job_name)

    @classmethod
    def within(cls, folder: Path, job_name: str) -> StatePaths:
        return cls(
            lock=folder / f"{job_name}.lock",
            state=folder / f"{job_name}.state",
            seen=folder / f"{job_name}.seen.parquet",
            keys=folder / f"{job_name}.keys",
        )

    def assembled(self, suffix: str) -> Path:
        """An output bound for a bucket, assembled here before it is uploaded; ``suffix``
        is the output's (``.parquet``, ``.csv``, ``.jsonl``): it chooses the format."""
        return self.state.with_name(self.state.name.removesuffix(".state") + ".upload" + suffix)

    @property
    def manifest(self) -> Path:
        return self.state / MANIFEST

    @property
    def digests(self) -> Path:
        return self.state / DIGESTS


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a run starts from: the journal to append to and the batches already finished."""

    journal: Journal
    finished: bytearray  # finished[seq] == 1: batch seq's rows are in the journal
    resumed_rows: int
    note: str | None  # for the log: resumed, or why not
    # DIGEST_BYTES per seq: keys_digest of each batch finished by the unfinished run (zeros
    # for the others); read-only, unlike ``finished``, which the run goes on filling.
    key_digests: bytes = b""
    #: The finished rows kept, counted as the finishing stage counts them (rows_resumed).
    resumed: FinishStatistics = field(default_factory=FinishStatistics)

    def check_keys(self, seq: int, keys: Sequence[str]) -> None:
        """Raise ``InputError`` if batch ``seq``, finished by the unfinished run, held other
        keys than ``keys`` (the input changed since: its results would land on other rows).

        Call it for each finished batch as the input is read; other seqs pass.
        """
        start = seq * DIGEST_BYTES
        recorded = self.key_digests[start : start + DIGEST_BYTES]
        if not recorded.strip(b"\0") or recorded == keys_digest(keys):
            return
        where = f"{keys[0]!r}" if len(keys) == 1 else f"{keys[0]!r} to {keys[-1]!r}"
        raise InputError(
            f"the input changed since the unfinished run of this job: input item {where} "
            f"(batch {seq:,}) is not what that run sent in that place (files added, removed "
            "or renamed in a subfolder?), so its finished results cannot be matched to the "
            "input. Re-run with --no-resume to start fresh (the unfinished run's results are "
            "discarded)"
        )

    def check_length(self, batches: int) -> None:
        """Raise ``InputError`` if the unfinished run finished batches beyond the input's
        ``batches`` (the whole input, read to its end): the input has lost items since."""
        beyond = self.key_digests[batches * DIGEST_BYTES :]
        if beyond.strip(b"\0"):
            last = (len(beyond.rstrip(b"\0")) - 1) // DIGEST_BYTES + batches
            now = f"now ends after batch {batches - 1:,}" if batches else "is now empty"
            raise InputError(
                f"the input changed since the unfinished run of this job: it {now}, but "
                f"that run finished batch {last:,} (files removed?), so its finished results "
                "cannot be matched to the input. Re-run with --no-resume to start fresh (the "
                "unfinished run's results are discarded)"
            )


class Scan(NamedTuple):
    """The input as it is now, batch by batch (``DIGEST_BYTES`` per seq): what a resume checks
    the unfinished run's finished batches against."""

    keys: bytes  # keys_digest of each batch
    contents: bytes  # keyindex.content_digest of each batch: what would be sent for it


class DigestLog:
    """The state's record of what was sent for each journaled batch: (seq, content digest),
    16 bytes a batch, appended before the batch is journaled, so that every journaled batch
    has one. A resume compares them with the input as it is now (``Scan``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def append(self, records: Iterable[tuple[int, bytes]]) -> None:
        if self._file is None:
            self._file = self.path.open("ab", buffering=0)
        self._file.write(b"".join(seq.to_bytes(8, "little") + d for seq, d in records))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self) -> dict[int, bytes]:
        """seq -> digest, the last record of each seq (a whole record: a cut-off tail is
        ignored)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        records = {}
        for start in range(0, len(data) - len(data) % 16, 16):
            seq = int.from_bytes(data[start : start + 8], "little")
            records[seq] = data[start + 8 : start + 16]
        return records

    def rewrite(self, records: dict[int, bytes]) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_bytes(
            b"".join(seq.to_bytes(8, "little") + d for seq, d in sorted(records.items()))
        )
        temporary.replace(self.path)


def keys_digest(keys: Sequence[str]) -> bytes:
    """A short digest of a batch's keys, in order: what identifies a finished batch."""
    return hashlib.blake2b(orjson.dumps(list(keys)), digest_size=DIGEST_BYTES).digest()


def open_checkpoint(
    paths: StatePaths,
    identity: Mapping[str, Any],
    *,
    resume: bool,
    scan: Callable[[], Scan] | None = None,
) -> Checkpoint:
    """Prepare the state folder for a run and return what it already holds.

    With ``resume`` and a state of the same job identity, finished batches are kept (and
    counted: ``Checkpoint.resumed``); anything else starts fresh. ``scan`` reads the input as it is
    now: a finished batch whose keys are the same but whose content changed (an edit that
    kept the file's size and modification time) is dropped, to be sent again.
    """
    same, note = resumable(paths.manifest, identity, resume=resume)
    if same:
        return _resume(paths, scan() if scan is not None else None)
    if note is not None and resume and journal_parts(paths.state):
        _refuse_setting_changes(paths.manifest, identity)
        log.warning("%s; its finished rows are discarded", note)
        note = None
    start_fresh(paths.state, paths.manifest, identity)
    return Checkpoint(Journal(paths.state), bytearray(), 0, note)


def resumable(
    manifest: Path,
    identity: Mapping[str, Any],
    *,
    resume: bool,
    run: str = "run",
    held: str = "results",
) -> tuple[bool, str | None]:
    """Whether the unfinished run whose ``manifest`` this is can be resumed by a run of
    ``identity``; if not, why it starts fresh (None: there was no unfinished run).

    ``run`` and ``held`` name the run and what it kept, for the note.
    """
    document = _read_manifest(manifest)
    if document is None:
        return False, None
    if not resume:
        return False, f"starting fresh (--no-resume): the unfinished {run}'s {held} are discarded"
    if document.get("fingerprint") == fingerprint(identity):
        return True, None
    changes = identity_changes(document.get("identity", {}), identity)
    return False, (
        f"starting fresh: the job changed since its unfinished {run} ("
        + "; ".join(changes or ["its identity"])
        + ")"
    )


def _refuse_setting_changes(manifest: Path, identity: Mapping[str, Any]) -> None:
    # The unfinished run finished rows: a changed setting (batch size, columns, URL...) is
    # more likely a mistake than a wish to discard them, so it is refused; changed input
    # files (a new night's data) and incremental's remembered items start fresh, warned.
    document = _read_manifest(manifest) or {}
    before = document.get("identity", {})
    settings = {
        name: value
        for name, value in identity.items()
        if name not in _STARTS_FRESH and before.get(name) != value
    }
    changes = identity_changes({name: before.get(name) for name in settings}, settings)
    if changes:
        raise StateError(
            "the job changed since its unfinished run ("
            + "; ".join(changes)
            + "), which finished rows that would be discarded: run with the same settings "
            "to resume, or with --no-resume to start fresh"
        )


def start_fresh(folder: Path, manifest: Path, identity: Mapping[str, Any]) -> None:
    """Empty ``folder`` and write the ``manifest`` of a run of ``identity`` in it."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json_atomically(
        manifest, {"fingerprint": fingerprint(identity), "identity": dict(identity)}
    )


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


def _changed(seq: int, batch: pa.RecordBatch, recorded: bytes | None, now: Scan | None) -> bool:
    """Whether finished batch ``seq`` holds the same keys as the input now but was sent with
    another content (other keys are for ``Checkpoint.check_keys`` to refuse)."""
    if recorded is None or now is None:
        return False  # no record (a state of an earlier version): trusted, as before
    place = slice(seq * DIGEST_BYTES, (seq + 1) * DIGEST_BYTES)
    current = now.contents[place]
    if len(current) < DIGEST_BYTES or current == recorded:
        return False
    return now.keys[place] == keys_digest(batch.column("_key").to_pylist())


def _resume(paths: StatePaths, now: Scan | None) -> Checkpoint:
    # Rewrite the journal keeping each finished batch once, then drop the old parts. A crash
    # half-way leaves both copies: the next resume keeps the first of each, so it is safe.
    old_parts = journal_parts(paths.state)
    finished = bytearray()
    digests = bytearray()
    tally = FinishTally()
    kept_batches = resent_batches = kept_rows = changed_batches = changed_rows = 0
    log_of_digests = DigestLog(paths.digests)
    recorded = log_of_digests.read()
    kept_digests: dict[int, bytes] = {}
    compacted = paths.state / "compacted"
    if compacted.exists():
        shutil.rmtree(compacted)
    generation = next_generation(paths.state)
    journal = Journal(compacted, generation)
    for seq, batch in (piece for message in read_journal(old_parts) for piece in by_batch(message)):
        if seq < len(finished) and finished[seq]:
            continue
        if _worth_resending(batch):
            resent_batches += 1
            continue
        if _changed(seq, batch, recorded.get(seq), now):
            changed_batches += 1
            changed_rows += batch.num_rows
            continue
        if seq in recorded:
            kept_digests[seq] = recorded[seq]
        if seq >= len(finished):
            finished.extend(bytes(seq + 1 - len(finished)))
            digests.extend(bytes(DIGEST_BYTES * (seq + 1) - len(digests)))
        finished[seq] = 1
        digest = keys_digest(batch.column("_key").to_pylist())
        digests[seq * DIGEST_BYTES : (seq + 1) * DIGEST_BYTES] = digest
        journal.append(batch)
        kept_batches += 1
        kept_rows += batch.num_rows
        _count(batch, tally)
    journal.close()
    for part in journal_parts(compacted):
        part.rename(paths.state / part.name)
    compacted.rmdir()
    for part in old_parts:
        part.unlink()
    log_of_digests.rewrite(kept_digests)
    note = f"resuming: {kept_rows:,} rows in {kept_batches:,} finished batches are kept" + (
        f"; {resent_batches:,} failed batches are sent again" if resent_batches else ""
    )
    if changed_batches:
        log.warning(
            "the input changed since the unfinished run of this job: %s finished batches "
            "(%s rows) hold other values now (the files' sizes and modification times were "
            "kept); they are sent again",
            f"{changed_batches:,}", f"{changed_rows:,}",
        )  # fmt: skip
    journal = Journal(paths.state, generation + 1)
    return Checkpoint(journal, finished, kept_rows, note, bytes(digests), tally.statistics())


def _worth_resending(batch: pa.RecordBatch) -> bool:
    kinds = batch.column("_error_kind")
    if kinds.null_count == len(kinds):
        return False
    return any(is_transient_kind(kind) for kind in pc.unique(kinds.drop_null()).to_pylist())


def _count(batch: pa.RecordBatch, tally: FinishTally) -> None:
    errors = batch.filter(pc.equal(batch.column("_status"), "error"))
    tally.count_resumed(batch.num_rows - errors.num_rows, errors.num_rows)
    kinds = errors.column("_error_kind")
    counts = pc.value_counts(kinds)
    for kind, count in zip(
        counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True
    ):
        of_kind = pc.is_null(kinds) if kind is None else pc.equal(kinds, kind)
        first = errors.filter(of_kind).slice(0, 1).to_pylist()[0]
        tally.record_error_rows(kind or "error", count, first["_key"], first["_error"] or "")
