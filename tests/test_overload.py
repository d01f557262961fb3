"""Overload or a random failure (issue 16): a 429, a 503 carrying Retry-After, a timeout or
many failures together back off and shrink the adaptive bound; an isolated 503, a dropped
connection or an HTML 502 page is retried after about one round trip and leaves the bound
alone. Against real servers on loopback, with an injected sleep and a seeded random source."""

from __future__ import annotations

import asyncio
import itertools
import random

import pyarrow as pa
import pytest
from aiohttp import web

from batchrunner.client import ServiceClient
from batchrunner.dispatch import RETURNS_PER_ROUND_TRIP, Dispatcher
from batchrunner.errors import RequestError
from batchrunner.items import Batch, Outcome
from batchrunner.limiter import AdaptiveLimiter, ConcurrencyLimiter
from batchrunner.protocols.modelarts import TextCodec
from batchrunner.retry import QUICK_RETRY_MIN, FailureWindow, RetryPolicy, is_overload
from batchrunner.service.faults import HTML_502 as HTML_502_PAGE
from tests.servers import Call, ThreadedServer, answer, gateway_error


def failure(
    kind: str = "http_503", status: int | None = 503, retry_after: float | None = None
) -> RequestError:
    return RequestError("x", kind=kind, retryable=True, http_status=status, retry_after=retry_after)


# --- the pure rule ---------------------------------------------------------------------------


def test_what_counts_as_overload() -> None:
    assert is_overload(failure("http_429", 429))
    assert is_overload(failure("http_503", 503, retry_after=1.0))  # says when to come back
    assert is_overload(failure("http_504", 504))
    assert is_overload(failure("timeout", None))  # the service got slow
    assert not is_overload(failure("http_503", 503))  # an isolated 503
    assert not is_overload(failure("http_500", 500))
    assert not is_overload(failure("connection", None))  # a dropped connection
    assert not is_overload(failure("not_json", 502))  # a gateway's HTML page


def test_a_random_failure_is_retried_within_about_a_round_trip_and_overload_backs_off() -> None:
    policy = RetryPolicy(max_attempts=10, initial=0.5, maximum=30.0)
    rng = random.Random(3)
    quick = [policy.delay(1, failure(), rng, round_trip=0.02) for _ in range(200)]
    assert all(d is not None and 0 <= d <= 0.02 for d in quick)
    # the same batch failing again doubles it, from the round trip
    again = [policy.delay(3, failure("connection", None), rng, round_trip=0.02) for _ in range(200)]
    assert all(d is not None and d <= 0.08 for d in again)
    assert max(d for d in again if d is not None) > 0.04
    # a round trip faster than QUICK_RETRY_MIN is not waited for less; a slow one is capped
    tiny = [policy.delay(1, failure(), rng, round_trip=0.0001) for _ in range(200)]
    assert max(d for d in tiny if d is not None) > QUICK_RETRY_MIN / 2
    slow = [policy.delay(1, failure(), rng, round_trip=9.0) for _ in range(200)]
    assert all(d is not None and d <= 0.5 for d in slow)
    # overload: from backoff_initial; Retry-After a floor
    throttled = [
        policy.delay(1, failure("http_429", 429), rng, round_trip=0.02) for _ in range(200)
    ]
    assert max(d for d in throttled if d is not None) > 0.3
    assert policy.delay(1, failure(retry_after=2.0), rng, round_trip=0.02) == 2.0
    # the caller's judgement (many failures together) wins over the failure's own look
    crowded = [policy.delay(1, failure(), rng, overload=True, round_trip=0.02) for _ in range(200)]
    assert max(d for d in crowded if d is not None) > 0.3
    # before any answer, the round trip is unknown: the ordinary backoff
    unknown = [policy.delay(1, failure(), rng) for _ in range(200)]
    assert max(d for d in unknown if d is not None) > 0.3


def test_failures_together_are_overload_isolated_ones_are_not() -> None:
    window = FailureWindow(size=32)
    for answer_number in range(320):  # one failure in 12 (8%), spread out
        if answer_number % 12 == 0:
            window.failed(failure())
        else:
            window.answered(10.0)
        assert not window.crowded
    assert window.round_trip is not None and abs(window.round_trip - 0.010) < 1e-9
    assert not window.overload(failure())
    for _ in range(9):  # then nine in a row: more than a quarter of the window
        window.failed(failure("connection", None))
    assert window.crowded and window.overload(failure())
    for _ in range(32):  # the service recovers
        window.answered(10.0)
    assert not window.crowded


