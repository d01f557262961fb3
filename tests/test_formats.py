"""CSV and JSON lines outputs: chosen by the output path's suffix, the same rows, the same
whole-or-absent commit and summary as Parquet."""

from __future__ import annotations

import csv
import re
from array import array
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrunner import formats
from batchrunner.errors import CoverageError, WriteError
from batchrunner.formats import OutputFormat, output_format
from batchrunner.sink import RESERVED, assemble, outcome_table
from tests.conftest import write_csv, write_job
from tests.servers import Call, ThreadedServer, answer
from tests.test_sink import journal_of, ok


@pytest.fixture
def nested_server():
    async def handle(call: Call) -> web.Response:
        return answer(call, tags=["a", "b"], info={"depth": 1, "name": "x"})

    with ThreadedServer(handle) as server:
        yield server


def job_file(server: ThreadedServer, output: str) -> Path:
    data = write_csv(Path("data.csv"), ["id", "x"], [(f"r{i}", i) for i in range(5)])
    return write_job(
        Path("job.toml"),
        f'name = "job"\n[input]\npath = "{data}"\nid_column = "id"\n'
        f'[service]\nurl = "{server.url}"\n[batch]\nsize = 2\n[output]\npath = "{output}"\n',
    )


def test_csv_output(invoke, nested_server: ThreadedServer) -> None:
    result = invoke("run", str(job_file(nested_server, "out/{name}.csv")))
    assert result.exit_code == 0, result.stderr
    assert not Path("out/job.parquet").exists()
    with Path("out/job.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[: len(RESERVED)] == RESERVED.names
    assert list(rows[0])[len(RESERVED) :] == ["x", "score", "tags", "info"]
    assert [row["_key"] for row in rows] == [f"r{i}" for i in range(5)]  # input order
    assert {row["_status"] for row in rows} == {"ok"}
    assert rows[0]["_error"] == ""  # null
    # nested values as JSON text
    assert orjson.loads(rows[0]["tags"]) == ["a", "b"]
    assert orjson.loads(rows[0]["info"]) == {"depth": 1, "name": "x"}
    summary = orjson.loads(Path("out/job.csv.summary.json").read_bytes())
    assert summary["output"] == "out/job.csv"
    assert summary["rows"]["ok"] == 5
    # inspect reads it back, the summary from beside it
    shown = invoke("inspect", "out/job.csv")
    assert shown.exit_code == 0, shown.stderr
    assert "run summary (from job.csv.summary.json): job: done" in shown.stdout
    assert re.search(r"\n  ok +5\n", shown.stdout)
    head = invoke("inspect", "out/job.csv", "--head", "1")
    assert head.stdout.splitlines()[2].split()[:3] == ["r0", "ok", "-"]


def test_jsonl_output(invoke, nested_server: ThreadedServer) -> None:
    result = invoke("run", str(job_file(nested_server, "out/{name}.jsonl")))
    assert result.exit_code == 0, result.stderr
    lines = Path("out/job.jsonl").read_bytes().splitlines()
    rows = [orjson.loads(line) for line in lines]
    assert [row["_key"] for row in rows] == [f"r{i}" for i in range(5)]
    assert rows[0]["_error"] is None
    assert rows[0]["tags"] == ["a", "b"]  # nested values stay nested
    assert rows[0]["info"] == {"depth": 1, "name": "x"}
    assert rows[0]["_http_status"] == 200
    assert orjson.loads(Path("out/job.jsonl.summary.json").read_bytes())["rows"]["ok"] == 5
    counts = invoke("inspect", "out/job.jsonl", "--counts", "tags")
    assert counts.exit_code == 0, counts.stderr
    assert '["a","b"]' in counts.stdout
    assert "5 rows, 1 distinct value" in counts.stdout


def test_another_suffix_is_refused(invoke, nested_server: ThreadedServer) -> None:
    result = invoke("run", str(job_file(nested_server, "out/{name}.xlsx")))
    assert result.exit_code == 2
    assert result.stderr == (
        "error: output.path: must end in .parquet (or .csv, .jsonl), got 'out/job.xlsx'\n"
    )
    assert output_format(Path("A.CSV")) is OutputFormat.csv
    assert output_format(Path("a.json")) is None


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_whole_or_absent(tmp_path: Path, suffix: str, monkeypatch) -> None:
    state = journal_of(tmp_path, [outcome_table([ok(s, [f"k{s}"], [{"v": [s]}])]) for s in (0, 1)])
    output = tmp_path / f"o{suffix}"
    with pytest.raises(CoverageError):
        assemble(state, output, array("q", [1, 2]))
    assert not output.exists()
    # a failure half-way through writing leaves nothing either
    calls = []

    def failing_write(self, table):
        calls.append(table)
        raise OSError(28, "No space left on device")

    for writer in (formats._CsvWriter, formats._JsonLinesWriter, formats._Writer):
        monkeypatch.setattr(writer, "write_table", failing_write)
    with pytest.raises(WriteError, match="No space left"):  # exit 74, the journal kept
        assemble(state, output, array("q", [1, 1]))
    assert calls
    assert not output.exists()
    assert not list(tmp_path.glob(".*tmp*"))
    monkeypatch.undo()
    assert assemble(state, output, array("q", [1, 1])) == 2
    assert output.exists()
    if suffix == ".parquet":  # only Parquet has the column types (and metadata) in the file
        assert pq.read_table(output).column("v").to_pylist() == [[0], [1]]
