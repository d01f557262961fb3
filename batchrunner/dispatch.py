"""Sending one batch until it has an outcome: limiter, codec, client, retries, token renewal.

``Dispatcher.send`` is the whole life of a batch on the wire: encode (a fresh ``meta.uuid``
per attempt), wait for a slot in the limiter, take the current token, post, judge the
answer, and either return the rows' results, retry after the policy's delay, or give up
with error rows.

A 401 asks the token source for a better token. Requests refused in the same wave share
one renewal (the source is single-flight), and each is sent again at once with the new
token: a renewal costs no backoff and no attempt of the retry budget. While a renewal is
under way no new request starts; if it finds no better token (or IAM refuses the login),
the 401 is fatal. A fatal answer (the token refused for good, TLS broken) raises, and no
request starts after it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Callable

from batchrunner.auth import Secret, TokenProvider
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

# When this many renewed tokens in a row are refused before the service accepts any
# request, the run stops: new tokens are refused too (e.g. IAM scopes them to another
# project), and renewing again would only log in forever.
MAX_RENEWALS_IN_A_ROW = 3
UNAUTHORIZED = 401


class Dispatcher:
    """Sends batches through one client, within one limiter, under one retry policy.

    ``tokens`` gives each request its token and renews a refused one; None sends none
    (an AppCode alone, or the client's own token).
    """

    def __init__(
        self,
        client: ServiceClient,
        codec: Codec,
        limiter: ConcurrencyLimiter,
        policy: RetryPolicy,
        stats: RunStats,
        *,
        tokens: TokenProvider | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._codec = codec
        self._limiter = limiter
        self._policy = policy
        self._stats = stats
        self._tokens = tokens
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._fatal: ServiceError | None = None  # set once: no request may start after it
        self._renewing = 0  # renewals under way; no request starts until they are done
        self._renewed = asyncio.Event()
        self._renewed.set()
        self._latest: Secret | None = None  # the latest token a renewal gave
        self._renewals_in_a_row = 0  # new tokens since the service last accepted one
        self.renewals = 0  # 401s answered by a renewed token (each request of a wave counts)

    async def send(self, batch: Batch) -> list[Outcome]:
        """The outcomes covering ``batch``'s rows, in row order; fatal answers raise."""
        return [await self._send_whole(batch)]

    async def _send_whole(self, batch: Batch) -> Outcome:
        latencies: list[float] = []
        attempt = 0
        renewals = 0  # sends answered by a renewed token: they do not count as retries
        while True:
            attempt += 1
            request_uuid = str(uuid.uuid4())
            request = self._codec.encode(batch, request_uuid)
            http_status: int | None = None
            renewed = False
            async with self._limiter:
                await self._renewed.wait()
                if self._fatal is not None:
                    raise self._barred()
                token: Secret | None = None
                try:
                    token = await self._current_token()
                    self._stats.requests += 1
                    response = await self._client.post(
                        request.body, request.content_type, token=token
                    )
                    http_status = response.status
                    latencies.append(response.latency_ms)
                    self._stats.latency.add(response.latency_ms)
                    if response.ok:
                        self._renewals_in_a_row = 0  # the token was accepted
                    else:
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
                if error.http_status == UNAUTHORIZED and token is not None:
                    try:
                        await self._renew(token, error)
                        renewed = True
                    except RequestError as failure:  # IAM unreachable: an ordinary failure
                        error = failure
                if not renewed and error.fatal:
                    # Set before the limiter lets the next request go: none follows.
                    raise self._bar(_fatal_error(error))
            if renewed:
                renewals += 1
                self._stats.retries += 1
                continue
            delay = self._policy.delay(attempt - renewals, error, self._rng)
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

    async def _current_token(self) -> Secret | None:
        if self._tokens is None:
            return None
        try:
            return await self._tokens.current()
        except ServiceError as exc:  # IAM refused the login that renews an expiring token
            raise self._bar(exc) from None

    async def _renew(self, refused: Secret, failure: RequestError) -> None:
        """Have the token source replace ``refused``; raises ``ServiceError`` (and bars
        every later request) when it cannot, ``RequestError`` when IAM cannot be reached."""
        assert self._tokens is not None
        self._renewing += 1
        self._renewed.clear()
        try:
            if self._renewals_in_a_row >= MAX_RENEWALS_IN_A_ROW:
                raise self._bar(_fatal_error(failure, self._renewals_in_a_row))
            try:
                renewed = await self._tokens.refresh(refused)
            except ServiceError as exc:
                raise self._bar(exc) from None
            if renewed is None:
                raise self._bar(_fatal_error(failure))
            if renewed != self._latest:  # a new token, not the one this wave already got
                self._latest = renewed
                self._renewals_in_a_row += 1
            self.renewals += 1
            log.debug("the service refused a token; sending again with a renewed one")
        finally:
            # The fatal flag, if any, is set before the waiting requests are let go.
            self._renewing -= 1
            if self._renewing == 0:
                self._renewed.set()

    def _bar(self, error: ServiceError) -> ServiceError:
        """Stop every later request because of ``error`` (the first such error wins)."""
        if self._fatal is None:
            self._fatal = error
        return self._barred()

    def _barred(self) -> ServiceError:
        # A fresh exception per task: one instance raised in many tasks would pile up
        # their tracebacks.
        assert self._fatal is not None
        return type(self._fatal)(str(self._fatal))


def _fatal_error(error: RequestError, renewals_in_a_row: int = 0) -> ServiceError:
    if error.kind != "auth":
        return ServiceError(error.message)
    if renewals_in_a_row:
        return AuthError(
            f"{error.message}; renewed tokens were refused as well ({renewals_in_a_row} in a "
            "row): check that the token source is for this service (for IAM: "
            "service.iam.project is the service's project)"
        )
    return AuthError(error.message)
