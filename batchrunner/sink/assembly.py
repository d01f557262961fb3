"""Assembly: the journal's batches, indexed, checked to cover the input exactly once, then
read back in input order, each from its place, into one output file written aside and
renamed into place. Memory holds the index (a few bytes per batch), never the results."""

from __future__ import annotations

import os
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from batchrunner.errors import CoverageError, WriteError
from batchrunner.formats import OutputFormat, open_output_writer, output_format
from batchrunner.sink.journal import by_batch, journal_parts
from batchrunner.sink.rows import RESERVED, SEQ
from batchrunner.sink.schemas import conform, merge_schemas
from batchrunner.writing import aside_name, fsync, open_write, reason

SUMMARY_METADATA_KEY = b"batchrunner.summary"
# Rows per output row group. The Parquet writer's own buffers grow with it: with the wide
# answers' six result fields, 32,768 rows put the assembly's peak at 147-157 MB, 16,384 at
# 141-144 MB (the benchmark allows 150).
ROW_GROUP_ROWS = 16 * 1024
# At most this many row groups (more rows a group, past ROW_GROUP_ROWS, for a large output):
# the file's footer describes each group's column chunks, about 1 KB each once read back, and
# is read whole by any reader (a night's index update, inspect): 57 MB for 100,000,000 rows
# in groups of 16,384, 10 MB in 1,024 groups.
MAX_ROW_GROUPS = 1024
# Batches waiting for their row group are merged this many at a time: a batch of one row
# (an image) costs kilobytes as separate Arrow buffers, and a row group holds 32,768 of them.
MERGE_BATCHES = 1024


@dataclass
class _Index:
    """Where each batch of the journal is: its part, its message's offset there, and the
    row its rows start at in that message."""

    parts: list[Path]
    schemas: list[pa.Schema]
    part_of: array[int]
    offset_of: array[int]
    row_of: array[int]


def _index_journal(parts: Sequence[Path], rows_per_batch: array[int]) -> _Index:
    expected = len(rows_per_batch)
    part_of = array("i", [-1]) * expected
    offset_of = array("q", [0]) * expected
    row_of = array("q", [0]) * expected
    schemas = []
    for number, part in enumerate(parts):
        with pa.OSFile(str(part), "rb") as source:
            reader = pa.ipc.open_stream(source)
            schemas.append(reader.schema)
            while True:
                offset = source.tell()
                try:
                    message = reader.read_next_batch()
                except StopIteration:
                    break
                row = 0
                for seq, batch in by_batch(message):
                    if not 0 <= seq < expected:
                        raise CoverageError(_coverage_message(f"batch {seq} was not read"))
                    if part_of[seq] >= 0:
                        raise CoverageError(_coverage_message(f"batch {seq} appears twice"))
                    if batch.num_rows != rows_per_batch[seq]:
                        raise CoverageError(
                            _coverage_message(
                                f"batch {seq} has {batch.num_rows} result rows "
                                f"for {rows_per_batch[seq]} input rows"
                            )
                        )
                    part_of[seq] = number
                    offset_of[seq] = offset
                    row_of[seq] = row
                    row += batch.num_rows
    # A batch left with no rows (every row done by an earlier run: input.incremental) was not
    # sent, so it has nothing in the journal; it is covered as it is.
    missing = [seq for seq in range(expected) if part_of[seq] < 0 and rows_per_batch[seq]]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise CoverageError(
            _coverage_message(f"{len(missing)} of {expected} batches have no results ({shown})")
        )
    return _Index(list(parts), schemas, part_of, offset_of, row_of)


# Messages read back and kept for the batches after: batches finish roughly in input order,
# so those journaled together are mostly read back close together. At most this many
# messages, and rows (beyond the one message being read).
_CACHED_MESSAGES = 16
_CACHED_ROWS = 16 * 1024


def _in_input_order(index: _Index, rows_per_batch: array[int]) -> Iterator[pa.RecordBatch]:
    # Batches finish out of order and resumed runs add parts: read each one from its place.
    sources = [pa.OSFile(str(part), "rb") for part in index.parts]
    cache: OrderedDict[tuple[int, int], pa.RecordBatch] = OrderedDict()
    cached_rows = 0
    try:
        for seq in range(len(index.part_of)):
            number = index.part_of[seq]
            if number < 0:
                continue  # a batch with no rows (see _index_journal)
            where = (number, index.offset_of[seq])
            message = cache.get(where)
            if message is None:
                source = sources[number]
                source.seek(where[1])
                message = pa.ipc.read_record_batch(
                    pa.ipc.read_message(source), index.schemas[number]
                )
                cache[where] = message
                cached_rows += message.num_rows
                while len(cache) > 1 and (
                    len(cache) > _CACHED_MESSAGES or cached_rows > _CACHED_ROWS
                ):
                    cached_rows -= cache.popitem(last=False)[1].num_rows
            rows = rows_per_batch[seq]
            if rows == message.num_rows:
                yield message
            else:
                yield message.slice(index.row_of[seq], rows)
    finally:
        for source in sources:
            source.close()


def assemble(
    journal_dir: Path,
    output: Path,
    rows_per_batch: array[int],
    *,
    metadata: Mapping[bytes, bytes] | None = None,
    format: OutputFormat | None = None,
) -> int:
    """Write the journal's batches, in input order, to ``output`` (written aside, renamed).

    ``rows_per_batch[seq]`` is how many rows batch ``seq`` had when read (0: none to send,
    and none in the journal): the proof that nothing is lost or doubled. Raises
    ``CoverageError`` (and writes nothing) otherwise.
    Returns the number of rows written.
    """
    index = _index_journal(journal_parts(journal_dir), rows_per_batch)
    merged = merge_schemas([RESERVED, *index.schemas])
    result_fields = [f for f in merged if f.name not in RESERVED.names and f.name != SEQ]
    schema = pa.schema([*RESERVED, *result_fields], metadata=dict(metadata or {}))

    group_rows = max(ROW_GROUP_ROWS, -(-sum(rows_per_batch) // MAX_ROW_GROUPS))
    temporary = aside_name(output)
    written = 0
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        kind = format or output_format(output) or OutputFormat.parquet  # see formats
        with open_write(temporary) as file, open_output_writer(file, schema, kind) as writer:
            pending: list[pa.RecordBatch] = []
            pending_rows = 0
            merged = 0  # pending[:merged] are merged runs of batches; the rest as read
            for batch in _in_input_order(index, rows_per_batch):
                pending.append(conform(batch.drop_columns([SEQ]), schema))
                pending_rows += batch.num_rows
                if len(pending) - merged >= MERGE_BATCHES:
                    # Only the batches not merged yet: what is merged is never copied again.
                    pending[merged:] = [pa.concat_batches(pending[merged:])]
                    merged += 1
                if pending_rows >= group_rows:
                    writer.write_table(pa.Table.from_batches(pending, schema))
                    written += pending_rows
                    pending, pending_rows, merged = [], 0, 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema))
                written += pending_rows
        fsync(temporary)
        os.replace(temporary, output)
        fsync(output.parent)
    except OSError as exc:
        raise WriteError(
            f"cannot write the output {output}: {reason(exc)}. Every result is kept in "
            f"{journal_dir}: make room (or fix the folder) and re-run the same command; it "
            "writes the output again without sending anything"
        ) from exc
    finally:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
    return written


def _coverage_message(detail: str) -> str:
    return (
        f"the results do not cover the input exactly once: {detail}. "
        "The output was not written; the journal is kept for inspection."
    )
