"""The dispatcher's token renewal, against a real server: a wave of 401s renews once, and a
renewal that finds nothing lets no request start after the refusal; with splitting and the
rate limit."""

from __future__ import annotations

import asyncio
import random

import pyarrow as pa
import pytest
from aiohttp import web

from batchrunner.auth import Secret
from batchrunner.client import ServiceClient
from batchrunner.dispatch import Dispatcher
from batchrunner.errors import AuthError
from batchrunner.items import Batch, Outcome
from batchrunner.limiter import ConcurrencyLimiter, RateLimiter
from batchrunner.protocols.modelarts import TextCodec
from batchrunner.retry import RetryPolicy
from tests.servers import Call, ThreadedServer, answer, gateway_error


def batches(count: int) -> list[Batch]:
    return [
        Batch(seq, [str(seq)], rows=pa.RecordBatch.from_pydict({"x": [seq]}))
        for seq in range(count)
    ]


class SlowTokens:
    """Renews "old" to ``renewed`` (None: nothing better) after ``delay`` seconds."""

    def __init__(self, renewed: str | None, delay: float) -> None:
        self.token = Secret("old")
        self.renewed = renewed
        self.delay = delay
        self.refreshes = 0

    async def current(self) -> Secret:
        return self.token

    async def refresh(self, refused: Secret) -> Secret | None:
        self.refreshes += 1
        if refused != self.token:
            return self.token
        await asyncio.sleep(self.delay)
        if self.renewed is None:
            return None
        self.token = Secret(self.renewed)
        return self.token


async def send_all(
    url: str,
    tokens: SlowTokens,
    count: int,
    concurrency: int,
    *,
    rate: RateLimiter | None = None,
    to_send: list[Batch] | None = None,
    outcomes: list[Outcome] | None = None,
) -> Dispatcher:
    async with ServiceClient(url, None) as client:
        dispatcher = Dispatcher(
            client,
            TextCodec(),
            ConcurrencyLimiter(concurrency),
            RetryPolicy(max_attempts=1),
            tokens=tokens,
            rate=rate,
            rng=random.Random(0),
        )
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(dispatcher.send(batch))
                for batch in (batches(count) if to_send is None else to_send)
            ]
        if outcomes is not None:
            outcomes += [outcome for task in tasks for outcome in task.result()]
        return dispatcher


def test_no_request_starts_while_a_renewal_is_under_way_and_none_after_it_fails() -> None:
    # The first request is refused; three others are in flight and finish while the token
    # source looks (slowly) for a better token and finds none. Their slots must not start
    # new requests meanwhile, and after the refusal is final nothing is sent.
    async def handle(call: Call) -> web.Response:
        if call.number == 0:
            return gateway_error(401, "APIG.0301", "token expires")
        await asyncio.sleep(0.02)
        return answer(call)

    tokens = SlowTokens(renewed=None, delay=0.2)
    with ThreadedServer(handle) as server, pytest.raises(ExceptionGroup) as caught:
        asyncio.run(send_all(server.url, tokens, count=12, concurrency=4))
    assert len(server.calls) == 4
    assert all(isinstance(error, AuthError) for error in caught.value.exceptions)
    assert "token expires" in str(caught.value.exceptions[0])
    assert tokens.refreshes == 1


def test_a_wave_of_401s_is_sent_again_with_the_renewed_token() -> None:
    async def handle(call: Call) -> web.Response:
        if call.headers["X-Auth-Token"] == "old":
            await asyncio.sleep(0.02)  # all four are refused together: one wave
            return gateway_error(401, "APIG.0301", "token expires")
        return answer(call)

    tokens = SlowTokens(renewed="new", delay=0.05)
    with ThreadedServer(handle) as server:
        dispatcher = asyncio.run(send_all(server.url, tokens, count=12, concurrency=4))
    sent = [call.headers["X-Auth-Token"] for call in server.calls]
    assert sent.count("old") == 4 and sent.count("new") == 12
    assert dispatcher.renewals == 4  # each refused request sent once more
    assert tokens.token == Secret("new")


def test_a_request_waiting_for_the_rate_limit_does_not_start_during_a_renewal() -> None:
    # 20 starts a second: the second request holds its slot, waiting for the rate limit,
    # while the first one's 401 is being renewed (slowly, finding nothing). When its turn
    # comes it must wait for the renewal, then see the refusal is final, and not be sent.
    async def handle(call: Call) -> web.Response:
        return gateway_error(401, "APIG.0301", "token expires")

    tokens = SlowTokens(renewed=None, delay=0.3)
    rate = RateLimiter(20, burst=1)
    with ThreadedServer(handle) as server, pytest.raises(ExceptionGroup) as caught:
        asyncio.run(send_all(server.url, tokens, count=4, concurrency=4, rate=rate))
    assert len(server.calls) == 1
    assert all(isinstance(error, AuthError) for error in caught.value.exceptions)
    assert tokens.refreshes == 1


def test_a_renewed_batch_is_still_split_around_a_row_the_model_fails_on() -> None:
    # The old token is refused; with the new one, the model fails on the row "poison": the
    # batch is split in halves until only that row is an error row. The renewal used no
    # attempt (max_attempts = 1) and the halves carry the new token.
    async def handle(call: Call) -> web.Response:
        if call.headers["X-Auth-Token"] == "old":
            return gateway_error(401, "APIG.0301", "token expires")
        if any(record["x"] == "poison" for record in call.body["data"]["req_data"]):
            return gateway_error(400, "MR.0105", "cannot score 'poison'")
        return answer(call)

    values = ["a", "b", "poison", "d"]
    batch = Batch(0, values, rows=pa.RecordBatch.from_pydict({"x": values}))
    tokens = SlowTokens(renewed="new", delay=0.01)
    outcomes: list[Outcome] = []
    with ThreadedServer(handle) as server:
        dispatcher = asyncio.run(
            send_all(server.url, tokens, 1, concurrency=2, to_send=[batch], outcomes=outcomes)
        )
    assert dispatcher.renewals == 1
    assert [call.headers["X-Auth-Token"] for call in server.calls].count("old") == 1
    by_key = {key: outcome for outcome in outcomes for key in outcome.batch.keys}
    assert list(by_key) == values
    assert by_key["poison"].error_kind == "model_error"
    assert len(by_key["poison"].batch) == 1
    assert all(by_key[key].error is None for key in ("a", "b", "d"))
