"""How many requests may be in flight, and how many may start per second.

One limiter is shared by every request of a run. ``ConcurrencyLimiter`` holds a fixed bound;
``AdaptiveLimiter`` finds the service's capacity by itself (``concurrency = "auto"``):
additive increase while answers come back fast, multiplicative decrease on 429/503 and on
latency inflation, as TCP congestion control and Netflix's concurrency-limits do. It
remembers the bound at which the service last pushed back and probes slowly near it, so
that a service with a hard capacity is kept full with few refusals. ``RateLimiter`` is a
token bucket for services with a per-second quota. Time comes in as parameters: tests run
without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from itertools import islice
from types import TracebackType


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot: the bound, what is in flight now, the most ever in flight, waiters."""

    limit: int
    in_flight: int
    peak_in_flight: int
    waiting: int


class ConcurrencyLimiter:
    """An async context manager that admits at most ``limit`` holders at a time.

    Waiters are served first come, first served, and a slot given back goes straight to the
    first waiter (its future is resolved with the slot already counted): the next request
    starts on the event loop's next turn, without re-checking a condition.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._limit = float(limit)
        self._in_flight = 0
        self._peak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        return max(1, int(self._limit))

    @property
    def _waiting(self) -> int:
        return len(self._waiters)  # a cancelled waiter removes itself

    async def __aenter__(self) -> None:
        if self._in_flight < self.limit and not self._waiters:
            self._take()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # resolved by _grant, which took it off the queue and counted the slot
        except asyncio.CancelledError:
            if waiter.cancelled():  # still queued: leave the queue
                with suppress(ValueError):
                    self._waiters.remove(waiter)
            else:
                self._give_back()  # granted, then cancelled before it could start
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._give_back()

    def _take(self) -> None:
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)

    def _give_back(self) -> None:
        self._in_flight -= 1
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to the waiters, oldest first."""
        while self._waiters and self._in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():  # not cancelled meanwhile
                self._take()
                waiter.set_result(None)

    def feedback(self, latency_ms: float | None, *, pushed_back: bool) -> None:
        """An answer came: its latency, and whether the service pushed back (429/503).

        A fixed limiter ignores it; see ``AdaptiveLimiter``.
        """

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(self.limit, self._in_flight, self._peak, self._waiting)


