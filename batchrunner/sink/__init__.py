"""Where results go: a journal of finished batches, then one Parquet file in input order.

While the run goes, finished batches are appended to a journal part (Arrow IPC stream files
in a state folder beside the output) in the order they finish: the batches that finished
together become one record batch (a message), nothing is held back, so a crash loses only
what was in flight. At the end, ``assemble`` indexes the parts (where each batch's message
starts and its row there), checks that every batch is there exactly once with all its rows,
merges the schemas (a field that appears later is added; types that disagree become JSON
text), then reads the batches back in input order, each from its place, and writes the
Parquet file aside before renaming it into place. Memory holds the index (a few bytes per
batch), never the results.

The package's modules, each importing only those above it:

    schemas     merged types and schemas, a batch conformed to one, values as JSON text
    rows        outcomes as an Arrow record batch: reserved columns, results, kept input
    journal     the journal's parts: appended, held against removal, read back
    assembly    the journal indexed, checked and written in input order to the output

Everything public is importable from ``batchrunner.sink`` itself.
"""

from __future__ import annotations

from batchrunner.sink.assembly import (
    MERGE_BATCHES,
    ROW_GROUP_ROWS,
    SUMMARY_METADATA_KEY,
    assemble,
)
from batchrunner.sink.journal import (
    Journal,
    by_batch,
    journal_parts,
    next_generation,
    read_journal,
)
from batchrunner.sink.rows import (
    JSON_TEXT,
    MAX_NESTING,
    RESERVED,
    RESULT_SUFFIX,
    SEQ,
    SPREAD_BY_REPEATS,
    SPREAD_IN_PYTHON,
    nesting_depth,
    outcome_table,
)
from batchrunner.sink.schemas import conform, merge_schemas, merge_types

__all__ = [
    "JSON_TEXT",
    "MAX_NESTING",
    "MERGE_BATCHES",
    "RESERVED",
    "RESULT_SUFFIX",
    "ROW_GROUP_ROWS",
    "SEQ",
    "SPREAD_BY_REPEATS",
    "SPREAD_IN_PYTHON",
    "SUMMARY_METADATA_KEY",
    "Journal",
    "assemble",
    "by_batch",
    "conform",
    "journal_parts",
    "merge_schemas",
    "merge_types",
    "nesting_depth",
    "next_generation",
    "outcome_table",
    "read_journal",
]
