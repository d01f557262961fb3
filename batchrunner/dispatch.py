"""Sending one batch until it has an outcome: limiter, codec, client, retries, splitting.

``Dispatcher.send`` is the whole life of a batch on the wire: wait for a slot in the
limiter, encode (a fresh ``meta.uuid`` per attempt), post, judge the answer, and either
return the rows' results, retry after the policy's delay, or give up with error rows. When a
request is refused for a reason one row may cause (a model error, a 400 or 413, a
``resp_data`` of the wrong length, a body over ``batch.max_request_bytes``), the batch is
split in halves, and halves of halves, so that good rows still get results and only the bad
row becomes an error row. A fatal answer (the token refused, TLS broken) raises, and no
request starts after it.

Encoding happens once a slot is held, so at most ``concurrency`` request bodies (files of up
to ``batch.max_request_bytes``) are in memory at once; a batch that carries a file is
encoded in a worker thread, since reading it may block. When the codec refuses a batch
before sending (a file too large or unreadable), the batch becomes error rows at once, with
the codec's error and the number of requests really sent (0 unless an earlier attempt
failed); such a refusal is about the one file, never split.
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
from batchrunner.job import DEFAULT_MAX_REQUEST_BYTES
from batchrunner.limiter import ConcurrencyLimiter, RateLimiter
from batchrunner.protocols import Codec, EncodedRequest
from batchrunner.protocols.modelarts import classify_failure
from batchrunner.report import RunStats
from batchrunner.retry import RetryPolicy

log = logging.getLogger("batchrunner")

Sleep = Callable[[float], Awaitable[None]]
# Answers that say "too many at once": the adaptive limiter backs off on them.
PUSH_BACK_STATUSES = frozenset({429, 503})


class _Dropped(Exception):
    """The run is stopping: this batch is left for the next run."""


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
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        rate: RateLimiter | None = None,
        stopping: asyncio.Event | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._codec = codec
        self._limiter = limiter
        self._policy = policy
        self._stats = stats
        self._max_request_bytes = max_request_bytes
        self._rate = rate
        self._stopping = stopping or asyncio.Event()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._fatal: RequestError | None = None  # a fatal answer: no request may follow it

    async def send(self, batch: Batch) -> list[Outcome]:
        """Outcomes covering all of ``batch``'s rows in row order, or [] if the run is
        stopping and the batch was given up (it is sent again by the next run)."""
        try:
            return await self._send_splitting(batch)
        except _Dropped:
            return []

    async def _send_splitting(self, batch: Batch) -> list[Outcome]:
        outcome, error = await self._send_whole(batch)
        if error is None or not error.row_specific or len(batch) < 2 or batch.rows is None:
            return [outcome]
        self._stats.splits += 1
        log.debug("batch %d: %s; splitting %d rows in halves", batch.seq, error, len(batch))
        left, right = batch.split()
        async with asyncio.TaskGroup() as halves:
            first = halves.create_task(self._send_splitting(left))
            second = halves.create_task(self._send_splitting(right))
        return [*first.result(), *second.result()]

    async def _send_whole(self, batch: Batch) -> tuple[Outcome, RequestError | None]:
        latencies: list[float] = []
        attempt = 0  # requests sent so far
        while True:
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
                    return self._failed(batch, unfit, attempt, latencies, None, None), unfit
                if len(request.body) > self._max_request_bytes:
                    too_big = RequestError(
                        f"the request would be {len(request.body):,} bytes, over "
                        f"batch.max_request_bytes ({self._max_request_bytes:,})",
                        kind="request_too_large",
                        retryable=False,
                        row_specific=True,
                    )
                    return self._failed(batch, too_big, attempt, latencies, None, None), too_big
                attempt += 1
                sent_uuid = request.request_uuid
                if self._rate is not None:
                    await self._rate.acquire()
                try:
                    self._stats.requests += 1
                    response = await self._client.post(request.body, request.content_type)
                    http_status = response.status
                    latencies.append(response.latency_ms)
                    self._stats.latency.add(response.latency_ms)
                    self._limiter.feedback(
                        response.latency_ms, pushed_back=response.status in PUSH_BACK_STATUSES
                    )
                    if response.status == 429:
                        self._stats.throttled += 1
                    if not response.ok:
                        raise classify_failure(response.status, response.body, response.retry_after)
                    results = self._codec.decode(response.body, batch, sent_uuid or "")
                    outcome = Outcome(
                        batch,
                        results,
                        http_status=response.status,
                        attempts=attempt,
                        latency_ms=response.latency_ms,
                        request_uuid=sent_uuid,
                        latencies_ms=latencies,
                    )
                    return outcome, None
                except RequestError as failure:
                    error = failure
                    if error.kind == "timeout":
                        self._limiter.feedback(None, pushed_back=True)
                    if error.fatal:
                        # Set before the limiter lets the next request go: none follows.
                        self._fatal = error
            if error.fatal:
                raise _fatal_error(error)
            delay = self._policy.delay(attempt, error, self._rng)
            if delay is None:
                outcome = self._failed(batch, error, attempt, latencies, http_status, sent_uuid)
                return outcome, error
            if self._stopping.is_set():
                raise _Dropped
            self._stats.retries += 1
            log.debug("batch %d: %s; retry in %.2f s", batch.seq, error.message, delay)
            await self._sleep(delay)

    async def _encode(self, batch: Batch) -> EncodedRequest:
        request_uuid = str(uuid.uuid4())
        if batch.path is not None:  # reading a file may block: off the event loop
            return await asyncio.to_thread(self._codec.encode, batch, request_uuid)
        return self._codec.encode(batch, request_uuid)

    @staticmethod
    def _failed(
        batch: Batch,
        error: RequestError,
        attempts: int,
        latencies: list[float],
        http_status: int | None,
        request_uuid: str | None,
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
