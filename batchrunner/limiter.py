"""How many requests may be in flight at once: one limiter shared by every request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot: the bound, what is in flight now, the most ever in flight, waiters."""

    limit: int
    in_flight: int
    peak_in_flight: int
    waiting: int


class ConcurrencyLimiter:
    """An async context manager that admits at most ``limit`` holders at a time."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = limit
        self._semaphore = asyncio.Semaphore(limit)
        self._in_flight = 0
        self._peak = 0
        self._waiting = 0

    async def __aenter__(self) -> None:
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._in_flight -= 1
        self._semaphore.release()

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(self._limit, self._in_flight, self._peak, self._waiting)
