"""Sending one batch until it has an outcome: limiter, codec, client, retries.

``Dispatcher.send`` is the whole life of a batch on the wire: encode (a fresh ``meta.uuid``
per attempt), wait for a slot in the limiter, post, judge the answer, and either return the
rows' results, retry after the policy's delay, or give up with error rows. A fatal answer
(the token refused, TLS broken) raises, and no request starts after it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Callable

from batchrunner.client import ServiceClient
from batchrunner.errors import AuthError, RequestError, ServiceError
from batchrunner.items import Batch, Outcome
from batchrunner.limiter import ConcurrencyLimiter
from batchrunner.protocols import Codec
from batchrunner.protocols.modelarts import classify_failure
from batchrunner.report import RunStats
from batchrunner.retry import RetryPolicy

log = logging.getLogger("batchrunner")

Sleep = Callable[[float], Awaitable[None]]


class Dispatcher:
    """Sends batches through one client, within one limiter, under one retry policy."""

    def __init__(
        self,
        client: ServiceClient,
        codec: Codec,
        limiter: ConcurrencyLimiter,
        policy: RetryPolicy,
        stats: RunStats,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._codec = codec
        self._limiter = limiter
        self._policy = policy
        self._stats = stats
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._fatal: RequestError | None = None  # a fatal answer: no request may follow it

    async def send(self, batch: Batch) -> list[Outcome]:
        """The outcomes covering ``batch``'s rows, in row order; fatal answers raise."""
        return [await self._send_whole(batch)]

    async def _send_whole(self, batch: Batch) -> Outcome:
        latencies: list[float] = []
        attempt = 0
        while True:
            attempt += 1
            request_uuid = str(uuid.uuid4())
            request = self._codec.encode(batch, request_uuid)
            http_status: int | None = None
            async with self._limiter:
                if self._fatal is not None:
                    raise _fatal_error(self._fatal)
                try:
                    self._stats.requests += 1
                    response = await self._client.post(request.body, request.content_type)
                    http_status = response.status
                    latencies.append(response.latency_ms)
                    self._stats.latency.add(response.latency_ms)
                    if not response.ok:
                        raise classify_failure(response.status, response.body, response.retry_after)
                    results = self._codec.decode(response.body, batch, request_uuid)
                    return Outcome(
                        batch,
                        results,
                        http_status=response.status,
                        attempts=attempt,
                        latency_ms=response.latency_ms,
                        request_uuid=request_uuid,
                        latencies_ms=latencies,
                    )
                except RequestError as failure:
                    error = failure
                    if error.fatal:
                        # Set before the limiter lets the next request go: none follows.
                        self._fatal = error
            if error.fatal:
                raise _fatal_error(error)
            delay = self._policy.delay(attempt, error, self._rng)
            if delay is None:
                return Outcome(
                    batch,
                    None,
                    error=error.message,
                    error_kind=error.kind,
                    http_status=http_status,
                    attempts=attempt,
                    latency_ms=latencies[-1] if latencies else None,
                    request_uuid=request_uuid,
                    latencies_ms=latencies,
                )
            self._stats.retries += 1
            log.debug("batch %d: %s; retry in %.2f s", batch.seq, error.message, delay)
            await self._sleep(delay)


def _fatal_error(error: RequestError) -> ServiceError:
    return AuthError(error.message) if error.kind == "auth" else ServiceError(error.message)
