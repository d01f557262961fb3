"""The client against small fault-injecting servers on loopback, through the real command."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from aiohttp import web

from batchrunner.engines.local import Runner
from batchrunner.job import load_job
from tests.clocks import FakeClock
from tests.conftest import TOKEN, read_output, write_csv, write_job
from tests.servers import Call, ThreadedServer, answer, gateway_error

FAST_RETRIES = "[retry]\nmax_attempts = 3\nbackoff_initial = 0.001\nbackoff_max = 0.002\n"


def job_for(server: ThreadedServer, rows: int = 6, size: int = 2, extra: str = "") -> Path:
    data = write_csv(Path("data.csv"), ["id", "x"], [(f"r{i}", i) for i in range(rows)])
    text = (
        f'name = "faults"\n[input]\npath = "{data}"\nid_column = "id"\n'
        f'[service]\nurl = "{server.url}"\n[batch]\nsize = {size}\nconcurrency = 2\n'
        f"{FAST_RETRIES}{extra}"
    )
    return write_job(Path("job.toml"), text)


def test_requests_carry_token_uuid_and_rows(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server)))
    assert result.exit_code == 0, result.stderr
    assert len(server.calls) == 3
    first = server.calls[0]
    assert first.headers["X-Auth-Token"] == TOKEN
    assert first.headers["Content-Type"] == "application/json"
    assert first.body["data"]["req_data"] == [{"x": 0}, {"x": 1}]  # id_column is not sent
    rows = read_output("out/faults.parquet")
    assert [r["_key"] for r in rows] == [f"r{i}" for i in range(6)]
    assert [r["score"] for r in rows] == [0, 1] * 3
    uuids = {call.body["meta"]["uuid"] for call in server.calls}
    assert {r["_request_uuid"] for r in rows} == uuids


def test_429_with_retry_after_then_success(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        if call.number == 0:
            return gateway_error(
                429, "APIG.0308", "The throttling threshold", **{"Retry-After": "0.05"}
            )
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server, rows=2)))
    assert result.exit_code == 0, result.stderr
    (row, _) = read_output("out/faults.parquet")
    assert row["_status"] == "ok"
    assert row["_attempts"] == 2
    assert len(server.calls) == 2
    # the retry is a new request: a fresh uuid, and the row keeps the one that answered
    assert server.calls[0].body["meta"]["uuid"] != server.calls[1].body["meta"]["uuid"]
    assert row["_request_uuid"] == server.calls[1].body["meta"]["uuid"]


def test_retry_after_is_honoured_with_an_injected_sleep(tmp_path: Path) -> None:
    async def handle(call: Call) -> web.Response:
        if call.number < 2:
            return gateway_error(503, "APIG.0203", "busy", **{"Retry-After": "7"})
        return answer(call)

    clock = FakeClock()
    with ThreadedServer(handle) as server:
        job = load_job(job_for(server, rows=1, extra=""), assignments=["retry.max_attempts=5"])
        result = asyncio.run(Runner(job, clock=clock, rng=random.Random(0)).run())
    assert result.outcome == "done"
    assert clock.slept == [7.0, 7.0]  # the service's wish, not our shorter backoff


def test_503_then_success(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        if call.number < 2:
            return gateway_error(503, "ModelArts.4503", "backend did not respond")
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server, rows=2, size=2)))
    assert result.exit_code == 0, result.stderr
    assert [r["_attempts"] for r in read_output("out/faults.parquet")] == [3, 3]


def test_retries_run_out_into_error_rows(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        if call.body["data"]["req_data"][0]["x"] == 2:
            return gateway_error(503, "APIG.0203", "Backend timeout")
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server, rows=6, size=2)))
    assert result.exit_code == 1
    rows = read_output("out/faults.parquet")
    assert [r["_status"] for r in rows] == ["ok", "ok", "error", "error", "ok", "ok"]
    assert rows[2]["_error"] == "HTTP 503 APIG.0203: Backend timeout"
    assert rows[2]["_error_kind"] == "http_503"
    assert rows[2]["_attempts"] == 3
    assert rows[2]["_http_status"] == 503
    assert "http_503: 2 rows, e.g. key r2: HTTP 503 APIG.0203: Backend timeout\n" in result.stdout


def test_wrong_length_resp_data_never_shifts_results(invoke) -> None:
    # A model that silently drops the row it cannot score: the batch is split until the
    # bad row stands alone, and no result lands on another row.
    async def handle(call: Call) -> web.Response:
        records = call.body["data"]["req_data"]
        kept = [record for record in records if record["x"] != 2]
        results = [{**record, "score": record["x"] * 10} for record in kept]
        uuid = call.body["meta"]["uuid"]
        return web.json_response({"meta": {"uuid": uuid}, "data": {"resp_data": results}})

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server)))
    assert result.exit_code == 1
    rows = read_output("out/faults.parquet")
    assert [r["score"] for r in rows] == [0, 10, None, 30, 40, 50]
    assert [r["x"] for r in rows] == [0, 1, None, 3, 4, 5]
    assert rows[2]["_error"] == (
        "data.resp_data has 0 items for 1 rows sent; results cannot be matched to rows"
    )
    assert rows[2]["_error_kind"] == "bad_response"
    assert len(server.calls) == 5  # 3 batches, then the bad one's two halves


def test_html_error_page_is_retried(invoke) -> None:
    page = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"

    async def handle(call: Call) -> web.Response:
        if call.number == 0:
            return web.Response(status=502, text=page, content_type="text/html")
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server, rows=2)))
    assert result.exit_code == 0, result.stderr
    assert read_output("out/faults.parquet")[0]["_attempts"] == 2


def test_html_page_with_200_becomes_error_rows_when_it_persists(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        return web.Response(
            status=200, text="<html>Service Unavailable</html>", content_type="text/html"
        )

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server, rows=2)))
    assert result.exit_code == 1
    row = read_output("out/faults.parquet")[0]
    assert row["_error_kind"] == "not_json"
    assert row["_error"] == "HTTP 200 with a body that is not JSON: Service Unavailable"
    assert row["_attempts"] == 3


def test_401_aborts_with_exit_3_and_keeps_finished_rows(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        if call.number >= 1:
            return gateway_error(
                401, "APIG.0301", "Incorrect IAM authentication information: token expires"
            )
        return answer(call)

    with ThreadedServer(handle) as server:
        text = (
            job_for(server, rows=20, size=2)
            .read_text()
            .replace("concurrency = 2", "concurrency = 1")
        )
        Path("job.toml").write_text(text)
        result = invoke("run", "job.toml")
    assert result.exit_code == 3
    assert "the service refused the token" in result.stderr
    assert "APIG.0301" in result.stderr
    rows = read_output("out/faults.parquet")
    assert len(rows) == 20  # every input row is there: the finished, and the rest saying why
    assert [r["_status"] for r in rows[:2]] == ["ok", "ok"]
    assert all(r["_error_kind"] == "not_sent" for r in rows[2:])
    assert rows[2]["_error"].startswith("not sent: the run was aborted (HTTP 401 APIG.0301")
    assert len(server.calls) == 2  # no retry of a refused token, no further requests


def test_slow_server_times_out(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        if call.number == 0:
            await asyncio.sleep(2)
        return answer(call)

    with ThreadedServer(handle) as server:
        job = job_for(server, rows=2, extra="")
        result = invoke("run", str(job), "--set", "service.timeout=0.2")
    assert result.exit_code == 0, result.stderr
    assert read_output("out/faults.parquet")[0]["_attempts"] == 2


def test_timeout_every_time_becomes_error_rows(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        await asyncio.sleep(2)
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke(
            "run",
            str(job_for(server, rows=1)),
            "--set",
            "service.timeout=0.1",
            "--set",
            "retry.max_attempts=2",
        )
    assert result.exit_code == 1
    row = read_output("out/faults.parquet")[0]
    assert row["_error_kind"] == "timeout"
    assert "no complete answer within 0.1 s" in row["_error"]


def test_dropped_connection_is_retried(invoke) -> None:
    async def handle(call: Call) -> web.StreamResponse:
        if call.number == 0:
            assert call.request.transport is not None
            call.request.transport.close()  # hang up without an answer
            return web.Response()
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server, rows=2)))
    assert result.exit_code == 0, result.stderr
    assert read_output("out/faults.parquet")[0]["_attempts"] == 2


def test_unreachable_service_becomes_connection_errors(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        return answer(call)

    server = ThreadedServer(handle).start()
    url = server.url
    server.stop()  # nothing listens there any more
    data = write_csv(Path("d.csv"), ["x"], [(1,)])
    result = invoke(
        "run",
        "--input",
        str(data),
        "--url",
        url,
        "--set",
        "retry.backoff_initial=0.001",
        "--set",
        "retry.max_attempts=2",
    )
    assert result.exit_code == 1
    row = read_output("out/d.parquet")[0]
    assert row["_error_kind"] == "connection"
    assert row["_attempts"] == 2


def test_concurrency_is_bounded(invoke) -> None:
    in_flight = 0
    peak = 0

    async def handle(call: Call) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server, rows=40, size=1)), "--concurrency", "3")
    assert result.exit_code == 0, result.stderr
    assert peak == 3


@pytest.mark.parametrize("status", [400, 404, 413])
def test_other_4xx_fail_the_batch_without_retry(invoke, status: int) -> None:
    async def handle(call: Call) -> web.Response:
        return gateway_error(status, "APIG.0101", "no")

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_for(server, rows=2)))
    assert result.exit_code == 1
    row = read_output("out/faults.parquet")[0]
    assert row["_attempts"] == 1
    assert row["_error_kind"] == f"http_{status}"
