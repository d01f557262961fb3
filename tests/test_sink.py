from __future__ import annotations

import re
import sys
from array import array
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner.errors import CoverageError
from batchrunner.items import Batch, Outcome
from batchrunner.sink import (
    RESERVED,
    SUMMARY_METADATA_KEY,
    Journal,
    assemble,
    assembly,
    conform,
    journal_parts,
    merge_types,
    outcome_table,
)
from batchrunner.sink import rows as sink_rows


def batch(seq: int, keys: list[str], kept: pa.RecordBatch | None = None) -> Batch:
    return Batch(
        seq, keys, rows=pa.RecordBatch.from_pydict({"x": list(range(len(keys)))}), kept=kept
    )


def ok(seq: int, keys: list[str], results: list[dict[str, object]]) -> Outcome:
    return Outcome(
        batch(seq, keys),
        results,
        http_status=200,
        attempts=1,
        latency_ms=1.5,
        request_uuid=f"u{seq}",
    )


def failed(seq: int, keys: list[str]) -> Outcome:
    return Outcome(
        batch(seq, keys), None, error="HTTP 503", error_kind="http_503", http_status=503, attempts=5
    )


def test_outcome_table_columns() -> None:
    table = outcome_table([ok(3, ["a", "b"], [{"label": "x"}, {"label": "y"}])])
    assert table.schema.names[:9] == ["_seq", *RESERVED.names]
    assert table.to_pydict()["_seq"] == [3, 3]
    assert table.to_pydict()["label"] == ["x", "y"]
    assert table.to_pydict()["_status"] == ["ok", "ok"]
    assert table.to_pydict()["_request_uuid"] == ["u3", "u3"]


def test_error_outcome_has_reason_and_no_results() -> None:
    row = outcome_table([failed(0, ["a"])]).to_pylist()[0]
    assert row["_status"] == "error"
    assert row["_error"] == "HTTP 503"
    assert row["_error_kind"] == "http_503"
    assert row["_attempts"] == 5


def test_mixed_types_within_a_batch_become_json_text() -> None:
    table = outcome_table([ok(0, ["a", "b"], [{"v": 1}, {"v": "one"}])])
    assert table.column("v").to_pylist() == ["1", '"one"']


def test_result_field_never_overwrites_reserved_or_kept_columns() -> None:
    kept = pa.RecordBatch.from_pydict({"x": [10]})
    outcome = Outcome(batch(0, ["a"], kept=kept), [{"x": 99, "_status": "mine"}], attempts=1)
    row = outcome_table([outcome], kept_names=["x"]).to_pylist()[0]
    assert row["x"] == 10
    assert row["x_result"] == 99
    assert row["_status"] == "ok"
    assert row["_status_result"] == "mine"


@pytest.mark.parametrize(
    ("a", "b", "merged"),
    [
        (pa.int64(), pa.int64(), pa.int64()),
        (pa.null(), pa.string(), pa.string()),
        (pa.int64(), pa.float64(), pa.float64()),
        (pa.int32(), pa.int64(), pa.int64()),
        (pa.int64(), pa.string(), pa.string()),
        (pa.list_(pa.float64()), pa.struct([("a", pa.int64())]), pa.string()),
    ],
)
def test_merge_types(a: pa.DataType, b: pa.DataType, merged: pa.DataType) -> None:
    assert merge_types(a, b) == merged


def test_conform_adds_missing_fields_and_converts() -> None:
    schema = pa.schema([("a", pa.float64()), ("b", pa.string()), ("c", pa.string())])
    source = pa.RecordBatch.from_pydict({"a": [1, 2], "b": [[1], None]})
    result = conform(source, schema).to_pydict()
    assert result == {"a": [1.0, 2.0], "b": ["[1]", None], "c": [None, None]}


def journal_of(tmp_path: Path, tables: list[pa.RecordBatch]) -> Path:
    journal = Journal(tmp_path / "state")
    for table in tables:
        journal.append(table)
    journal.close()
    return tmp_path / "state"