def test_the_first_failures_of_a_run_are_no_crowd_and_refusals_do_not_count() -> None:
    window = FailureWindow(size=32)
    window.failed(failure())
    window.failed(failure())
    assert not window.crowded  # two unlucky answers out of two
    for _ in range(40):
        window.failed(failure("http_429", 429))  # overload already, by itself
        window.failed(RequestError("bad row", kind="model_error", retryable=False))
    assert not window.crowded


# --- the dispatcher against a real server ----------------------------------------------------


def batches(count: int) -> list[Batch]:
    return [
        Batch(seq, [str(seq)], rows=pa.RecordBatch.from_pydict({"x": [seq]}))
        for seq in range(count)
    ]


async def send_all(
    url: str, limiter: AdaptiveLimiter, count: int, slept: list[float], policy: RetryPolicy
) -> list[Outcome]:
    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async with ServiceClient(url, None) as client:
        dispatcher = Dispatcher(
            client,
            TextCodec(),
            limiter,
            policy,
            sleep=fake_sleep,
            rng=random.Random(0),
        )
        outcomes: list[Outcome] = []
        for batch in batches(count):  # one at a time: the order of answers is known
            outcomes += await dispatcher.send(batch)
        return outcomes


def test_isolated_random_failures_are_retried_soon_and_leave_the_bound_alone() -> None:
    # Calls 5, 10, 15 fail randomly, each a different way; every other call is answered.
    async def handle(call: Call) -> web.StreamResponse:
        if call.number == 5:
            return gateway_error(503, "APIG.0203", "Backend unavailable")
        if call.number == 10:
            assert call.request.transport is not None
            call.request.transport.close()  # a dropped connection
            return web.Response(status=503)
        if call.number == 15:
            return web.Response(status=502, text=HTML_502_PAGE, content_type="text/html")
        await asyncio.sleep(0.005)
        return answer(call)

    slept: list[float] = []
    limiter = AdaptiveLimiter(8, 64)
    policy = RetryPolicy(max_attempts=5, initial=0.5, maximum=30.0)
    with ThreadedServer(handle) as server:
        outcomes = asyncio.run(send_all(server.url, limiter, 20, slept, policy))
    assert all(outcome.ok for outcome in outcomes)
    assert len(slept) == 3
    # about one round trip (a few ms here), never the 0.5 s of backoff_initial
    assert all(0 <= seconds <= 0.1 for seconds in slept), slept
    assert limiter.decreases == 0


def test_overload_backs_off_and_shrinks_the_bound() -> None:
    # A 429, then a 503 that says when to come back: both are overload.
    async def handle(call: Call) -> web.StreamResponse:
        if call.number == 3:
            return gateway_error(429, "APIG.0308", "throttled", **{"Retry-After": "1"})
        if call.number == 8:
            return gateway_error(503, "APIG.0203", "busy", **{"Retry-After": "2"})
        return answer(call)

    slept: list[float] = []
    seconds = itertools.count()  # a second passes between any two looks at the clock
    limiter = AdaptiveLimiter(8, 64, clock=lambda: float(next(seconds)))
    policy = RetryPolicy(max_attempts=5, initial=0.5, maximum=30.0)
    with ThreadedServer(handle) as server:
        outcomes = asyncio.run(send_all(server.url, limiter, 10, slept, policy))
    assert all(outcome.ok for outcome in outcomes)
    assert slept == [1.0, 2.0]
    assert limiter.decreases == 2


def test_many_503s_together_are_overload() -> None:
    # The service goes bad: from the 12th call on, the first try of every batch is a 503
    # without Retry-After (half of all answers). The first few look random (a quick retry);
    # once more than a quarter of the latest 32 answers failed, they are a crowd: the
    # retries back off from backoff_initial and the bound shrinks.
    tried: set[int] = set()

    async def handle(call: Call) -> web.StreamResponse:
        seq = call.body["data"]["req_data"][0]["x"]
        if call.number >= 12 and seq not in tried:
            tried.add(seq)
            return gateway_error(503, "APIG.0203", "Backend unavailable")
        return answer(call)

    slept: list[float] = []
    limiter = AdaptiveLimiter(8, 64)
    policy = RetryPolicy(max_attempts=5, initial=0.5, maximum=30.0)
    with ThreadedServer(handle) as server:
        outcomes = asyncio.run(send_all(server.url, limiter, 24, slept, policy))
    assert all(outcome.ok for outcome in outcomes)
    assert len(slept) == 12
    assert max(slept[:8]) <= 0.1  # isolated, as far as anyone could tell: about a round trip
    assert max(slept[8:]) > 0.1  # from the ninth in 32 answers: a crowd, backing off
    assert limiter.decreases >= 1


