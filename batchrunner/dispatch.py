"""Sending one batch until it has an outcome: limiter, codec, client, retries, splitting,
token renewal.

``Dispatcher.send`` is the whole life of a batch on the wire: wait for a slot in the
limiter, encode (a fresh ``meta.uuid`` per attempt), post, judge the answer, and either
return the rows' results, retry after the policy's delay, or give up with error rows. When a
request is refused for a reason one row may cause (a model error, a 400 or 413, a
``resp_data`` of the wrong length, a body over ``batch.max_request_bytes``), the batch is
split in halves, and halves of halves, so that good rows still get results and only the bad
row becomes an error row.

Each request takes its token from the token source and carries it. A 401 asks the source for
a better token. Requests refused in the same wave share one renewal (the source is
single-flight), and each is sent again at once with the new token: a renewal costs no backoff
and no attempt of the retry budget. While a renewal is under way no new request starts; if it
finds no better token (or IAM refuses the login), the 401 is fatal. A fatal answer (the token
refused for good, TLS broken) raises, and no request starts after it.

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
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from batchrunner.auth import Scrubber, Secret, TokenProvider
from batchrunner.client import Response, ServiceClient
from batchrunner.errors import ErrorKind, RequestError, ServiceError
from batchrunner.gate import Gate, fatal_error
from batchrunner.items import Batch, Outcome
from batchrunner.job.service import DEFAULT_UNREACHABLE_AFTER
from batchrunner.job.settings import DEFAULT_MAX_REQUEST_BYTES
from batchrunner.limiter import ConcurrencyLimiter, RateLimiter
from batchrunner.protocols import Codec, EncodedRequest, Metered
from batchrunner.report import DispatchStatistics, DispatchTally
from batchrunner.retry import QUICK_RETRY_MIN, FailureWindow, RetryPolicy
from batchrunner.storage import ObjectPath
from batchrunner.tokenmeter import BudgetReached, TokenMeter

log = logging.getLogger("batchrunner")

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")

# When this many renewed tokens in a row are refused before the service accepts any
# request, the run stops: new tokens are refused too (e.g. IAM scopes them to another
# project), and renewing again would only log in forever.
UNAUTHORIZED = 401
TOO_MANY_REQUESTS = 429
# The service counts as unreachable only after at least this many requests in a row failed
# to connect or timed out (and none succeeded for service.unreachable_after seconds).
UNREACHABLE_STREAK = 8
# Failures that say nothing reached the service.
_UNREACHED_KINDS = frozenset({ErrorKind.CONNECTION, ErrorKind.TIMEOUT})
# Files up to this size are read on the event loop (see _small_file).
READ_ON_LOOP_BYTES = 256 * 1024
# Batches told to wait out the same Retry-After come back this many to a round trip of the
# service, one after another, not all at the same instant (see _send_whole).
RETURNS_PER_ROUND_TRIP = 4


class _Dropped(Exception):
    """The run is stopping: this batch is left for the next run."""


class Dispatcher:
    """Sends batches through one client, within one limiter, under one retry policy.

    ``tokens`` gives each request its token and renews a refused one; None sends none
    (an AppCode alone, or the client's own token). It counts what it sends and what comes
    back; ``statistics()`` tells.
    """

    def __init__(
        self,
        client: ServiceClient,
        codec: Codec,
        limiter: ConcurrencyLimiter,
        policy: RetryPolicy,
        *,
        tokens: TokenProvider | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        rate: RateLimiter | None = None,
        stopping: asyncio.Event | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        scrubber: Scrubber | None = None,
        unreachable_after: float = DEFAULT_UNREACHABLE_AFTER,
        clock: Callable[[], float] = time.monotonic,
        meter: TokenMeter | None = None,
    ) -> None:
        self._client = client
        self._meter = meter
        self._codec = codec
        self._limiter = limiter
        self._policy = policy
        self._max_request_bytes = max_request_bytes
        self._rate = rate
        self._stopping = stopping or asyncio.Event()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._scrubber = scrubber if scrubber is not None else Scrubber()
        self._unreachable_after = unreachable_after
        self._clock = clock
        self._last_success = clock()  # or the start: no success yet
        self._unreached_in_a_row = 0  # requests that failed to connect or timed out
        self._gate = Gate(tokens, self._scrubber)  # the token, its renewal, the fatal bar
        # Overload or a random failure? (see retry): decides the backoff and the bound.
        self._window = FailureWindow()
        self._answered = 0  # requests answered 2xx
        self._counts = DispatchTally()  # what statistics() tells
        self._waiting_out = 0  # batches waiting out a Retry-After now

    @property
    def renewals(self) -> int:
        """401s answered by a renewed token (each request of a wave counts)."""
        return self._gate.renewals

    def statistics(self) -> DispatchStatistics:
        """What this dispatcher has sent so far, and what came back (a frozen copy)."""
        return self._counts.statistics()

    async def send(self, batch: Batch) -> list[Outcome]:
        """Outcomes covering all of ``batch``'s rows in row order, or [] if the run is
        stopping and the batch was given up (it is sent again by the next run); fatal
        answers raise."""
        try:
            return await self._send_splitting(batch)
        except _Dropped:
            return []

    async def _send_splitting(self, batch: Batch) -> list[Outcome]:
        outcome, error = await self._send_whole(batch)
        if not _worth_splitting(batch, error):
            return [outcome]
        return await self._split(batch, uniform_above=False)

    async def _split(self, batch: Batch, *, uniform_above: bool) -> list[Outcome]:
        """Send the halves of ``batch`` (refused for a reason one row may cause), and the
        halves of a half refused so, until the bad rows are alone.

        When both halves fail the same way (same kind, same status), one bad row cannot be
        the cause; when it happens twice in a row (at this split and at the one above it),
        halving no longer helps: the service refuses every row alike, and the halves' rows
        become error rows as they are. A batch refused whole thus costs at most 7 requests
        (itself, 2 halves, 4 quarters) instead of 2n - 1.
        """
        self._counts.splits += 1
        log.debug("batch %d: splitting %d rows in halves", batch.seq, len(batch))
        left, right = batch.split()
        (left_outcome, left_error), (right_outcome, right_error) = await _both(
            self._send_whole(left), self._send_whole(right)
        )
        uniform = _same_failure(left_error, right_error)
        if uniform and uniform_above:
            log.debug("batch %d: every half fails alike: splitting stops", batch.seq)
            return [left_outcome, right_outcome]
        first, second = await _both(
            self._descend(left, left_outcome, left_error, uniform),
            self._descend(right, right_outcome, right_error, uniform),
        )
        return [*first, *second]

    async def _descend(
        self, half: Batch, outcome: Outcome, error: RequestError | None, uniform: bool
    ) -> list[Outcome]:
        if not _worth_splitting(half, error):
            return [outcome]
        return await self._split(half, uniform_above=uniform)

    async def _send_whole(self, batch: Batch) -> tuple[Outcome, RequestError | None]:
        last_latency: float | None = None
        attempt = 0  # requests sent so far
        tries = 0  # attempts of the retry budget (a token IAM could not give is one)
        renewals = 0  # sends answered by a renewed token: they do not count as retries
        # 429s while the service answered others: the batch's turn, not its fault; they do
        # not use up the retry budget (at most max_attempts of them).
        throttled = 0
        while True:
            # What the row reports is this attempt's: its answer's status, its request's id.
            http_status: int | None = None
            sent_uuid: str | None = None
            renewed = False
            overload = True
            answered_before = self._answered
            async with self._limiter:
                if self._stopping.is_set():
                    raise _Dropped  # waited for a slot while the run was told to stop
                await self._gate.check_open()
                try:
                    request = await self._encode(batch)
                except RequestError as unfit:
                    # Nothing of this attempt was sent; the same item would fail the same way,
                    # and every item would, when the store refused the keys (fatal).
                    if unfit.fatal:
                        raise self._gate.bar(fatal_error(unfit)) from None
                    return self._failed(batch, unfit, attempt, last_latency, None, None), unfit
                if len(request.body) > self._max_request_bytes:
                    too_big = RequestError(
                        f"the request would be {len(request.body):,} bytes, over "
                        f"batch.max_request_bytes ({self._max_request_bytes:,})",
                        kind=ErrorKind.REQUEST_TOO_LARGE,
                        retryable=False,
                        row_specific=True,
                    )
                    return self._failed(batch, too_big, attempt, last_latency, None, None), too_big
                if self._rate is not None:
                    await self._rate.acquire()
                estimate = await self._reserve(request)
                # Encoding and the rate limit may have waited: a renewal or a fatal answer
                # may have come meanwhile. Only the token source is awaited between this
                # check and the post.
                await self._gate.check_open()
                token: Secret | None = None
                tries += 1
                try:
                    token = await self._gate.token()
                    self._scrubber.add(token)  # whatever comes back, this is not shown
                    attempt += 1
                    sent_uuid = request.request_uuid
                    self._counts.requests += 1
                    try:
                        response = await self._client.post(
                            request.body, request.content_type, token=token, path=request.path
                        )
                    except BaseException:
                        self._settle(estimate, None)
                        estimate = None
                        raise
                    self._settle(estimate, response)
                    estimate = None
                    http_status = response.status
                    self._unreached_in_a_row = 0
                    last_latency = response.latency_ms
                    # Service-provided text reaches results, error rows, logs and the
                    # summary: no secret of ours goes with it, whatever the service echoed.
                    body = self._scrubber.body(response.body)
                    self._counts.latency.add(response.latency_ms)
                    if response.ok:
                        self._limiter.feedback(response.latency_ms, pushed_back=False)
                    if response.status == 429:
                        self._counts.throttled += 1
                    if response.ok:
                        self._answered += 1
                        self._gate.accepted()
                        self._last_success = self._clock()
                    else:
                        raise self._codec.classify_failure(
                            response.status, body, response.retry_after
                        )
                    results = self._codec.decode(body, batch, request)
                    self._window.answered(response.latency_ms)
                    outcome = Outcome(
                        batch,
                        results,
                        http_status=response.status,
                        attempts=attempt,
                        latency_ms=response.latency_ms,
                        request_uuid=sent_uuid,
                    )
                    return outcome, None
                except RequestError as failure:
                    self._settle(estimate, None)  # not sent, or no answer
                    error = self._scrubbed(failure)
                    # Only overload shrinks the bound: a random failure says nothing of load.
                    self._window.failed(error)
                    overload = self._window.overload(error)
                    if overload and error.retryable:
                        latency = None if http_status is None else last_latency
                        self._limiter.feedback(latency, pushed_back=True)
                    if http_status is None and error.kind in _UNREACHED_KINDS:
                        self._check_reachable(error)
                if error.http_status == UNAUTHORIZED and token is not None:
                    try:
                        await self._gate.renew(token, error)
                        renewed = True
                    except RequestError as failure:  # IAM unreachable: an ordinary failure
                        error = failure
                if not renewed and error.fatal:
                    # Set before the limiter lets the next request go: none follows.
                    raise self._gate.bar(fatal_error(error))
            if renewed:
                # Sent again at once with the new token: no backoff, no attempt used up.
                if self._stopping.is_set():
                    raise _Dropped
                renewals += 1
                self._counts.retries += 1
                self._counts.retry_reasons[ErrorKind.TOKEN_RENEWED.value] += 1
                continue
            if (
                error.http_status == TOO_MANY_REQUESTS
                and self._answered > answered_before
                and throttled < self._policy.max_attempts
            ):
                throttled += 1
            delay = self._policy.delay(
                max(1, tries - renewals - throttled),
                error,
                self._rng,
                overload=overload,
                round_trip=self._window.round_trip,
            )
            if delay is None:
                outcome = self._failed(batch, error, attempt, last_latency, http_status, sent_uuid)
                return outcome, error
            if self._stopping.is_set():
                raise _Dropped
            self._counts.retries += 1
            self._counts.retry_reasons[error.kind] += 1
            # Batches throttled together (a 429 wave) would all come back at the instant
            # their Retry-After ends, find the service full again and wait it out once more:
            # each one already waiting puts this one a fraction of a round trip later.
            waiting_out = error.retry_after is not None
            if waiting_out:
                step = (self._window.round_trip or QUICK_RETRY_MIN) / RETURNS_PER_ROUND_TRIP
                delay += self._waiting_out * step
                self._waiting_out += 1
            log.debug("batch %d: %s; retry in %.2f s", batch.seq, error.message, delay)
            try:
                await self._back_off(delay)
            finally:
                self._waiting_out -= waiting_out

    async def _reserve(self, request: EncodedRequest) -> int | None:
        """Wait for the token meter (rate limits in requests and tokens, the server's
        headers); the estimate reserved, or None without a meter. When the token budget is
        reached, the run stops taking new requests and this batch is left for the next run."""
        if self._meter is None:
            return None
        try:
            await self._meter.reserve(request.estimated_tokens)
        except BudgetReached:
            if not self._stopping.is_set():
                log.warning("%s", self._meter.exhausted)
            self._stopping.set()
            raise _Dropped from None
        return request.estimated_tokens

    def _settle(self, estimate: int | None, response: Response | None) -> None:
        """Tell the meter what became of a request reserved with ``estimate`` (once), and
        count the tokens its answer says it took."""
        if estimate is None or self._meter is None:
            return
        usage = None
        if response is not None and response.ok and isinstance(self._codec, Metered):
            usage = self._codec.usage(response.body)
        if usage is not None:
            self._counts.tokens_in += usage.prompt
            self._counts.tokens_out += usage.completion
        self._meter.settle(
            estimate,
            usage.prompt if usage is not None else None,
            usage.completion if usage is not None else None,
            response.rate_limits if response is not None else {},
        )

    async def _back_off(self, delay: float) -> None:
        """Wait ``delay`` seconds before a retry; a stop (a signal) ends the wait at once:
        a batch waiting to retry is not in flight, and is left for the next run."""
        sleeping = asyncio.ensure_future(self._sleep(delay))
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((sleeping, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            stopped.cancel()
        if self._stopping.is_set():
            raise _Dropped

    def _scrubbed(self, error: RequestError) -> RequestError:
        """``error`` with no secret in its message (it may quote the service)."""
        message = self._scrubber.text(error.message)
        if message == error.message:
            return error
        return RequestError(
            message,
            kind=error.kind,
            retryable=error.retryable,
            fatal=error.fatal,
            row_specific=error.row_specific,
            http_status=error.http_status,
            retry_after=error.retry_after,
        )

    def _check_reachable(self, error: RequestError) -> None:
        """Stop the run (a fatal ``ServiceError``) when nothing has succeeded for
        ``unreachable_after`` seconds and the latest requests all failed to connect or timed
        out: the service is down, and the rest of the input would only become error rows."""
        self._unreached_in_a_row += 1
        quiet = self._clock() - self._last_success
        if self._unreached_in_a_row < UNREACHABLE_STREAK or quiet < self._unreachable_after:
            return
        raise self._gate.bar(
            ServiceError(
                f"the service cannot be reached: no request has succeeded for {quiet:.0f} s "
                f"and the last {self._unreached_in_a_row} failed to connect or timed out "
                f"(last: {error.message}); check service.url and the network, then re-run "
                "the same command to resume (service.unreachable_after = "
                f"{self._unreachable_after:g} s)"
            )
        )

    async def _encode(self, batch: Batch) -> EncodedRequest:
        request_uuid = str(uuid.uuid4())
        if batch.path is not None and not _small_file(batch.path):
            # Reading a large file takes a while: off the event loop.
            return await asyncio.to_thread(self._codec.encode, batch, request_uuid)
        return self._codec.encode(batch, request_uuid)

    @staticmethod
    def _failed(
        batch: Batch,
        error: RequestError,
        attempts: int,
        latency_ms: float | None,
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
            latency_ms=latency_ms,
            request_uuid=request_uuid,
        )


def _worth_splitting(batch: Batch, error: RequestError | None) -> bool:
    """Whether halves of ``batch``, refused with ``error``, may fare better."""
    return error is not None and error.row_specific and len(batch) >= 2 and batch.rows is not None


def _same_failure(first: RequestError | None, second: RequestError | None) -> bool:
    """Whether the service refused both alike. A body over ``batch.max_request_bytes`` is
    refused before sending (no status): halving is its cure, and costs no request."""
    return (
        first is not None
        and second is not None
        and first.http_status is not None
        and (first.kind, first.http_status) == (second.kind, second.http_status)
    )


async def _both(first: Coroutine[Any, Any, T], second: Coroutine[Any, Any, T]) -> tuple[T, T]:
    """Await both at once; a stop (``_Dropped``) in either comes out as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            one = group.create_task(first)
            two = group.create_task(second)
    except BaseExceptionGroup as failures:
        _, others = failures.split(_Dropped)
        if others is None:
            raise _Dropped from None
        raise
    return one.result(), two.result()


def _small_file(path: Path | ObjectPath) -> bool:
    """Whether ``path`` is a file small enough to read on the event loop.

    Reading a small file takes a few system calls (tens of microseconds); a hop to a worker
    thread costs more than that, and the worker's Python code holds the lock the event loop
    needs for its own. Anything else (large, or a stat that fails) is read in a worker.
    """
    try:
        return os.stat(path).st_size <= READ_ON_LOOP_BYTES
    except OSError:
        return False
