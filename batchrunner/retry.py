"""Pure retry decisions: send a failed request again? After how long?

No I/O and no clock of its own: the caller passes the attempt number, the failure and a
random source, so every decision is testable without a network or a sleep.
"""

from __future__ import annotations

import math
import random
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

    def delay(self, attempt: int, failure: RequestError, rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up.

        ``attempt`` counts from 1 (the attempt that just failed). Full jitter (a uniform
        draw up to the exponential cap) spreads retries of many requests that failed at
        once; a ``Retry-After`` from the service is a floor.
        """
        limit = dict(self.attempts_by_kind).get(failure.kind, self.max_attempts)
        if failure.fatal or not failure.retryable or attempt >= min(limit, self.max_attempts):
            return None
        cap = min(self.maximum, self.initial * 2 ** (attempt - 1))
        wait = rng.uniform(0.0, cap)
        if failure.retry_after is not None:
            wait = max(wait, min(failure.retry_after, self.retry_after_max))
        return wait


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
