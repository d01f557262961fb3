"""Language models' limits: requests and tokens a minute, the server's x-ratelimit headers
and retry-after-ms, a token budget; on an injected clock (no real waits), and runs against
the embedded service and small servers on loopback."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from aiohttp import web

from batchrunner.client import ServiceClient
from batchrunner.dispatch import Dispatcher
from batchrunner.engines.local import run_job
from batchrunner.items import Batch
from batchrunner.job import load_job
from batchrunner.limiter import ConcurrencyLimiter
from batchrunner.protocols.openai import ChatCodec
from batchrunner.retry import RetryPolicy
from batchrunner.tokenmeter import BudgetReached, TokenMeter, parse_reset
from tests.clocks import FakeClock
from tests.conftest import Invoke, read_output, write_csv, write_job
from tests.servers import Call, ThreadedServer


class FakeTime:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_reset_durations_are_read_as_openai_writes_them() -> None:
    assert parse_reset("1m30s") == 90.0
    assert parse_reset("6s") == 6.0
    assert parse_reset("250ms") == 0.25
    assert parse_reset("1h2m3.5s") == 3723.5
    assert parse_reset("2.5") == 2.5
    assert parse_reset("soon") is None and parse_reset("") is None and parse_reset("-1") is None


def test_requests_a_minute_space_the_starts() -> None:
    time = FakeTime()
    meter = TokenMeter(requests_per_minute=30, clock=time, sleep=time.sleep)

    async def main() -> None:
        for _ in range(4):
            await meter.reserve(1)

    asyncio.run(main())
    assert time.now == pytest.approx(6.0)  # one every 2 s after the first


def test_tokens_a_minute_are_estimated_then_corrected_by_usage() -> None:
    time = FakeTime()
    meter = TokenMeter(tokens_per_minute=600, clock=time, sleep=time.sleep)  # 10 a second

    async def main() -> None:
        await meter.reserve(500)  # the bucket starts full: no wait
        assert time.now == 0
        await meter.reserve(300)  # 100 left: waits for 200 more, 20 s
        assert time.now == pytest.approx(20.0)
        # Both answers say they took 50 tokens: 700 come back to the bucket.
        meter.settle(500, 40, 10, {})
        meter.settle(300, 40, 10, {})
        await meter.reserve(600)
        assert time.now == pytest.approx(20.0)

    asyncio.run(main())
    assert (meter.spent.prompt, meter.spent.completion, meter.total) == (80, 20, 100)


def test_the_servers_remaining_counts_hold_requests_until_the_reset() -> None:
    time = FakeTime()
    meter = TokenMeter(clock=time, sleep=time.sleep)

    async def main() -> None:
        await meter.reserve(10)
        headers = {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "2s",
            "x-ratelimit-remaining-tokens": "1000",
            "x-ratelimit-reset-tokens": "1m0s",
        }
        meter.settle(10, 5, 5, headers)
        await meter.reserve(10)  # no request left: until the reset
        assert time.now == pytest.approx(2.0)
        meter.settle(10, 5, 5, {**headers, "x-ratelimit-remaining-requests": "9"})
        await meter.reserve(2000)  # more tokens than are left: until their reset
        assert time.now == pytest.approx(62.0)

    asyncio.run(main())


def test_the_budget_stops_before_it_would_be_exceeded_counting_requests_in_flight() -> None:
    meter = TokenMeter(max_total_tokens=100)

    async def main() -> None:
        await meter.reserve(60)
        with pytest.raises(BudgetReached, match=r"60 in flight.*max_total_tokens \(100\)"):
            await meter.reserve(50)
        meter.settle(60, 20, 10, {})
        with pytest.raises(BudgetReached):  # once reached, the run is stopping
            await meter.reserve(1)

    asyncio.run(main())
    assert meter.total == 30


def chat_answer(content: str) -> bytes:
    return orjson.dumps(
        {
            "choices": [{"message": {"content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1},
        }
    )


def test_a_429_with_retry_after_ms_is_waited_as_asked() -> None:
    async def handle(call: Call) -> web.Response:
        if call.number == 0:
            error = {"error": {"message": "Rate limit reached", "type": "requests"}}
            headers = {"retry-after-ms": "1500", "Retry-After": "9"}
            return web.json_response(error, status=429, headers=headers)
        return web.Response(body=chat_answer("bug"), content_type="application/json")

    time = FakeTime()
    throttled = []

    async def main() -> None:
        async with ServiceClient(server.url, None, bearer=True) as client:
            dispatcher = Dispatcher(
                client,
                ChatCodec("m", "{text}"),
                ConcurrencyLimiter(1),
                RetryPolicy(max_attempts=3, initial=0.001),
                sleep=time.sleep,
                rng=random.Random(0),
                meter=TokenMeter(clock=time, sleep=time.sleep),
            )
            rows = pa.RecordBatch.from_pydict({"text": ["It crashes"]})
            [outcome] = await dispatcher.send(Batch(0, ["0"], rows))
            assert outcome.ok and outcome.attempts == 2
            throttled.append(dispatcher.statistics())

    with ThreadedServer(handle, path="/v1/chat/completions") as server:
        asyncio.run(main())
    assert time.slept == [pytest.approx(1.5)]  # retry-after-ms, finer than Retry-After
    [stats] = throttled
    assert stats.throttled == 1 and (stats.tokens_in, stats.tokens_out) == (7, 1)


def budget_job(tmp_path: Path, budget: int) -> Path:
    texts = [f"ticket {i}: the app crashes on page {i}" for i in range(12)]
    write_csv(tmp_path / "tickets.csv", ["id", "text"], list(enumerate(texts)))
    return write_job(
        tmp_path / "job.toml",
        f"""
