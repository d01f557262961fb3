"""Pure retry decisions: send a failed request again? After how long?

No I/O and no clock of its own: the caller passes the attempt number, the failure and a
random source, so every decision is testable without a network or a sleep.

Two kinds of failure call for opposite answers. **Overload** (a 429; a 503 or any answer
carrying ``Retry-After``; a 504 or a timeout, which say the service got slow; many failures
together) says "fewer, later": the retry backs off from ``retry.backoff_initial``, doubling,
and the adaptive bound shrinks. A **random failure** (an isolated 503 or 500, a dropped
connection, an HTML 502 page from a gateway) says nothing about load: the same request sent
again at once usually gets through, so the retry waits about one of the service's round
trips (jittered, doubling if the same batch fails again), and the bound is left alone.
``FailureWindow`` tells "isolated" from "together": when more than a quarter of the latest
answers are such failures, they are overload too.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from batchrunner.errors import ErrorKind, RequestError, http_kind

# A Retry-After beyond this (retry.retry_after_max) is not honoured as-is: a service asking
# for an hour (or for a date in 2037) is broken, and a batch job must not sleep through the
# night on its word.
DEFAULT_RETRY_AFTER_MAX = 60.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter, at most ``max_attempts`` sends; a
    ``Retry-After`` is honoured up to ``retry_after_max`` seconds."""

    max_attempts: int = 5
    initial: float = 0.5
    maximum: float = 30.0
    retry_after_max: float = DEFAULT_RETRY_AFTER_MAX
    # Fewer sends for failures of these kinds: (kind, most sends) pairs. A language model's
    # reply that does not fit its JSON schema is sampled again only so often.
    attempts_by_kind: tuple[tuple[str, int], ...] = ()

    def delay(
        self,
        attempt: int,
        failure: RequestError,
        rng: random.Random,
        *,
        overload: bool | None = None,
        round_trip: float | None = None,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up.

        ``attempt`` counts from 1 (the attempt that just failed). Full jitter (a uniform
        draw up to the exponential cap) spreads retries of many requests that failed at
        once; a ``Retry-After`` from the service is a floor. ``overload`` (by default what
        ``is_overload`` says of the failure alone) starts the backoff at ``initial``; a
        random failure starts it at ``round_trip`` seconds (the service's usual answer time,
        at least ``QUICK_RETRY_MIN``, at most ``initial``; ``initial`` when not known yet).
        """
        limit = dict(self.attempts_by_kind).get(failure.kind, self.max_attempts)
        if failure.fatal or not failure.retryable or attempt >= min(limit, self.max_attempts):
            return None
        if overload is None:
            overload = is_overload(failure)
        start = self.initial
        if not overload and round_trip is not None:
            start = min(self.initial, max(QUICK_RETRY_MIN, round_trip))
        cap = min(self.maximum, start * 2 ** (attempt - 1))
        wait = rng.uniform(0.0, cap)
        if failure.retry_after is not None:
            wait = max(wait, min(failure.retry_after, self.retry_after_max))
        return wait


# A random failure is retried after at least this long (a jittered fraction of it): an
# answer faster than this is not a round trip to wait for.
QUICK_RETRY_MIN = 0.01
# Statuses that say the service is overloaded or slow, with or without Retry-After.
_OVERLOAD_STATUSES = frozenset({429, 504})


def is_overload(failure: RequestError) -> bool:
    """Whether ``failure`` alone says the service is overloaded: a 429, a 504, a timeout,
    or any answer carrying ``Retry-After`` (a 503 that says when to come back)."""
    return (
        failure.retry_after is not None
        or failure.http_status in _OVERLOAD_STATUSES
        or failure.kind == "timeout"
    )


class FailureWindow:
    """The latest answers (``size``), and how many of them were random-looking failures.

    ``crowded`` is true when more than a quarter of them (and at least ``size // 4 + 1``,
    so that two unlucky answers at the start are not a crowd) were: failures that come
    together are overload, whatever each looks like. ``round_trip`` is a moving average of
    the successful answers' latency, in seconds (None before the first).
    """

    def __init__(self, size: int = 32) -> None:
        self._latest: deque[bool] = deque(maxlen=size)
        self._size = size
        self._failures = 0
        self.round_trip: float | None = None

    def answered(self, latency_ms: float) -> None:
        """A successful answer, after ``latency_ms``."""
        self._push(False)
        seconds = latency_ms / 1000.0
        average = self.round_trip
        self.round_trip = seconds if average is None else average + (seconds - average) / 8

    def failed(self, failure: RequestError) -> None:
        """A failed request: only a retryable failure that is not overload by itself counts
        (a refused row is no sign of the service's health, a 429 is overload already)."""
        self._push(failure.retryable and not failure.fatal and not is_overload(failure))

    def _push(self, failed: bool) -> None:
        if len(self._latest) == self._size and self._latest[0]:
            self._failures -= 1
        self._latest.append(failed)
        self._failures += failed

    @property
    def crowded(self) -> bool:
        return self._failures * 4 > max(len(self._latest), self._size)

    def overload(self, failure: RequestError) -> bool:
        """Whether ``failure`` is to be answered as overload: by itself, or in a crowd."""
        return is_overload(failure) or self.crowded


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), else None.

    What is neither (``inf``, ``nan``, garbage) is None: the ordinary backoff applies.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):  # "inf", "nan": not delta-seconds
        return None
    return max(0.0, seconds)


#: Error kinds that say nothing against the rows themselves: a later run sends them again.
# "unreadable": a file that could not be read (gone, no permission, not a regular file) may
# have been mended since; reading it again costs no request if it has not.
_TRANSIENT_KINDS = frozenset(
    {
        ErrorKind.TIMEOUT,
        ErrorKind.CONNECTION,
        ErrorKind.NOT_JSON,
        ErrorKind.NOT_SENT,
        http_kind(429),
        ErrorKind.UNREADABLE,
    }
)


def is_transient_kind(kind: str | None) -> bool:
    """Whether error rows of ``kind`` are worth sending again in a later (resumed) run."""
    if kind is None:
        return False
    return kind in _TRANSIENT_KINDS or kind.startswith("http_5")
