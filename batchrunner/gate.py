"""The gate every request of a run passes: the token it carries, renewed once for all the
requests a refusal hits (single flight), and the fatal answer that bars every later one.

A renewal under way holds each request at ``check_open`` until it is done; a fatal answer
(a refused login, too many renewed tokens refused in a row, an unreachable service) is kept,
scrubbed of secrets, and raised afresh in every request that comes to the gate after it.
"""

from __future__ import annotations

import asyncio
import logging

from batchrunner.auth import Scrubber, Secret, TokenProvider
from batchrunner.errors import AuthError, ErrorKind, RequestError, ServiceError

log = logging.getLogger("batchrunner")

# New tokens refused in a row (no request accepted in between) before the run stops.
MAX_RENEWALS_IN_A_ROW = 3


class Gate:
    """The run's token (``tokens``; None sends none) and its bar (see the module)."""

    def __init__(self, tokens: TokenProvider | None, scrubber: Scrubber) -> None:
        self._tokens = tokens
        self._scrubber = scrubber
        self._fatal: ServiceError | None = None  # set once: no request may start after it
        self._renewing = 0  # renewals under way; no request starts until they are done
        self._renewed = asyncio.Event()
        self._renewed.set()
        self._latest: Secret | None = None  # the latest token a renewal gave
        self._renewals_in_a_row = 0  # new tokens since the service last accepted one
        self.renewals = 0  # 401s answered by a renewed token (each request of a wave counts)

    async def check_open(self) -> None:
        """Wait out a renewal under way; raise if a fatal answer bars every request."""
        while not self._renewed.is_set():
            await self._renewed.wait()
        if self._fatal is not None:
            raise self.barred()

    async def token(self) -> Secret | None:
        """The token to send now (None: no token source)."""
        if self._tokens is None:
            return None
        try:
            return await self._tokens.current()
        except ServiceError as exc:  # IAM refused the login that renews an expiring token
            raise self.bar(exc) from None

    def accepted(self) -> None:
        """The service accepted a request's token."""
        self._renewals_in_a_row = 0

    async def renew(self, refused: Secret, failure: RequestError) -> None:
        """Have the token source replace ``refused``; raises ``ServiceError`` (and bars
        every later request) when it cannot, ``RequestError`` when IAM cannot be reached."""
        assert self._tokens is not None
        self._renewing += 1
        self._renewed.clear()
        try:
            if self._renewals_in_a_row >= MAX_RENEWALS_IN_A_ROW:
                raise self.bar(fatal_error(failure, self._renewals_in_a_row))
            try:
                renewed = await self._tokens.refresh(refused)
            except ServiceError as exc:
                raise self.bar(exc) from None
            if renewed is None:
                raise self.bar(fatal_error(failure))
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

    def bar(self, error: ServiceError) -> ServiceError:
        """Stop every later request because of ``error`` (the first such error wins)."""
        if self._fatal is None:
            # Its message may quote the service or IAM: no secret goes with it.
            self._fatal = type(error)(self._scrubber.text(str(error)))
        return self.barred()

    def barred(self) -> ServiceError:
        # A fresh exception per task: one instance raised in many tasks would pile up
        # their tracebacks.
        assert self._fatal is not None
        return type(self._fatal)(str(self._fatal))


def fatal_error(error: RequestError, renewals_in_a_row: int = 0) -> ServiceError:
    """The error that stops a run for a fatal answer ``error`` (an ``AuthError`` for 401/403)."""
    if error.kind != ErrorKind.AUTH:
        return ServiceError(error.message)
    if renewals_in_a_row:
        return AuthError(
            f"{error.message}; renewed tokens were refused as well ({renewals_in_a_row} in a "
            "row): check that the token source is for this service (for IAM: "
            "service.iam.project is the service's project)"
        )
    return AuthError(error.message)