name = "budget"
[input]
path = "{tmp_path / "tickets.csv"}"
id_column = "id"
[service]
url = "embedded:llm"
protocol = "openai-chat"
[service.openai]
model = "tiny"
prompt = "Label: {{text}}"
max_tokens = 4
max_total_tokens = {budget}
[batch]
concurrency = 1
[output]
path = "{tmp_path / "out.parquet"}"
""",
    )


def test_a_budget_reached_mid_run_stops_it_and_a_larger_one_resumes(
    invoke: Invoke, tmp_path: Path
) -> None:
    # Each request: "Label: ticket N: the app crashes on page N" is 9 words and 1 word back
    # (10 tokens); estimated as 43 characters / 4 = 11, plus max_tokens 4: 15.
    job = budget_job(tmp_path, 60)
    result = invoke("run", str(job))
    assert result.exit_code == 3, result.stderr
    assert "the token budget is reached" in result.stderr
    assert "max_total_tokens (60)" in result.stderr
    rows = read_output(tmp_path / "out.parquet")
    ok = [row for row in rows if row["_status"] == "ok"]
    # 4 requests (40 tokens) fit; a 5th could take 40 + 15 = 55, a 6th not: 50 + 15 > 60.
    assert len(ok) == 5
    assert {row["_error_kind"] for row in rows if row["_status"] != "ok"} == {"not_sent"}
    summary = orjson.loads((tmp_path / "out.parquet.summary.json").read_bytes())
    assert summary["tokens"]["in"] == 45 and summary["tokens"]["out"] == 5
    inspected = invoke("inspect", str(tmp_path / "out.parquet"))
    assert "45 in, 5 out" in inspected.stdout

    # Resumed with 100: the 50 tokens the first run spent count; 4 more requests fit.
    result = invoke("run", str(job), "--set", "service.openai.max_total_tokens=100")
    assert result.exit_code == 3, result.stderr
    assert "90 tokens spent (by this run and the runs it resumes)" in result.stderr
    rows = read_output(tmp_path / "out.parquet")
    assert sum(row["_status"] == "ok" for row in rows) == 9

    result = invoke("run", str(job), "--set", "service.openai.max_total_tokens=1000")
    assert result.exit_code == 0, result.stderr
    rows = read_output(tmp_path / "out.parquet")
    assert [row["_key"] for row in rows] == [str(i) for i in range(12)]
    assert all(row["_status"] == "ok" and row["content"] == "bug" for row in rows)
    assert "27 in, 3 out" in result.stdout + result.stderr  # this run's tokens


def test_rate_limits_in_a_run_wait_on_the_injected_clock(tmp_path: Path) -> None:
    job = budget_job(tmp_path, 10_000)
    job.write_text(job.read_text().replace("max_total_tokens", "rate_limit = 60\nmax_total_tokens"))
    clock = FakeClock()
    result = run_job(load_job(job), clock=clock, handle_signals=False)
    assert result.outcome == "done"
    assert sum(clock.slept) == pytest.approx(11.0)  # 12 requests, one a second
