"""Reading outputs back: `inspect_output` and `batchrunner inspect`, on outputs of real runs and
on hand-made Parquet files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner import inspection
from batchrunner.errors import InputError
from batchrunner.inspection import ErrorKindCount, ErrorRow, inspect_output
from batchrunner.summary import RunSummary
from tests.conftest import REPO, write_csv, write_job

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
RESULT_FIELDS = (*((name, "double") for name in FEATURES), ("predictresult", "string"))
MISSING_WIDTH = "HTTP 400 MR.0105: req_data[0]: the field 'petal_width' must be a number, got null"
MISSING_SEPAL = "HTTP 400 MR.0105: req_data[0]: the field 'sepal_width' must be a number, got null"


@pytest.fixture
def with_errors(invoke) -> Path:
    """A real run's output: five rows, two of which the model refuses (a feature missing)."""
    data = write_csv(
        Path("partial.csv"),
        FEATURES,
        [
            (5.1, 3.5, 1.4, 0.2),
            (6.7, 3.0, 5.2, ""),
            (6.3, 2.5, 5.0, 1.9),
            (4.9, "", 1.4, 0.2),
            (5.0, 3.6, 1.4, 0.2),
        ],
    )
    job = write_job(
        Path("partial.toml"),
        f'[input]\npath = "{data}"\n[service]\nurl = "embedded:iris"\n[batch]\nsize = 1\n',
    )
    assert invoke("run", str(job)).exit_code == 1
    return Path("out/partial.parquet")


@pytest.fixture
def without_errors(invoke) -> Path:
    """A real run's output: the iris sample, every row scored."""
    shutil.copy(REPO / "samples" / "iris.csv", "iris.csv")
    job = write_job(
        Path("iris.toml"),
        'name = "iris"\n[input]\npath = "iris.csv"\nid_column = "id"\n'
        'columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]\n'
        '[service]\nurl = "embedded:iris"\n',
    )
    result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    return Path("out/iris.parquet")


def test_an_output_with_errors(with_errors: Path) -> None:
    found = inspect_output(with_errors, error_limit=10)
    assert found.rows == 5
    assert found.statuses == (("ok", 3), ("error", 2))
    assert found.error_kinds == (ErrorKindCount("model_error", 2, "1", MISSING_WIDTH),)
    assert found.error_rows == (
        ErrorRow("1", "model_error", MISSING_WIDTH),
        ErrorRow("3", "model_error", MISSING_SEPAL),
    )
    assert found.fields == RESULT_FIELDS
    assert found.summary is not None
    assert found.summary.to_json()["rows"] == {
        "total": 5,
        "ok": 3,
        "error": 2,
        "skipped": 0,
        "resumed": 0,
    }


def test_an_output_without_errors(without_errors: Path) -> None:
    found = inspect_output(without_errors, error_limit=10)
    assert found.rows == 150
    assert found.statuses == (("ok", 150),)
    assert found.error_kinds == ()
    assert found.error_rows == ()
    assert found.fields == RESULT_FIELDS
    assert found.summary is not None and found.summary.outcome == "done"


def test_error_rows_only_when_asked(with_errors: Path) -> None:
    assert inspect_output(with_errors).error_rows == ()
    assert len(inspect_output(with_errors, error_limit=1).error_rows) == 1


def test_streamed_through_small_batches_and_without_metadata(monkeypatch) -> None:
    # Not written by batchrunner (no summary), but with _status: counted. Read two rows at a
    # time, the counts and the first example of each kind span the batches.
    pq.write_table(
        pa.table(
            {
                "_key": ["a", "b", "c", "d", "e", "f", "g"],
                "_status": ["ok", "error", "ok", "error", "error", None, "error"],
                "_error_kind": [None, "timeout", None, "http_503", "timeout", None, None],
                "_error": [None, "t1", None, "h1", "t2", None, "?"],
                "score": [1.0, None, 2.0, None, None, None, None],
            }
        ),
        "foreign.parquet",
    )
    monkeypatch.setattr(inspection, "ROWS_PER_READ", 2)
    found = inspect_output(Path("foreign.parquet"), error_limit=3)
    assert found.summary is None
    assert found.rows == 7
    assert dict(found.statuses) == {"ok": 2, "error": 4, "(none)": 1}
    assert found.error_kinds == (
        ErrorKindCount("timeout", 2, "b", "t1"),
        ErrorKindCount("http_503", 1, "d", "h1"),
        ErrorKindCount("error", 1, "g", "?"),  # no kind given: counted as the runner does
    )
    assert [row.key for row in found.error_rows] == ["b", "d", "e"]
    assert found.fields == (("score", "double"),)


