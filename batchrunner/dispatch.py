"""Sending one batch until it has an outcome: limiter, codec, client, retries.

``Dispatcher.send`` is the whole life of a batch on the wire: wait for a slot in the
limiter, encode (a fresh ``meta.uuid`` per attempt), post, judge the answer, and either
return the rows' results, retry after the policy's delay, or give up with error rows. A
fatal answer (the token refused, TLS broken) raises, and no request starts after it.

Encoding happens once a slot is held, so at most ``concurrency`` request bodies (files of up
to ``service.max_body_bytes``) are in memory at once; a batch that carries a file is encoded
in a worker thread, since reading it may block. When the codec refuses a batch before
sending (a file too large or unreadable), the batch becomes error rows at once, with the
codec's error and the number of requests really sent (0 unless an earlier attempt failed).
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
from batchrunner.protocols import Codec, EncodedRequest
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
            # What the row reports is this attempt's: its answer's status, its request's id.
            http_status: int | None = None
            sent_uuid: str | None = None
            async with self._limiter:
                if self._fatal is not None:
                    raise _fatal_error(self._fatal)
                try:
                    request = await self._encode(batch)
                except RequestError as unfit:
                    # Nothing of this attempt was sent; the same item would fail the same way.
                    return self._failed(batch, unfit, attempt - 1, None, None, latencies)
                sent_uuid = request.request_uuid
                try:
                    self._stats.requests += 1
                    response = await self._client.post(request.body, request.content_type)
                    http_status = response.status
                    latencies.append(response.latency_ms)
                    self._stats.latency.add(response.latency_ms)
                    if not response.ok:
                        raise classify_failure(response.status, response.body, response.retry_after)
                    results = self._codec.decode(response.body, batch, request.request_uuid or "")
                    return Outcome(
                        batch,
                        results,
                        http_status=response.status,
                        attempts=attempt,
                        latency_ms=response.latency_ms,
                        request_uuid=sent_uuid,
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
                return self._failed(batch, error, attempt, http_status, sent_uuid, latencies)
            self._stats.retries += 1
            log.debug("batch %d: %s; retry in %.2f s", batch.seq, error.message, delay)
            await self._sleep(delay)

    async def _encode(self, batch: Batch) -> EncodedRequest:
        request_uuid = str(uuid.uuid4())
        if batch.path is not None:
            return await asyncio.to_thread(self._codec.encode, batch, request_uuid)
        return self._codec.encode(batch, request_uuid)

    @staticmethod
    def _failed(
        batch: Batch,
        error: RequestError,
        attempts: int,
        http_status: int | None,
        request_uuid: str | None,
        latencies: list[float],
    ) -> Outcome:
        return Outcome(
            batch,
            None,
            error=error.message,
            error_kind=error.kind,
            http_status=http_status,
            attempts=attempts,
            latency_ms=latencies[-1] if latencies else None,
            request_uuid=request_uuid,
            latencies_ms=latencies,
        )


def _fatal_error(error: RequestError) -> ServiceError:
    return AuthError(error.message) if error.kind == "auth" else ServiceError(error.message)