def test_assemble_restores_input_order_and_merges_schemas(tmp_path: Path) -> None:
    outcomes = [
        ok(0, ["a", "b"], [{"label": "a"}, {"label": "b"}]),
        ok(2, ["e"], [{"label": "c", "extra": 1.5}]),
        failed(1, ["c", "d"]),
    ]
    state = journal_of(tmp_path, [outcome_table([o]) for o in outcomes])
    assert len(journal_parts(state)) == 2  # 'extra' appeared: a new part; the rest fit
    output = tmp_path / "out" / "result.parquet"
    written = assemble(state, output, array("q", [2, 2, 1]), metadata={SUMMARY_METADATA_KEY: b"{}"})
    assert written == 5
    table = pq.read_table(output)
    assert table.column("_key").to_pylist() == ["a", "b", "c", "d", "e"]
    assert table.column("label").to_pylist() == ["a", "b", None, None, "c"]
    assert table.column("extra").to_pylist() == [None, None, None, None, 1.5]
    assert table.column("_status").to_pylist() == ["ok", "ok", "error", "error", "ok"]
    assert "_seq" not in table.schema.names
    assert table.schema.metadata[SUMMARY_METADATA_KEY] == b"{}"
    assert not list(output.parent.glob(".*tmp*"))


def test_types_that_disagree_across_batches_become_json_text(tmp_path: Path) -> None:
    state = journal_of(
        tmp_path,
        [outcome_table([ok(0, ["a"], [{"v": 1}])]), outcome_table([ok(1, ["b"], [{"v": [1, 2]}])])],
    )
    output = tmp_path / "o.parquet"
    assemble(state, output, array("q", [1, 1]))
    assert pq.read_table(output).column("v").to_pylist() == ["1", "[1,2]"]


def test_empty_run_writes_the_key_columns(tmp_path: Path) -> None:
    output = tmp_path / "o.parquet"
    assert assemble(journal_of(tmp_path, []), output, array("q")) == 0
    table = pq.read_table(output)
    assert table.num_rows == 0
    assert table.schema.names == RESERVED.names


def test_batches_with_no_rows_have_nothing_in_the_journal(tmp_path: Path) -> None:
    # input.incremental: a batch whose rows were all done by earlier runs is not sent
    state = journal_of(tmp_path, [outcome_table([ok(s, [f"k{s}"], [{}])]) for s in (1, 3)])
    output = tmp_path / "o.parquet"
    assert assemble(state, output, array("q", [0, 1, 0, 1, 0])) == 2
    assert pq.read_table(output).column("_key").to_pylist() == ["k1", "k3"]
    # a batch read with rows must still be there
    with pytest.raises(CoverageError, match=re.escape("1 of 5 batches have no results (2)")):
        assemble(state, output, array("q", [0, 1, 1, 1, 0]))


@pytest.mark.parametrize(
    ("seqs", "rows", "message"),
    [
        ([0, 0], [1, 1], "batch 0 appears twice"),
        ([0], [1, 1], "1 of 2 batches have no results (1)"),
        ([1], [1, 1], "1 of 2 batches have no results (0)"),
        ([0, 2], [1, 1], "batch 2 was not read"),
        ([0, 1], [1, 2], "batch 1 has 1 result rows for 2 input rows"),
    ],
)
def test_assemble_refuses_to_lose_or_double(
    tmp_path: Path, seqs: list[int], rows: list[int], message: str
) -> None:
    state = journal_of(tmp_path, [outcome_table([ok(s, [f"k{s}"], [{}])]) for s in seqs])
    output = tmp_path / "o.parquet"
    with pytest.raises(CoverageError, match=re.escape(message)):
        assemble(state, output, array("q", rows))
    assert not output.exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_journal_survives_an_unclosed_writer(tmp_path: Path) -> None:
    # A killed process never closes its part: every appended batch is still readable.
    journal = Journal(tmp_path / "state")
    for seq in range(3):
        journal.append(outcome_table([ok(seq, [f"k{seq}"], [{"v": seq}])]))
    copy = tmp_path / "copy"
    copy.mkdir()
    for part in journal_parts(tmp_path / "state"):
        (copy / part.name).write_bytes(part.read_bytes())
    journal.close()
    output = tmp_path / "o.parquet"
    assemble(copy, output, array("q", [1, 1, 1]))
    assert pq.read_table(output).column("v").to_pylist() == [0, 1, 2]


def test_result_columns_are_built_without_searching_for_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pyarrow's type inference imports dateutil on every call; when it is not installed,
    # each failed import searched sys.path again (~80 us, paid per result column per batch).
    searched: list[str] = []

    class Spy:
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            searched.append(name)

    monkeypatch.setattr(sys, "meta_path", [Spy(), *sys.meta_path])
    results = [{"label": "rose", "scores": [["rose", 0.9]], "n": 1}]
    outcome_table([ok(0, ["a"], results)])
    assert searched == []


