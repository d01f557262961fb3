"""`batchrunner retry`: only the error rows are sent again; the new output is complete (ok rows
kept, retried rows in place, input order), whole or not at all."""

from __future__ import annotations

import csv
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from tests.conftest import read_output, write_csv, write_job
from tests.servers import Call, ThreadedServer, answer, gateway_error


class Flaky:
    """A service that refuses the rows whose x is in ``bad`` (a model error, not retried)."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad
        self.sent: list[int] = []

    async def handle(self, call: Call) -> web.Response:
        records = call.body["data"]["req_data"]
        self.sent += [record["x"] for record in records]
        if any(record["x"] in self.bad for record in records):
            return gateway_error(400, "MR.0105", "cannot score this row")
        return answer(call)


@pytest.fixture
def flaky():
    service = Flaky({1, 4})
    with ThreadedServer(service.handle) as server:
        yield service, server


def job_file(server: ThreadedServer, size: int = 1) -> Path:
    data = write_csv(Path("data.csv"), ["id", "x"], [(f"r{i}", i) for i in range(6)])
    return write_job(
        Path("job.toml"),
        f'name = "job"\n[input]\npath = "{data}"\nid_column = "id"\n'
        f'[service]\nurl = "{server.url}"\n[batch]\nsize = {size}\n',
    )


@pytest.mark.parametrize("size", [1, 3])
def test_only_the_error_rows_are_sent_again(invoke, flaky, size: int) -> None:
    service, server = flaky
    job = job_file(server, size)
    first = invoke("run", str(job))
    assert first.exit_code == 1
    before = read_output("out/job.parquet")
    assert [row["_status"] for row in before] == ["ok", "error", "ok", "ok", "error", "ok"]

    service.bad = set()  # fixed upstream
    service.sent = []
    result = invoke("retry", str(job), "out/job.parquet")
    assert result.exit_code == 0, result.stderr
    assert sorted(service.sent) == [1, 4]  # only the error rows
    after = read_output("out/job.parquet")
    assert [row["_key"] for row in after] == [f"r{i}" for i in range(6)]  # input order
    assert [row["_status"] for row in after] == ["ok"] * 6
    for index in (0, 2, 3, 5):  # the ok rows are kept as they were, not sent again
        assert after[index] == before[index]
    assert after[1]["x"] == 1 and after[4]["x"] == 4
    summary = orjson.loads(Path("out/job.parquet.summary.json").read_bytes())
    assert summary["retry"] == {
        "from": "out/job.parquet",
        "retried": 2,
        "now_ok": 2,
        "still_error": 0,
    }
    assert summary["rows"] == {"total": 6, "ok": 6, "error": 0, "skipped": 0, "resumed": 0}
    assert summary["outcome"] == "done"
    assert summary["errors"] == {}
    assert "  retried     2 error rows of out/job.parquet: 2 now ok, 0 still failing\n" in (
        result.stdout
    )
    # the file's metadata says the same
    shown = invoke("inspect", "out/job.parquet")
    assert "2 error rows of out/job.parquet: 2 now ok" in shown.stdout
    assert not list(Path("out").glob(".*tmp*"))
    assert not Path("out/.batchrunner/job.retry").exists()


def test_still_failing_rows_stay_error_rows(invoke, flaky) -> None:
    service, server = flaky
    job = job_file(server)
    assert invoke("run", str(job)).exit_code == 1
    service.bad = {4}
    result = invoke("retry", str(job), "out/job.parquet", "--log-format", "json")
    assert result.exit_code == 1
    summary = orjson.loads(result.stdout)
    assert summary["retry"]["now_ok"] == 1 and summary["retry"]["still_error"] == 1
    assert summary["rows"]["error"] == 1 and summary["outcome"] == "too_many_errors"
    rows = read_output("out/job.parquet")
    assert [row["_status"] for row in rows] == ["ok", "ok", "ok", "ok", "error", "ok"]
    assert rows[4]["_error_kind"] == "model_error"
    # again: only the one row left
    service.bad = set()
    service.sent = []
    assert invoke("retry", str(job), "out/job.parquet").exit_code == 0
    assert service.sent == [4]


def test_output_elsewhere_in_another_format(invoke, flaky) -> None:
    service, server = flaky
    job = job_file(server)
    assert invoke("run", str(job)).exit_code == 1
    original = Path("out/job.parquet").read_bytes()
    service.bad = set()
    result = invoke("retry", str(job), "out/job.parquet", "--output", "fixed/job.csv")
    assert result.exit_code == 0, result.stderr
    assert Path("out/job.parquet").read_bytes() == original  # untouched
    with Path("fixed/job.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["_key"], row["_status"]) for row in rows] == [(f"r{i}", "ok") for i in range(6)]
    assert Path("fixed/job.csv.summary.json").exists()


def test_nothing_to_retry(invoke, flaky) -> None:
    service, server = flaky
    service.bad = set()
    job = job_file(server)
    assert invoke("run", str(job)).exit_code == 0
    original = Path("out/job.parquet").read_bytes()
    service.sent = []
    result = invoke("retry", str(job), "out/job.parquet")
    assert result.exit_code == 0
    assert result.stderr == "out/job.parquet has no error rows: nothing to retry\n"
    assert service.sent == []
    assert Path("out/job.parquet").read_bytes() == original


def test_keys_gone_from_the_input_leave_the_output_as_it_was(invoke, flaky) -> None:
    service, server = flaky
    job = job_file(server)
    assert invoke("run", str(job)).exit_code == 1
    original = Path("out/job.parquet").read_bytes()
    write_csv(Path("data.csv"), ["id", "x"], [(f"r{i}", i) for i in (0, 1, 2)])  # r4 is gone
    service.bad = set()
    result = invoke("retry", str(job), "out/job.parquet")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "error: 1 of the 2 error rows' keys are not in the input any more (data.csv): "
        "the output was left as it was. Retry with the input the output was made from, or run "
        "the job again"
    )
    assert Path("out/job.parquet").read_bytes() == original


def test_not_an_output(invoke, flaky) -> None:
    _, server = flaky
    job = job_file(server)
    result = invoke("retry", str(job), "missing.parquet")
    assert result.exit_code == 2
    assert result.stderr == "error: no such file: missing.parquet\n"
