"""End to end through the real command, on real files, against the embedded service."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from batchrunner.sink import SUMMARY_METADATA_KEY
from tests.conftest import REPO, read_output, write_csv, write_job


def iris_rows() -> list[dict[str, str]]:
    with (REPO / "samples" / "iris.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_iris_job_scores_every_row_in_order(invoke, iris_job: Path) -> None:
    result = invoke("run", str(iris_job))
    assert result.exit_code == 0, result.stderr
    rows = read_output("out/iris.parquet")
    expected = iris_rows()
    assert [row["_key"] for row in rows] == [row["id"] for row in expected]
    assert all(row["_status"] == "ok" and row["_error"] is None for row in rows)
    assert all(row["_attempts"] == 1 and row["_http_status"] == 200 for row in rows)
    # the predictions are the model's, and the model is good
    correct = sum(
        row["predictresult"] == truth["species"] for row, truth in zip(rows, expected, strict=True)
    )
    assert correct / len(rows) >= 0.9
    # the service echoed each row's own features back onto that row
    assert [row["sepal_length"] for row in rows] == [float(r["sepal_length"]) for r in expected]
    assert len({row["_request_uuid"] for row in rows}) == 3  # 150 rows in batches of 50
    # not a terminal: the summary is a plain table
    assert result.stdout.startswith("iris: done\n")
    assert "\n  rows        150 ok, 0 errors, 0 skipped\n" in result.stdout
    assert "\n  output      out/iris.parquet\n" in result.stdout
    assert "\n  summary     out/iris.parquet.summary.json\n" in result.stdout
    # a run that finished leaves no state, and says none was kept
    assert "run state kept" not in result.stderr
    assert not Path("out/.batchrunner/iris.state").exists()


def test_summary_file_and_metadata(invoke, iris_job: Path) -> None:
    assert invoke("run", str(iris_job)).exit_code == 0
    summary = orjson.loads(Path("out/iris.parquet.summary.json").read_bytes())
    assert summary["rows"] == {"total": 150, "ok": 150, "error": 0, "skipped": 0, "resumed": 0}
    assert summary["outcome"] == "done"
    assert summary["requests"] == 3
    assert summary["latency_ms"]["p50"] > 0
    assert set(summary) >= {"started", "finished", "rows_per_second", "fingerprint", "errors"}
    metadata = pq.read_schema("out/iris.parquet").metadata
    assert orjson.loads(metadata[SUMMARY_METADATA_KEY]) == summary
    assert not Path("out/iris.parquet.state").exists()


def test_limit(invoke, iris_job: Path) -> None:
    result = invoke("run", str(iris_job), "--limit", "7", "--batch-size", "3")
    assert result.exit_code == 0, result.stderr
    rows = read_output("out/iris.parquet")
    assert [row["_key"] for row in rows] == [str(i) for i in range(1, 8)]
    assert len({row["_request_uuid"] for row in rows}) == 3


def test_dry_run_shows_first_request_and_sends_nothing(invoke, iris_job: Path) -> None:
    result = invoke("run", str(iris_job), "--dry-run", "--batch-size", "2")
    assert result.exit_code == 0, result.stderr
    assert "rows:         150 in 75 requests of up to 2" in result.stdout
    assert "X-Auth-Token: ****" in result.stdout
    assert '"sepal_length": 5.1' in result.stdout
    assert "species" not in result.stdout.split("first request")[1]
    assert "dry run: nothing was sent" in result.stdout
    assert not Path("out").exists()


def test_options_without_job_file(invoke, features_csv: Path) -> None:
    # the embedded iris model needs its four features: give them under their names
    data = write_csv(
        Path("flowers.csv"),
        ["sepal_length", "sepal_width", "petal_length", "petal_width"],
        [(5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, 2.3)],
    )
    result = invoke("run", "--input", str(data), "--url", "embedded:iris", "--output", "o.parquet")
    assert result.exit_code == 0, result.stderr
    rows = read_output("o.parquet")
    assert [(r["_key"], r["predictresult"]) for r in rows] == [("0", "setosa"), ("1", "virginica")]


def test_options_without_job_file_need_input_and_url(invoke) -> None:
    result = invoke("run", "--input", "x.csv")
    assert result.exit_code == 2
    assert "give a job file, or at least --input and --url" in result.stderr


def test_validate_prints_plan(invoke, iris_job: Path) -> None:
    result = invoke("validate", str(iris_job))
    assert result.exit_code == 0, result.stderr
    assert "sends:        sepal_length, sepal_width, petal_length, petal_width" in result.stdout
    assert "rows:         150 in 3 requests of up to 50" in result.stdout
    assert "job is valid" in result.stdout


def test_empty_input_gives_empty_output(invoke) -> None:
    data = write_csv(Path("empty.csv"), ["sepal_length", "sepal_width"], [])
    result = invoke("run", "--input", str(data), "--url", "embedded:iris", "--output", "e.parquet")
    assert result.exit_code == 0, result.stderr
    table = pq.read_table("e.parquet")
    assert table.num_rows == 0
    assert table.schema.names[:3] == ["_key", "_status", "_error"]


def test_bad_rows_become_error_rows_and_exit_1(invoke) -> None:
    # the model refuses a batch with a missing feature: those rows fail, the others go on
    data = write_csv(
        Path("partial.csv"),
        ["sepal_length", "sepal_width", "petal_length", "petal_width"],
        [(5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, ""), (6.3, 2.5, 5.0, 1.9)],
    )
    job = write_job(
        Path("partial.toml"),
        f'[input]\npath = "{data}"\n[service]\nurl = "embedded:iris"\n[batch]\nsize = 1\n',
    )
    result = invoke("run", str(job))
    assert result.exit_code == 1
    rows = read_output("out/partial.parquet")
    assert [r["_status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["_error_kind"] == "model_error"
    assert rows[1]["_error"].startswith("HTTP 400 MR.0105:")
    assert rows[1]["_attempts"] == 1
    assert "error rate 33.33% is above max_error_rate 0.00%" in result.stderr
    assert "\n  errors      model_error: 1 rows, e.g. key 1: HTTP 400 MR.0105:" in result.stdout

    again = invoke("run", str(job), "--set", "max_error_rate=0.5")
    assert again.exit_code == 0


def test_keep_input(invoke, iris_job: Path) -> None:
    result = invoke("run", str(iris_job), "--set", "output.keep_input=true", "--limit", "2")
    assert result.exit_code == 0, result.stderr
    row = read_output("out/iris.parquet")[0]
    assert row["species"] == "setosa"  # an input column not sent
    assert row["id"] == "1"  # ids are read as text: "007" stays "007"
    assert row["sepal_length"] == 5.1  # the input's own column...
    assert row["sepal_length_result"] == 5.1  # ...and the service's echo, beside it


def test_log_format_json(invoke, iris_job: Path) -> None:
    result = invoke("run", str(iris_job), "--log-format", "json")
    assert result.exit_code == 0
    # every line on stderr is a JSON object, for log shippers; the summary is stdout's one
    # JSON document (`| jq`), the same as the summary file
    lines = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert {line["level"] for line in lines} == {"info"}
    assert lines[-1]["message"].endswith("done: output out/iris.parquet")
    summary = orjson.loads(result.stdout)
    assert summary["rows"]["ok"] == 150
    assert summary == orjson.loads(Path("out/iris.parquet.summary.json").read_bytes())


def test_help_for_every_command(invoke) -> None:
    for command in ("run", "validate", "serve", "cron", "inspect"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "Usage" in result.stdout


@pytest.mark.parametrize(
    ("chosen", "expected"), [("", "jemalloc"), ("mimalloc", "mimalloc"), ("system", "system")]
)
def test_runs_allocate_from_a_pool_that_gives_memory_back(chosen: str, expected: str) -> None:
    # mimalloc, pyarrow's default, keeps what a run freed: peak RSS 165-185 MB instead of
    # 135-150 MB over 1M rows; jemalloc gives it back (the keys benchmark's nights: 151-156 MB
    # against 158-177 MB with the system allocator). A pool the user chose stays.
    import pyarrow as pa

    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow is built without jemalloc")
    code = (
        "from batchrunner.wiring import use_lean_memory_pool; use_lean_memory_pool(); "
        "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    )
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": chosen}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == expected, done.stderr