def test_type_hints_skip_inference_but_never_change_values() -> None:
    hints: dict[str, pa.DataType] = {}
    first = outcome_table(
        [ok(0, ["a", "b"], [{"p": 0.5, "s": "x"}, {"p": 1.5, "s": "y"}])], (), hints
    )
    assert hints == {"p": pa.float64(), "s": pa.string()}
    assert first.column("p").to_pylist() == [0.5, 1.5]
    # a boolean is not taken for a number, and a number not for a string
    later = outcome_table(
        [ok(1, ["c", "d"], [{"p": True, "s": 3}, {"p": False, "s": 4}])], (), hints
    )
    assert later.column("p").type == pa.bool_()
    assert later.column("p").to_pylist() == [True, False]
    assert later.column("s").to_pylist() == [3, 4]


def test_results_with_different_fields_keep_them_all() -> None:
    table = outcome_table([ok(0, ["a", "b", "c"], [{"x": 1}, {"y": 2}, {"x": 3, "y": 4}])])
    assert table.column("x").to_pylist() == [1, None, 3]
    assert table.column("y").to_pylist() == [None, 2, 4]


def test_one_row_batches_are_merged_once_and_keep_their_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Images: one row per batch. Pending batches are merged a few at a time, each batch
    # copied once (merged runs are not merged again), and row groups keep their size.
    monkeypatch.setattr(assembly, "MERGE_BATCHES", 4)
    monkeypatch.setattr(assembly, "ROW_GROUP_ROWS", 10)
    merged: list[int] = []
    concat = pa.concat_batches

    def counting_concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
        merged.append(sum(b.num_rows for b in batches))
        return concat(batches)

    monkeypatch.setattr(assembly.pa, "concat_batches", counting_concat)
    order = [5, 3, 0, 4, 1, 2, *range(6, 25)]  # finished out of order
    tables = [outcome_table([ok(seq, [f"k{seq:02d}"], [{"n": seq}])]) for seq in order]
    state = journal_of(tmp_path, tables)
    merged.clear()
    output = tmp_path / "out.parquet"
    assert assemble(state, output, array("q", [1] * 25)) == 25
    assert merged == [4, 4, 4, 4, 4]  # never a merged run again: [4, 7, 10, ...] before
    assert pq.read_table(output).column("_key").to_pylist() == [f"k{i:02d}" for i in range(25)]
    metadata = pq.ParquetFile(output).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [10, 10, 5]


def test_a_large_output_has_at_most_max_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every reader reads the footer whole, about 1 KB a column chunk: 57 MB for 100,000,000
    # rows in groups of 16,384. Past MAX_ROW_GROUPS groups, the groups grow instead.
    monkeypatch.setattr(assembly, "ROW_GROUP_ROWS", 2)
    monkeypatch.setattr(assembly, "MAX_ROW_GROUPS", 4)
    tables = [outcome_table([ok(seq, [f"k{seq:02d}"], [{"n": seq}])]) for seq in range(25)]
    output = tmp_path / "out.parquet"
    assert assemble(journal_of(tmp_path, tables), output, array("q", [1] * 25)) == 25
    metadata = pq.ParquetFile(output).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [7, 7, 7, 4]
    assert pq.read_table(output).column("_key").to_pylist() == [f"k{i:02d}" for i in range(25)]


def test_batches_that_finished_together_share_one_message(tmp_path: Path) -> None:
    # The writer journals what finished together as one message: batches out of input
    # order, ok and failed, and split batches (two outcomes of one seq) side by side.
    together = [
        ok(3, ["g"], [{"label": "g", "p": 0.5}]),
        failed(1, ["c", "d"]),
        ok(0, ["a"], [{"label": "a", "p": 1.0}]),
        failed(0, ["b"]),  # batch 0 was split: its first row ok, its second refused
    ]
    first = outcome_table(together, (), {})
    assert first.column("_seq").to_pylist() == [3, 1, 1, 0, 0]
    assert first.column("label").to_pylist() == ["g", None, None, "a", None]
    assert first.column("_status").to_pylist() == ["ok", "error", "error", "ok", "error"]
    assert first.column("_attempts").to_pylist() == [1, 5, 5, 1, 5]
    second = outcome_table([ok(2, ["e", "f"], [{"label": "e"}, {"label": "f"}])])
    state = journal_of(tmp_path, [first, second])
    assert len(journal_parts(state)) == 1
    output = tmp_path / "out.parquet"
    assert assemble(state, output, array("q", [2, 2, 2, 1])) == 7
    table = pq.read_table(output)
    assert table.column("_key").to_pylist() == ["a", "b", "c", "d", "e", "f", "g"]
    assert table.column("label").to_pylist() == ["a", None, None, None, "e", "f", "g"]
    assert table.column("p").to_pylist() == [1.0, None, None, None, None, None, 0.5]
    assert table.column("_error").to_pylist()[:4] == [None, "HTTP 503", "HTTP 503", "HTTP 503"]


