"""The run's journal: finished batches appended to Arrow IPC stream parts in a state
folder, in the order they finish, each append straight to the file, so a crash loses only
what was in flight; read back whole batch by whole batch (a cut-off tail skipped)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.errors import WriteError
from batchrunner.sink.rows import SEQ
from batchrunner.sink.schemas import conform, merge_schemas
from batchrunner.writing import copy_descriptor, folder_id, fsync, open_write, reason

# A journal message bigger than this goes through in several writes: still one per 1 MiB.
JOURNAL_BUFFER_BYTES = 1 << 20

log = logging.getLogger("batchrunner")


class Journal:
    """Appends finished batches to Arrow IPC stream parts in ``directory``.

    Every append goes straight to the file (no user-space buffer), so a killed process
    leaves every finished batch readable. A new part starts only when a batch brings a field
    or type the current part's schema cannot hold. Parts are named by ``generation`` (one
    per run that wrote to the folder) so that resumed and new parts never collide.

    The journal holds every file of the folder open for reading (the manifest and the parts:
    a few), so that when the folder is removed while the run goes on (a clean-up script, a
    hasty ``rm -rf``) it can put them back from what it holds: the work done is not lost.
    A write that fails (the disk full) raises ``WriteError``.
    """

    def __init__(self, directory: Path, generation: int | None = None) -> None:
        self.directory = directory
        self._guard(lambda: directory.mkdir(parents=True, exist_ok=True), directory)
        self.generation = next_generation(directory) if generation is None else generation
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._part = directory  # the part being written (its path, for a failure's message)
        self._schema: pa.Schema | None = None
        self._next_part = 0
        self._held: dict[str, int] = {}  # file name -> a descriptor open for reading
        for path in sorted(directory.iterdir()):
            if path.is_file():
                self._hold(path)
        self._folder_id = folder_id(directory)

    def append(self, batch: pa.RecordBatch) -> None:
        self._check_folder()
        if self._schema is not None and _fits(batch.schema, self._schema):
            batch = conform(batch, self._schema)
        else:
            schema = batch.schema
            if self._schema is not None:
                schema = merge_schemas([self._schema, batch.schema])
            self._open_part(schema)
            batch = conform(batch, schema)
        writer, sink = self._writer, self._sink
        assert writer is not None and sink is not None

        def write() -> None:
            writer.write_batch(batch)
            sink.flush()  # the message's pieces in one write, all in the OS's hands

        self._guard(write, self._part)

    def _part_path(self, number: int) -> Path:
        return self.directory / f"part-{self.generation:04d}-{number:06d}.arrows"

    def _open_part(self, schema: pa.Schema) -> None:
        self._close_part()
        path = self._part_path(self._next_part)
        self._next_part += 1

        def open_part() -> None:
            # Buffered, and flushed after each message: Arrow writes a message as a dozen
            # or more pieces (one write each, unbuffered), a third of the journal's time.
            self._sink = pa.BufferedOutputStream(open_write(path), JOURNAL_BUFFER_BYTES)
            self._hold(path)
            self._writer = pa.ipc.new_stream(self._sink, schema)

        self._guard(open_part, path)
        self._part = path
        self._schema = schema

    def _hold(self, path: Path) -> None:
        old = self._held.pop(path.name, None)
        if old is not None:
            os.close(old)
        self._held[path.name] = os.open(path, os.O_RDONLY)

    def _close_part(self) -> None:
        writer, sink = self._writer, self._sink
        self._writer = self._sink = None
        self._schema = None
        if writer is not None:
            self._guard(writer.close, self.directory)
        if sink is not None:
            self._guard(sink.close, self.directory)

    def close(self) -> None:
        """Finish the current part, put the folder back if it was removed, and let go of
        the files held. Calling it again does nothing."""
        wrote = self._sink is not None
        self._close_part()
        if self._held:
            self._check_folder()
            for descriptor in self._held.values():
                os.close(descriptor)
            self._held.clear()
        if wrote:
            self._guard(lambda: fsync(self.directory), self.directory)

    def _check_folder(self) -> None:
        """Put the folder's files back from those held if the folder was removed or
        replaced since the journal opened it."""
        if folder_id(self.directory) == self._folder_id:
            return
        self._close_part()  # its rows are in the file held; later ones go to a new part
        self._guard(lambda: self.directory.mkdir(parents=True, exist_ok=True), self.directory)
        restored = 0
        for name, descriptor in self._held.items():
            target = self.directory / name
            if not target.exists():
                self._guard(partial(copy_descriptor, descriptor, target), target)
                restored += 1
        self._folder_id = folder_id(self.directory)
        log.warning(
            "the run's state folder %s was removed while the run went on: put back its "
            "%d files from the copies the run held open; nothing finished is lost",
            self.directory,
            restored,
        )

    def _guard(self, write: Callable[[], object], path: Path) -> None:
        """Do ``write``; a failure (the disk full, the folder read-only) is a WriteError."""
        try:
            write()
        except OSError as exc:
            raise WriteError(
                f"cannot write the run's state in {path}: {reason(exc)}. The run stopped; "
                f"the batches finished before are kept in {self.directory}: make room (or "
                "fix the folder) and re-run the same command to resume"
            ) from exc


def _fits(schema: pa.Schema, target: pa.Schema) -> bool:
    for field in schema:
        index = target.get_field_index(field.name)
        if index < 0:
            return False
        wanted = target.field(index).type
        if field.type != wanted and not pa.types.is_null(field.type):
            return False
    return True


def journal_parts(directory: Path) -> list[Path]:
    """The journal's parts, oldest generation first."""
    return sorted(directory.glob("part-*.arrows"))


def next_generation(directory: Path) -> int:
    generations = [int(part.name.split("-")[1]) for part in journal_parts(directory)]
    return max(generations, default=-1) + 1


# A killed run can leave a part whose last message is cut off: the batches before it stand.
_TRUNCATED = (OSError, pa.ArrowInvalid)


def read_journal(parts: Sequence[Path]) -> Iterator[pa.RecordBatch]:
    """Every whole batch in the parts, in the order written; a cut-off tail is skipped."""
    for part in parts:
        with pa.OSFile(str(part), "rb") as source:
            try:
                reader = pa.ipc.open_stream(source)
                while True:
                    yield reader.read_next_batch()
            except StopIteration:
                continue
            except _TRUNCATED:
                log.warning("journal part %s ends in a cut-off batch: skipped", part.name)


def by_batch(message: pa.RecordBatch) -> Iterator[tuple[int, pa.RecordBatch]]:
    """A journal message's batches: (seq, its rows), in the order they were written.

    A message holds the rows of one or more batches, each batch's rows together."""
    if message.num_rows == 0:
        return
    seqs = message.column(SEQ)
    first = seqs[0].as_py()
    # The common case, one batch, is checked in C without a loop.
    if seqs[-1].as_py() == first and pc.all(pc.equal(seqs, first)).as_py():
        yield first, message
        return
    runs = pc.run_end_encode(seqs)
    start = 0
    for seq, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        yield seq, message.slice(start, end - start)
        start = end