class AdaptiveLimiter(ConcurrencyLimiter):
    """A concurrency bound that follows the service's capacity (AIMD).

    - Start at ``initial``; until the first push-back, grow by half a request per answer
      (slow start: the bound grows by half every round trip).
    - After that, grow by ``1 / limit`` per answer (one per round trip) up to just below the
      bound at which the service last pushed back (the ceiling). Going past it is a probe
      that costs a refused request (parked for its Retry-After), so it waits ``probe_hold``
      seconds after the last cut, then creeps (a tenth of a request per round trip); each
      probe the service refuses again doubles the wait (up to ``max_probe_hold``), and one
      it takes (capacity grew) lifts the ceiling.
    - The bound grows only while it is in use (requests wait for a slot, or every slot is
      taken): a run whose input is slower than the service, or that is draining at its
      end, has nothing to learn by raising it.
    - On push-back (a 429, a 503 with Retry-After, a timeout, many failures together: the
      dispatcher tells overload from a random failure, which it does not report), or when
      every answer of the latest round trip (as many as the bound) was slower than
      ``latency_tolerance`` times the fastest seen lately (a queue at the service slows
      every answer; a busy machine slows some, and a few fast ones say there is no
      queue), shrink to ``backoff`` times the bound (half, the first time), at most
      once per round trip.
    """

    def __init__(
        self,
        initial: int,
        maximum: int,
        *,
        minimum: int = 1,
        backoff: float = 0.9,
        latency_tolerance: float = 2.0,
        probe_hold: float = 1.0,
        max_probe_hold: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(max(minimum, min(initial, maximum)))
        self._minimum = minimum
        self._maximum = maximum
        self._backoff = backoff
        self._tolerance = latency_tolerance
        self._base_hold = probe_hold
        self._max_hold = max_probe_hold
        self._hold = probe_hold
        self._clock = clock
        self._slow_start = True
        self._ceiling: float | None = None  # the bound at the last push-back
        self._fastest_ms: float | None = None
        self._recent_ms: float | None = None  # a moving average of the latest answers
        self._latest_ms: deque[float] = deque(maxlen=max(4, maximum))
        self._last_decrease = float("-inf")
        self.decreases = 0

    def feedback(self, latency_ms: float | None, *, pushed_back: bool) -> None:
        now = self._clock()
        if latency_ms is not None and latency_ms > 0 and not pushed_back:
            # the fastest real answer lately (a refusal comes back at once: it says nothing of
            # the service's speed); it drifts up slowly so that a stale minimum fades
            fastest = self._fastest_ms
            self._fastest_ms = latency_ms if fastest is None else min(latency_ms, fastest * 1.001)
            recent = self._recent_ms
            self._recent_ms = latency_ms if recent is None else recent + (latency_ms - recent) / 8
            self._latest_ms.append(latency_ms)
        inflated = (
            latency_ms is not None
            and not pushed_back
            and self._fastest_ms is not None
            and latency_ms > 1.0  # below a millisecond, scheduling noise is not congestion
            and self._round_trip_fastest_ms() > self._tolerance * self._fastest_ms
        )
        if pushed_back or inflated:
            self._decrease(now, refused=pushed_back)
        elif self._waiting or self._in_flight >= self.limit:
            self._increase(now)

    def _round_trip_fastest_ms(self) -> float:
        """The fastest of the latest round trip's answers (as many as the bound, at least 4)."""
        count = min(len(self._latest_ms), max(4, self.limit))
        return min(islice(reversed(self._latest_ms), count))

    def _decrease(self, now: float, *, refused: bool) -> None:
        # One cut per round trip, as answers take now: the answers in flight saw the old bound.
        round_trip = (self._recent_ms or self._fastest_ms or 0.0) / 1000.0
        if now - self._last_decrease < max(round_trip, 0.001):
            return
        if refused:
            # Where the service said no is its capacity (slowness is no such mark: a busy
            # machine slows answers at any bound, and the bound grows back from the cut).
            if self._ceiling is not None and self._limit >= self._ceiling - 1:
                # refused again where it was refused before: probe less often
                self._hold = min(self._max_hold, self._hold * 2)
            self._ceiling = self._limit
        # Refused when leaving slow start, the bound overshot by up to half (it grows x1.5
        # per round trip): halve it, as TCP does; otherwise a gentle cut is enough.
        factor = 0.5 if self._slow_start and refused else self._backoff
        self._limit = max(float(self._minimum), self._limit * factor)
        self._slow_start = False
        self._last_decrease = now
        self.decreases += 1

    def _increase(self, now: float) -> None:
        before = self.limit
        if self._slow_start:
            step = 0.5  # x1.5 per round trip: a smaller overshoot than doubling
        else:
            step = 1.0 / self._limit
            ceiling = self._ceiling
            if ceiling is not None and self._limit >= ceiling - 1:
                if now - self._last_decrease < self._hold:
                    return  # just below where the service pushed back: stay a while
                step /= 10.0  # then probe gently
                if self._limit + step >= ceiling + 1:  # taken past it: capacity grew
                    self._ceiling = None
                    self._hold = self._base_hold
        self._limit = min(float(self._maximum), self._limit + step)
        if self.limit > before:
            self._grant()


Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """A token bucket: at most ``rate`` starts per second, bursts of up to ``burst``."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10.0)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._updated = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until one more request may start."""
        async with self._lock:  # first come, first served
            while True:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1.0 - 1e-9:  # a float hair short of a token is a token
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                await self._sleep((1.0 - self._tokens) / self.rate)