@pytest.mark.parametrize(
    ("messages", "rows", "message"),
    [
        ([[0, 1], [1]], [1, 1], "batch 1 appears twice"),
        ([[0, 1, 0]], [1, 1], "batch 0 appears twice"),  # a batch's rows apart
        ([[0, 2]], [1, 1, 1], "1 of 3 batches have no results (1)"),
        ([[1, 0]], [2, 1], "batch 0 has 1 result rows for 2 input rows"),
    ],
)
def test_shared_messages_are_checked_batch_by_batch(
    tmp_path: Path, messages: list[list[int]], rows: list[int], message: str
) -> None:
    tables = [outcome_table([ok(s, [f"k{s}"], [{}]) for s in seqs]) for seqs in messages]
    state = journal_of(tmp_path, tables)
    with pytest.raises(CoverageError, match=re.escape(message)):
        assemble(state, tmp_path / "o.parquet", array("q", rows))


def test_kept_columns_of_batches_journaled_together() -> None:
    # Batches of one run may keep columns whose types were widened between them, and a
    # dictionary column is journaled decoded.
    first = pa.RecordBatch.from_pydict({"x": pa.array([1], pa.int64())})
    dictionary = pa.array(["red"]).dictionary_encode()
    second = pa.RecordBatch.from_pydict({"x": pa.array([2.5], pa.float64())})
    third = pa.RecordBatch.from_arrays([pa.array([3.0])], names=["x"])
    outcomes = [
        Outcome(batch(0, ["a"], kept=first), [{"v": 1}], attempts=1),
        Outcome(batch(1, ["b"], kept=second), [{"v": 2}], attempts=1),
        Outcome(batch(2, ["c"], kept=third), None, error="HTTP 500", error_kind="http_500"),
    ]
    table = outcome_table(outcomes, ["x"])
    assert table.column("x").type == pa.float64()
    assert table.column("x").to_pylist() == [1.0, 2.5, 3.0]
    assert table.column("v").to_pylist() == [1, 2, None]
    coloured = Outcome(
        batch(0, ["a"], kept=pa.RecordBatch.from_arrays([dictionary], names=["c"])), [{}]
    )
    assert outcome_table([coloured], ["c"]).column("c").type == pa.string()


def test_a_field_once_json_text_stays_json_text_without_trying_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ["rose", 0.9] has no Arrow type: a failed inference costs more than the conversion, so
    # the field is remembered as JSON text; later values of it are JSON text as the merged
    # output column would make them anyway.
    hints: dict[str, pa.DataType] = {}
    first = outcome_table([ok(0, ["a"], [{"scores": [["rose", 0.9]]}])], (), hints)
    assert first.column("scores").to_pylist() == ['[["rose",0.9]]']
    inferred: list[object] = []
    array = pa.array

    def spying(values: object, type_: object = None, **options: object) -> pa.Array:
        if type_ is None:
            inferred.append(values)
        return array(values, type_, **options)

    monkeypatch.setattr(sink_rows.pa, "array", spying)
    later = outcome_table([ok(1, ["b", "c"], [{"scores": [[0.5]]}, {"scores": None}])], (), hints)
    assert later.column("scores").to_pylist() == ["[[0.5]]", None]
    assert inferred == []


def test_messages_evicted_from_the_read_cache_are_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assembly, "_CACHED_MESSAGES", 1)
    monkeypatch.setattr(assembly, "_CACHED_ROWS", 1)
    # batches 0..5 journaled in two messages that interleave in input order
    first = outcome_table([ok(s, [f"k{s}"], [{"n": s}]) for s in (4, 0, 2)])
    second = outcome_table([ok(s, [f"k{s}"], [{"n": s}]) for s in (1, 5, 3)])
    state = journal_of(tmp_path, [first, second])
    output = tmp_path / "out.parquet"
    assert assemble(state, output, array("q", [1] * 6)) == 6
    assert pq.read_table(output).column("n").to_pylist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("rows", [1, 300, 3000])  # a Python list, repeats, run-end decoding
def test_values_per_outcome_are_spread_over_their_rows(rows: int) -> None:
    outcomes = [ok(seq, [f"k{seq}-{i}" for i in range(rows)], [{}] * rows) for seq in range(6)]
    for count in (2, 6):  # few outcomes, many
        table = outcome_table(outcomes[:count])
        assert table.column("_seq").to_pylist() == [s for s in range(count) for _ in range(rows)]
        uuids = table.column("_request_uuid").to_pylist()
        assert uuids == [f"u{s}" for s in range(count) for _ in range(rows)]
    assert outcome_table([]).num_rows == 0
