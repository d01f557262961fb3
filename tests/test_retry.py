from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from batchrunner.errors import RequestError
from batchrunner.retry import DEFAULT_RETRY_AFTER_MAX, RetryPolicy, parse_retry_after


def failure(
    retryable: bool = True, retry_after: float | None = None, fatal: bool = False
) -> RequestError:
    return RequestError(
        "x", kind="http_503", retryable=retryable, retry_after=retry_after, fatal=fatal
    )


def test_backoff_grows_exponentially_within_cap() -> None:
    policy = RetryPolicy(max_attempts=10, initial=1.0, maximum=5.0)
    rng = random.Random(1)
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        delays = [policy.delay(attempt, failure(), rng) for _ in range(200)]
        assert all(d is not None and 0 <= d <= cap for d in delays)
        assert max(d for d in delays if d is not None) > cap * 0.8  # full jitter reaches the cap


def test_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    rng = random.Random(0)
    assert policy.delay(2, failure(), rng) is not None
    assert policy.delay(3, failure(), rng) is None


def test_not_retryable_and_fatal_give_up_at_once() -> None:
    policy = RetryPolicy(max_attempts=5)
    rng = random.Random(0)
    assert policy.delay(1, failure(retryable=False), rng) is None
    assert policy.delay(1, failure(fatal=True), rng) is None


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(max_attempts=5, initial=0.1, maximum=0.2)
    assert policy.delay(1, failure(retry_after=7.0), random.Random(0)) == 7.0


def test_absurd_retry_after_is_capped() -> None:
    policy = RetryPolicy(max_attempts=5)
    assert (
        policy.delay(1, failure(retry_after=86400.0), random.Random(0)) == DEFAULT_RETRY_AFTER_MAX
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        (" 0.25 ", 0.25),
        ("-4", 0.0),
        ("Fri, 27 Nov 2026 08:00:10 GMT", 10.0),
        ("Fri, 27 Nov 2026 07:59:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2026, 11, 27, 8, 0, 0, tzinfo=UTC)
    assert parse_retry_after(header, now) == expected


def test_a_retry_after_that_is_no_number_is_ignored_and_a_huge_one_bounded() -> None:
    assert parse_retry_after("inf") is None
    assert parse_retry_after("-inf") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("1e308") == 1e308
    far = parse_retry_after("Thu, 01 Jan 2037 00:00:00 GMT")
    assert far is not None and far > 10 * 365 * 86400
    policy = RetryPolicy(max_attempts=5, initial=0.5, maximum=2.0, retry_after_max=7.0)
    for seconds in (1e308, far, 8.0):
        assert policy.delay(1, failure(retry_after=seconds), random.Random(0)) == 7.0
    assert policy.delay(1, failure(retry_after=3.0), random.Random(0)) == 3.0
