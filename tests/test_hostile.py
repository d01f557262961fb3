"""A hostile or broken service: redirects, huge and deeply nested answers, answers on the wrong
rows, absurd Retry-After values, a service that is down, a service that refuses every row.
Each case runs the real command (or the runner) against a real server on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrunner.clock import Clock
from batchrunner.engines.local import Runner
from batchrunner.errors import RunInterrupted
from batchrunner.job import load_job
from tests.clocks import FakeClock
from tests.conftest import TOKEN, read_output, write_csv, write_job
from tests.servers import (
    Call,
    ThreadedServer,
    answer,
    busy_until,
    deeply_nested_answer,
    gateway_error,
    huge_answer,
    redirecting,
    reversed_echo,
)


@pytest.fixture(autouse=True)
def _log_to_pytest(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CLI run leaves its handler on the closed stream of its runner: a runner called
    # directly logs to pytest instead.
    logger = logging.getLogger("batchrunner")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)


def job_file(url: str, rows: int = 6, *, size: int = 2, extra: str = "", service: str = "") -> Path:
    data = write_csv(Path("d.csv"), ["x"], [(i,) for i in range(rows)])
    return write_job(
        Path("h.toml"),
        f'name = "h"\n[input]\npath = "{data}"\n[service]\nurl = "{url}"\n{service}'
        f"[batch]\nsize = {size}\nconcurrency = 1\n"
        f"[retry]\nbackoff_initial = 0.001\nmax_attempts = 2\n{extra}",
    )


APP_CODE_AND_TOKEN = 'token_env = "MODELARTS_TOKEN"\n[service.app]\nappcode_env = "APP_CODE"\n'

# --- 1. redirects --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_an_error_and_no_credential_reaches_the_other_origin(
    invoke, monkeypatch, status: int
) -> None:
    monkeypatch.setenv("APP_CODE", "appcode-5d0c1e77aa")
    with ThreadedServer(answer_ok, any_path=True) as elsewhere:
        with ThreadedServer(redirecting(status, elsewhere.url)) as gateway:
            job = job_file(gateway.url, service=APP_CODE_AND_TOKEN)
            result = invoke("run", str(job))
        assert elsewhere.calls == []  # nothing, with or without a credential
    assert len(gateway.calls) == 1  # fatal: no other request after it
    assert result.exit_code == 3, result.stderr
    assert f"answered HTTP {status}, a redirect to {elsewhere.url}" in result.stderr
    assert "never follows redirects" in result.stderr and "set service.url" in result.stderr
    rows = read_output("out/h.parquet")
    assert {row["_status"] for row in rows} == {"error"}
    assert {row["_error_kind"] for row in rows} == {"not_sent"}
    assert "a redirect to" in rows[0]["_error"]


async def answer_ok(call: Call) -> web.Response:
    return answer(call)


def test_an_iam_login_is_never_redirected(invoke, monkeypatch) -> None:
    monkeypatch.setenv("IAM_PASSWORD", "pw-7f3e2a91c0")
    with ThreadedServer(answer_ok, any_path=True) as elsewhere:
        with ThreadedServer(redirecting(307, elsewhere.url), path="/v3/auth/tokens") as iam:
            job = write_job(
                Path("iam.toml"),
                f'[input]\npath = "{write_csv(Path("d.csv"), ["x"], [(1,)])}"\n'
                f'[service]\nurl = "{elsewhere.url}"\n'
                f'[service.iam]\nurl = "{iam.url}"\nuser = "u"\ndomain = "d"\nproject = "p"\n'
                'password_env = "IAM_PASSWORD"\n',
            )
            result = invoke("run", str(job))
        assert elsewhere.calls == []  # neither the password nor any request
    assert result.exit_code == 3, result.stderr
    assert "IAM at" in result.stderr and "answered HTTP 307, a redirect" in result.stderr
    assert "set service.iam.url" in result.stderr


# --- 8. answers too large or too deep -------------------------------------------------------


@pytest.mark.parametrize("gzip", [False, True])
def test_an_answer_over_max_response_bytes_is_an_error_row_of_its_own(invoke, gzip) -> None:
    with ThreadedServer(huge_answer(300_000, gzip=gzip)) as server:
        job = job_file(server.url, rows=2, extra="")
        result = invoke("run", str(job), "--set", "service.max_response_bytes=100000")
    assert result.exit_code == 1, result.stderr
    rows = read_output("out/h.parquet")
    assert [row["_error_kind"] for row in rows] == ["response_too_large"] * 2
    assert "over service.max_response_bytes (100,000 bytes)" in rows[0]["_error"]
    assert ("(decompressed)" in rows[0]["_error"]) == gzip


def test_a_gzip_bomb_is_cut_off_at_the_default_cap(invoke) -> None:
    # 40 MB of JSON whitespace, compressed to ~40 kB; the default cap is 16 MiB.
    with ThreadedServer(huge_answer(40_000_000, gzip=True)) as server:
        result = invoke("run", str(job_file(server.url, rows=1, size=1)))
    assert result.exit_code == 1, result.stderr
    (row,) = read_output("out/h.parquet")
    assert row["_error_kind"] == "response_too_large"


@pytest.mark.parametrize("depth", [33, 60, 70, 300])
def test_a_deeply_nested_answer_is_kept_as_json_text_and_read_back(invoke, depth) -> None:
    with ThreadedServer(deeply_nested_answer(depth)) as server:
        result = invoke("run", str(job_file(server.url, rows=4)))
        again = invoke("run", str(job_file(server.url, rows=4)))  # and every re-run
    assert result.exit_code == 0, result.stderr
    assert again.exit_code == 0, again.stderr
    table = pq.read_table("out/h.parquet")  # pyarrow's defaults
    assert table.column("deep").type in ("string", "large_string")
    assert table.column("deep")[0].as_py()[0] in "[{"  # JSON text
    assert table.column("x").to_pylist() == [0, 1, 2, 3]
    for args in (("inspect", "out/h.parquet"), ("inspect", "out/h.parquet", "--errors")):
        shown = invoke(*args)
        assert shown.exit_code == 0, shown.stderr


def test_a_nested_answer_within_the_limit_stays_nested(invoke) -> None:
    with ThreadedServer(deeply_nested_answer(6)) as server:
        result = invoke("run", str(job_file(server.url, rows=2)))
    assert result.exit_code == 0, result.stderr
    assert str(pq.read_table("out/h.parquet").column("deep").type).startswith("struct<a: list<")


# --- 9. an echo on the wrong rows -----------------------------------------------------------


def test_a_reversed_echo_fails_the_batch(invoke) -> None:
    with ThreadedServer(reversed_echo) as server:
        result = invoke("run", str(job_file(server.url, rows=5, size=2)))
    assert result.exit_code == 1, result.stderr
    rows = read_output("out/h.parquet")
    # batches of 2 rows answered in reverse: refused; the last batch (1 row) is right
    assert [row["_status"] for row in rows] == ["error"] * 4 + ["ok"]
    assert rows[0]["_error_kind"] == "bad_response"
    assert rows[0]["_error"] == (
        "data.resp_data[0].x is 1, but the row sent there (key 0) has 0: the answer's items "
        "are not in the order of the rows sent; results cannot be matched to rows"
    )
    assert rows[4]["score"] == 0


def test_an_echo_in_float32_or_as_null_for_nan_is_accepted(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        records = call.body["data"]["req_data"]
        echoed = [{"v": None if r["v"] is None else r["v"] * (1 + 1e-8)} for r in records]
        return web.json_response({"data": {"resp_data": echoed}})

    data = write_csv(Path("f.csv"), ["v"], [(5.1,), ("nan",), (2.0,)])
    with ThreadedServer(handle) as server:
        result = invoke("run", "--input", str(data), "--url", server.url, "--output", "o.parquet")
    assert result.exit_code == 0, result.stderr


# --- 12. a hostile Retry-After --------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["Thu, 01 Jan 2037 00:00:00 GMT", "inf", "1e308", "99999999999", "-inf", "nan"]
)
def test_a_hostile_retry_after_is_bounded_by_retry_after_max(value: str) -> None:
    clock = FakeClock()
    with ThreadedServer(busy_until(value)) as server:
        job = load_job(
            job_file(server.url, rows=2),
            assignments=["retry.max_attempts=4", "retry.retry_after_max=5", "retry.backoff_max=2"],
        )
        result = asyncio.run(Runner(job, clock=clock, rng=random.Random(0)).run())
    assert result.outcome == "too_many_errors"
    assert len(clock.slept) == 3 and all(0 <= delay <= 5 for delay in clock.slept), clock.slept


def test_a_signal_during_a_long_retry_wait_stops_at_once(monkeypatch) -> None:
    # Nothing is in flight while the batch waits to retry: the run must not wait for the
    # grace period (an hour here) before it stops.
    class EndlessWaits(Clock):
        async def sleep(self, seconds: float) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(3600)

    with ThreadedServer(busy_until("Thu, 01 Jan 2037 00:00:00 GMT")) as server:
        job = load_job(
            job_file(server.url, rows=2),
            assignments=["batch.grace_period=3600"],
        )

        async def run() -> float:
            started = time.monotonic()
            with pytest.raises(RunInterrupted):
                await asyncio.wait_for(Runner(job, clock=EndlessWaits()).run(), 5)
            return time.monotonic() - started

        elapsed = asyncio.run(run())
    assert elapsed < 2  # not the 5 s after which wait_for gives up
    assert len(server.calls) == 1


# --- 11. a service that is down -------------------------------------------------------------


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_service_that_cannot_be_reached_stops_the_run_and_a_rerun_resumes(invoke) -> None:
    port = refused_port()
    job_path = job_file(f"http://127.0.0.1:{port}/v1/infers/down", rows=400, size=2)
    job = load_job(
        job_path, assignments=["service.unreachable_after=10", "retry.backoff_initial=1"]
    )
    clock = FakeClock()
    result = asyncio.run(Runner(job, clock=clock, rng=random.Random(0)).run())
    assert result.outcome == "aborted"
    assert result.abort_reason is not None
    assert result.abort_reason.startswith("the service cannot be reached: no request has")
    assert "re-run the same command to resume" in result.abort_reason
    assert result.stats.requests < 100  # not 400 (200 batches, 2 attempts each)
    rows = read_output(result.output)
    kinds = [row["_error_kind"] for row in rows]
    assert len(rows) == 400 and kinds.count("not_sent") > 300
    assert set(kinds) <= {"connection", "not_sent"}
    # The service is back, where it was: the re-run sends what was not finished, and only that.
    with ThreadedServer(answer_ok, path="/v1/infers/down", port=port) as server:
        again = invoke("run", str(job_path))
        sent = sum(len(call.body["data"]["req_data"]) for call in server.calls)
    assert again.exit_code == 0, again.stderr
    assert [row["_status"] for row in read_output(result.output)] == ["ok"] * 400
    assert sent == 400


def test_the_cli_says_the_service_cannot_be_reached_with_exit_3(invoke) -> None:
    url = f"http://127.0.0.1:{refused_port()}/v1/infers/down"
    job = job_file(url, rows=40, size=2)
    result = invoke("run", str(job), "--set", "service.unreachable_after=0.001")
    assert result.exit_code == 3, result.stderr
    assert "the service cannot be reached" in result.stderr


def test_one_failed_connection_among_answers_does_not_stop_the_run(invoke) -> None:
    # The service answers: connection failures of some requests never add up to "down".
    async def handle(call: Call) -> web.Response:
        if call.number % 3 == 0:
            call.request.transport.close()  # type: ignore[union-attr]
        return answer(call)

    with ThreadedServer(handle) as server:
        job = job_file(server.url, rows=60, size=2)
        result = invoke("run", str(job), "--set", "service.unreachable_after=0.001")
    # Done (0, or 1 where a retry met a closed connection again), never aborted (3).
    assert result.exit_code in (0, 1), result.stderr
    assert "cannot be reached" not in result.stderr
    assert len(server.calls) > 30


# --- 15. a service that refuses every row ---------------------------------------------------


def test_splitting_stops_when_every_half_is_refused_alike(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        return gateway_error(400, "APIG.0201", "request body invalid")

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_file(server.url, rows=200, size=200)))
    assert result.exit_code == 1, result.stderr
    assert len(server.calls) == 7  # the batch, 2 halves, 4 quarters: not 2n - 1 = 399
    rows = read_output("out/h.parquet")
    assert {row["_error_kind"] for row in rows} == {"http_400"}


def test_two_bad_rows_in_different_halves_are_still_isolated(invoke) -> None:
    bad = {3, 12}

    async def handle(call: Call) -> web.Response:
        if any(record["x"] in bad for record in call.body["data"]["req_data"]):
            return gateway_error(400, "MR.0105", "cannot score this row")
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(job_file(server.url, rows=16, size=16)))
    assert result.exit_code == 1, result.stderr
    rows = read_output("out/h.parquet")
    assert {int(row["_key"]) for row in rows if row["_status"] == "error"} == bad


def test_the_token_is_sent_to_the_service(invoke) -> None:
    # the cases above would pass if no token were sent at all
    with ThreadedServer(answer_ok) as server:
        result = invoke("run", str(job_file(server.url, rows=1)))
    assert result.exit_code == 0, result.stderr
    assert server.calls[0].headers["X-Auth-Token"] == TOKEN


# --- 3. a token with a line break -----------------------------------------------------------


@pytest.mark.parametrize("where", ["env", "file"])
def test_a_token_with_a_line_break_is_refused_at_load_with_exit_2(
    invoke, monkeypatch, where: str
) -> None:
    value = "tok-91ab\r\nX-Injected: 77cd"
    if where == "env":
        monkeypatch.setenv("MODELARTS_TOKEN", value)
        service = ""
    else:
        Path("token.txt").write_text(value)
        service = 'token_file = "token.txt"\n'
    with ThreadedServer(answer_ok) as server:
        result = invoke("run", str(job_file(server.url, rows=2, service=service)))
    assert server.calls == []
    assert result.exit_code == 2, result.stderr
    named = "environment variable MODELARTS_TOKEN" if where == "env" else "token.txt"
    assert named in result.stderr
    assert "carriage return (CR)" in result.stderr or "line feed (LF)" in result.stderr
    assert "tok-91ab" not in result.stderr + result.stdout
    assert "77cd" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