def test_only_a_status_column() -> None:
    pq.write_table(pa.table({"_status": ["error", "ok"]}), "bare.parquet")
    found = inspect_output(Path("bare.parquet"), error_limit=5)
    assert found.error_kinds == (ErrorKindCount("error", 1, None, None),)
    assert found.error_rows == (ErrorRow(None, None, None),)


@pytest.mark.parametrize(
    ("setup", "path", "message"),
    [
        (lambda: None, "nope.parquet", "no such file: nope.parquet"),
        (
            lambda: Path("out").mkdir(),
            "out",
            "out is a folder with no Parquet parts: give an output file, e.g. out/<job>.parquet, "
            "or an output folder of --engine ray",
        ),
        (
            lambda: pq.write_table(pa.table({"a": [1], "b": ["x"]}), "other.parquet"),
            "other.parquet",
            "other.parquet is not a batchrunner output: it has no _status column "
            "(its columns: a, b)",
        ),
    ],
)
def test_what_cannot_be_inspected(setup, path: str, message: str) -> None:
    setup()
    with pytest.raises(InputError) as caught:
        inspect_output(Path(path))
    assert str(caught.value) == message
    assert caught.value.exit_code == 2


def test_not_parquet() -> None:
    Path("data.txt").write_text("a,b\n1,2\n")
    with pytest.raises(InputError) as caught:
        inspect_output(Path("data.txt"))
    assert str(caught.value).startswith("data.txt is not a Parquet file (")
    assert str(caught.value).endswith("): give an output of batchrunner run")
    # a CSV file is read as CSV (an output may be one), but this one is no output
    Path("data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError) as caught:
        inspect_output(Path("data.csv"))
    assert str(caught.value) == (
        "data.csv is not a batchrunner output: it has no _status column (its columns: a, b)"
    )


# --- the command ----------------------------------------------------------------------------------


def test_inspect_command(invoke, with_errors: Path) -> None:
    result = invoke("inspect", str(with_errors))
    assert result.exit_code == 0, result.stderr
    sections = result.stdout.split("\n\n")
    assert sections[0] == "out/partial.parquet: 5 rows"
    assert sections[1].startswith(
        "run summary (from the file's metadata): partial: done, with too many errors\n  run "
    )
    assert "\n  rows        3 ok, 2 errors, 0 skipped\n" in sections[1]
    assert sections[2:5] == [
        "rows by status\n  ok     3\n  error  2",
        f"error kinds\n  model_error  2 rows, e.g. key 1: {MISSING_WIDTH}",
        "result fields\n"
        "  sepal_length   double\n"
        "  sepal_width    double\n"
        "  petal_length   double\n"
        "  petal_width    double\n"
        "  predictresult  string",
    ]
    # the charts: throughput over the run (one bucket: a short run), latency histogram
    assert re.fullmatch(r"throughput \(rows/s over [\d.]+ s; peak [\d,]+\)\n  █", sections[5]), (
        sections[5]
    )
    latency = sections[6].splitlines()
    assert latency[0] == "latency (rows by their request's latency)"
    assert sum(int(line.split()[-1]) for line in latency[1:]) == 5  # every row answered
    assert all(re.fullmatch(r" +[\d.]+( ms)?-[\d.]+ m?s  █* +\d+", line) for line in latency[1:])
    assert sections[6].endswith("\n")


def test_inspect_errors(invoke, with_errors: Path) -> None:
    result = invoke("inspect", str(with_errors), "--errors", "--limit", "1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith(
        f"\n\nerror rows (1 of 2)\n  key 1  model_error: {MISSING_WIDTH}\n"
    )
    every = invoke("inspect", str(with_errors), "--errors")
    assert every.stdout.endswith(
        f"\n\nerror rows\n  key 1  model_error: {MISSING_WIDTH}\n"
        f"  key 3  model_error: {MISSING_SEPAL}\n"
    )


def test_inspect_without_errors(invoke, without_errors: Path) -> None:
    result = invoke("inspect", str(without_errors), "--errors")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("out/iris.parquet: 150 rows\n\n")
    assert "\n\nrows by status\n  ok  150\n\nresult fields\n" in result.stdout
    assert "error kinds" not in result.stdout
    assert result.stdout.endswith("\n\nerror rows: none\n")


def test_inspect_a_foreign_file(invoke) -> None:
    pq.write_table(pa.table({"_status": ["ok"], "y": [1]}), "foreign.parquet")
    result = invoke("inspect", "foreign.parquet")
    assert result.exit_code == 0
    assert result.stdout.startswith(
        "foreign.parquet: 1 rows\n\n"
        "run summary: none in the file's metadata (not written by batchrunner run)\n\n"
    )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nope.parquet", "error: no such file: nope.parquet\n"),
        (
            "plain.parquet",
            "error: plain.parquet is not a batchrunner output: it has no _status column "
            "(its columns: x)\n",
        ),
    ],
)
def test_inspect_refuses_with_exit_2(invoke, path: str, message: str) -> None:
    pq.write_table(pa.table({"x": [1]}), "plain.parquet")
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert result.stderr == message