def test_a_429_while_the_service_answers_others_does_not_use_up_the_retry_budget() -> None:
    # Batch 0 is refused (429) on its first 3 sends, each time after others were answered;
    # its budget is 2 attempts. Its turn, not its fault: it still gets its answer. A batch
    # refused with nothing answered meanwhile uses its budget as before.
    refusals: dict[int, int] = {}

    async def handle(call: Call) -> web.StreamResponse:
        seq = call.body["data"]["req_data"][0]["x"]
        if seq == 0 and refusals.get(seq, 0) < 3:
            refusals[seq] = refusals.get(seq, 0) + 1
            await asyncio.sleep(0.03)  # others are answered meanwhile
            return gateway_error(429, "APIG.0308", "throttled", **{"Retry-After": "0"})
        await asyncio.sleep(0.002)
        return answer(call)

    async def scenario(url: str) -> list[Outcome]:
        async def no_sleep(seconds: float) -> None:
            await asyncio.sleep(0)

        async with ServiceClient(url, None) as client:
            dispatcher = Dispatcher(
                client,
                TextCodec(),
                AdaptiveLimiter(4, 4),
                RetryPolicy(max_attempts=2, initial=0.5, maximum=30.0),
                sleep=no_sleep,
                rng=random.Random(0),
            )
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(dispatcher.send(b)) for b in batches(80)]
        return [outcome for task in tasks for outcome in task.result()]

    with ThreadedServer(handle) as server:
        outcomes = asyncio.run(scenario(server.url))
    assert refusals == {0: 3}
    assert all(outcome.ok for outcome in outcomes)
    assert outcomes[0].attempts == 4


def test_a_service_that_refuses_everything_still_ends_the_batch() -> None:
    async def handle(call: Call) -> web.StreamResponse:
        return gateway_error(429, "APIG.0308", "throttled", **{"Retry-After": "0"})

    slept: list[float] = []
    with ThreadedServer(handle) as server:
        outcomes = asyncio.run(
            send_all(server.url, AdaptiveLimiter(2, 2), 1, slept, RetryPolicy(max_attempts=3))
        )
    assert [outcome.ok for outcome in outcomes] == [False]
    assert len(server.calls) == 3  # nothing answered meanwhile: each refusal is an attempt


def test_batches_throttled_together_come_back_one_after_another() -> None:
    # Eight batches in flight are all answered 429 (Retry-After: 1): come back all at the
    # instant it ends, they would find the service full again. Each waits the second the
    # service asked for, and each one already waiting puts the next a step later.
    async def handle(call: Call) -> web.StreamResponse:
        if call.number < 8:  # the first eight calls
            return gateway_error(429, "APIG.0308", "throttled", **{"Retry-After": "1"})
        return answer(call)

    slept: list[float] = []

    async def run(url: str) -> list[Outcome]:
        everyone_waits = asyncio.Event()

        async def held_sleep(seconds: float) -> None:  # until all eight wait
            slept.append(seconds)
            if len(slept) == 8:
                everyone_waits.set()
            await everyone_waits.wait()

        async with ServiceClient(url, None) as client:
            dispatcher = Dispatcher(
                client, TextCodec(), ConcurrencyLimiter(8), RetryPolicy(),
                sleep=held_sleep, rng=random.Random(0),
            )  # fmt: skip
            sent = await asyncio.gather(*(dispatcher.send(batch) for batch in batches(8)))
        return [outcome for outcomes in sent for outcome in outcomes]

    with ThreadedServer(handle) as server:
        outcomes = asyncio.run(run(server.url))
    assert len(outcomes) == 8 and all(outcome.ok for outcome in outcomes)
    step = QUICK_RETRY_MIN / RETURNS_PER_ROUND_TRIP  # no answer yet: no round trip known
    assert slept == pytest.approx([1.0 + position * step for position in range(8)])