def test_a_folder_of_parts_is_read_as_one_output() -> None:
    # What --engine ray writes: parts with the output's columns, in no particular order.
    Path("parts").mkdir()
    pq.write_table(pa.table({"_key": ["2", "1"], "_status": ["ok", "ok"]}), "parts/a.parquet")
    pq.write_table(
        pa.table({"_key": ["3"], "_status": ["error"], "_error_kind": ["http_503"]}),
        "parts/b.parquet",
    )
    found = inspect_output(Path("parts"))
    assert found.rows == 3
    assert found.summary is None
    # its summary, when there is one, is beside it
    Path("parts.summary.json").write_bytes(orjson.dumps({"job": "j", "outcome": "done"}))
    summary = inspect_output(Path("parts")).summary
    assert summary is not None and (summary.job, summary.outcome) == ("j", "done")
    assert summary == RunSummary.from_json({"job": "j", "outcome": "done"})
    assert found.statuses == (("ok", 2), ("error", 1))
    assert [(kind.kind, kind.rows) for kind in found.error_kinds] == [("http_503", 1)]


def test_inspect_counts_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "dups.parquet"
    keys = ["a", "b", "a", "c", "b", "a"]
    pq.write_table(pa.table({"_key": keys, "_status": ["ok"] * 6}), path)
    assert inspect_output(path).duplicate_keys == 3


# --- the results themselves: --head and --counts ---------------------------------------------


def test_head_rows(with_errors: Path) -> None:
    head = inspection.head_rows(with_errors, 3)
    assert head.total == 5
    assert head.columns[:3] == ("_key", "_status", "_error")
    assert head.columns[3:] == tuple(name for name, _ in RESULT_FIELDS)
    assert [row[:2] for row in head.rows] == [("0", "ok"), ("1", "error"), ("2", "ok")]
    assert head.rows[1][2] == MISSING_WIDTH


def test_inspect_head_command(invoke, with_errors: Path) -> None:
    result = invoke("inspect", str(with_errors), "--head", "2")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{with_errors}: first 2 of 5 rows"
    assert lines[1].split() == ["_key", "_status", "_error", *(n for n, _ in RESULT_FIELDS)]
    assert lines[2].split()[:3] == ["0", "ok", "-"]
    # a long error message is cut to one short cell, with an ellipsis
    assert "HTTP 400 MR.0105: req_d…" in lines[3]
    assert len(lines) == 4


def test_count_values(without_errors: Path) -> None:
    counts = inspection.count_values(without_errors, "predictresult")
    assert counts.rows == 150
    assert sum(n for _, n in counts.counts) == 150
    assert {value for value, _ in counts.counts} == {"setosa", "versicolor", "virginica"}
    assert [n for _, n in counts.counts] == sorted((n for _, n in counts.counts), reverse=True)
    nulls = inspection.count_values(Path(without_errors), "_error")
    assert nulls.counts == ((None, 150),)


def test_count_values_of_nested_fields_and_booleans(tmp_path: Path) -> None:
    table = pa.table(
        {
            "_key": ["a", "b", "c"],
            "_status": ["ok", "ok", "ok"],
            "labels": [[1, 2], [1, 2], None],
            "flag": [True, False, True],
        }
    )
    pq.write_table(table, tmp_path / "nested.parquet")
    labels = inspection.count_values(tmp_path / "nested.parquet", "labels")
    assert labels.counts == (("[1,2]", 2), (None, 1))
    flags = inspection.count_values(tmp_path / "nested.parquet", "flag")
    assert flags.counts == (("true", 2), ("false", 1))


def test_inspect_counts_command(invoke, without_errors: Path) -> None:
    result = invoke("inspect", str(without_errors), "--counts", "predictresult", "--limit", "2")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"predictresult in {without_errors}: 150 rows, 3 distinct values"
    assert len(lines) == 4
    assert re.fullmatch(r"  (setosa|versicolor|virginica) +\d+ +\d+\.\d% +█+", lines[1])
    assert re.fullmatch(r"  \(and 1 more\) +\d+", lines[3])


def test_inspect_counts_of_an_unknown_field(invoke, without_errors: Path) -> None:
    result = invoke("inspect", str(without_errors), "--counts", "predictreslt")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {without_errors} has no field 'predictreslt' (did you mean 'predictresult'?); "
        "its result fields: sepal_length, sepal_width, petal_length, petal_width, predictresult\n"
    )
