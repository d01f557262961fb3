"""The tokens language model requests spend: the limits OpenAI-compatible servers impose.

A ``TokenMeter`` stands between a request and the wire (``dispatch`` asks it before each
send, and tells it what each answer said):

- ``rate_limit``: requests a minute, a token bucket (bursts of up to a second's worth);
- ``token_rate_limit``: tokens a minute, a bucket of up to a minute's worth. Before a
  request is sent, its tokens are *estimated* (the prompt's length, and the most the answer
  may take); once the answer's ``usage`` says how many it took, the bucket is corrected by
  the difference;
- the server's own ``x-ratelimit-remaining-requests``/``-tokens`` and
  ``x-ratelimit-reset-requests``/``-tokens`` headers: when the server says none are left
  (or fewer tokens than a request would take), no request starts until its reset;
- ``max_total_tokens``: a budget. A request whose estimate, added to the tokens spent and
  those of the requests in flight, would go over it is not sent: the meter raises
  ``BudgetReached`` and the run stops once the requests in flight are done (exit 3, the
  finished rows kept, a re-run resumes). The tokens a stopped run spent are kept in its
  state folder (``tokens.json``): they count against the budget of the run that resumes it.

Its clock and sleep are injected: tests run its waits instantly.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

from batchrunner.errors import ServiceError
from batchrunner.job.service import OPENAI_PROTOCOLS, OpenAISettings
from batchrunner.job.settings import Job
from batchrunner.limiter import RateLimiter

Sleep = Callable[[float], Awaitable[None]]
SECONDS_PER_MINUTE = 60.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
SPENT_FILE = "tokens.json"  # in a kept run state: the tokens its runs spent


class BudgetReached(ServiceError):
    """The next request would take the run over ``service.openai.max_total_tokens``."""


def parse_reset(value: str | None) -> float | None:
    """Seconds from an ``x-ratelimit-reset-*`` header: OpenAI's ``1m30s``, ``6s``,
    ``250ms`` (or a plain number of seconds); None when it is neither."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            return None
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        seconds = sum(float(number) * scale[unit] for number, unit in parts)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _count(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclass(slots=True)
class TokenCounts:
    """Tokens the answers said their requests took (prompt: in; completion: out)."""

    prompt: int = 0
    completion: int = 0


class TokenMeter:
    """Rate limits in requests and tokens a minute, the server's word, and a budget."""

    def __init__(
        self,
        *,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_total_tokens: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        spent: TokenCounts | None = None,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._requests = (
            RateLimiter(requests_per_minute / SECONDS_PER_MINUTE, clock=clock, sleep=sleep)
            if requests_per_minute
            else None
        )
        self._tokens_per_second = (tokens_per_minute or 0.0) / SECONDS_PER_MINUTE
        self._bucket_size = float(tokens_per_minute or 0.0)
        self._bucket = self._bucket_size
        self._updated = clock()
        self.max_total_tokens = max_total_tokens
        # Tokens the answers counted: of earlier runs of an unfinished run, then this one's.
        self.spent = TokenCounts(spent.prompt, spent.completion) if spent else TokenCounts()
        self.reserved = 0  # estimates of the requests in flight
        self.exhausted: BudgetReached | None = None
        self._lock = asyncio.Lock()
        # What the server said last: requests and tokens left until when (our clock).
        self._server_requests: int | None = None
        self._server_tokens: int | None = None
        self._server_requests_reset = 0.0
        self._server_tokens_reset = 0.0
        self.waited_s = 0.0  # time spent waiting on the limits

    @property
    def total(self) -> int:
        return self.spent.prompt + self.spent.completion

    async def reserve(self, estimate: int) -> None:
        """Wait until a request of ``estimate`` tokens may start; raise ``BudgetReached``
        when it would take the run over its budget."""
        async with self._lock:  # first come, first served
            budget = self.max_total_tokens
            if self.exhausted is not None:
                raise BudgetReached(str(self.exhausted))
            if budget is not None and self.total + self.reserved + estimate > budget:
                self.exhausted = BudgetReached(
                    f"the token budget is reached: {self.total:,} tokens spent (by this run and "
                    f"the runs it resumes) and "
                    f"{self.reserved:,} in flight, and the next request may take {estimate:,} "
                    f"more, over service.openai.max_total_tokens ({budget:,}); the finished rows "
                    "are kept: raise the budget and re-run the same command to resume"
                )
                raise BudgetReached(str(self.exhausted))
            self.reserved += estimate
            try:
                await self._wait_for_server(estimate)
                if self._requests is not None:
                    await self._requests.acquire()
                await self._take_tokens(estimate)
            except BaseException:
                self.reserved -= estimate
                raise

    def settle(
        self, estimate: int, prompt: int | None, completion: int | None, headers: Mapping[str, str]
    ) -> None:
        """A request reserved with ``estimate`` is answered: count the tokens it took
        (None: the answer did not say, or it failed) and read the server's headers."""
        self.reserved -= estimate
        if prompt is not None:
            self.spent.prompt += prompt
            self.spent.completion += completion or 0
            if self._bucket_size:  # correct the estimate by what was really taken
                self._refill()
                self._bucket = min(
                    self._bucket_size, self._bucket + estimate - prompt - (completion or 0)
                )
        self._read_headers(headers)

    def _read_headers(self, headers: Mapping[str, str]) -> None:
        now = self._clock()
        requests = _count(headers.get("x-ratelimit-remaining-requests"))
        if requests is not None:
            self._server_requests = requests
            reset = parse_reset(headers.get("x-ratelimit-reset-requests"))
            self._server_requests_reset = now + (reset if reset is not None else 1.0)
        tokens = _count(headers.get("x-ratelimit-remaining-tokens"))
        if tokens is not None:
            self._server_tokens = tokens
            reset = parse_reset(headers.get("x-ratelimit-reset-tokens"))
            self._server_tokens_reset = now + (reset if reset is not None else 1.0)

    async def _wait_for_server(self, estimate: int) -> None:
        now = self._clock()
        wait = 0.0
        if self._server_requests is not None and self._server_requests <= 0:
            wait = max(wait, self._server_requests_reset - now)
        if self._server_tokens is not None and self._server_tokens < estimate:
            wait = max(wait, self._server_tokens_reset - now)
        if wait > 0:
            self.waited_s += wait
            await self._sleep(wait)
            # The window has reset: the next answer says what is left.
            self._server_requests = self._server_tokens = None
        else:  # counted down until the next answer says again
            if self._server_requests is not None:
                self._server_requests -= 1
            if self._server_tokens is not None:
                self._server_tokens -= estimate

    def _refill(self) -> None:
        now = self._clock()
        self._bucket = min(
            self._bucket_size, self._bucket + (now - self._updated) * self._tokens_per_second
        )
        self._updated = now

    async def _take_tokens(self, estimate: int) -> None:
        if not self._bucket_size:
            return
        # A request larger than the bucket waits for a full bucket, then goes (into debt).
        need = min(float(estimate), self._bucket_size)
        while True:
            self._refill()
            if self._bucket >= need - 1e-9:
                self._bucket -= estimate
                return
            wait = (need - self._bucket) / self._tokens_per_second
            self.waited_s += wait
            await self._sleep(wait)


def token_meter(
    job: Job,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    spent: TokenCounts | None = None,
) -> TokenMeter | None:
    """The token meter of a language model job (its limits and budget), else None;
    ``spent``: the tokens earlier runs of an unfinished run spent."""
    if job.service.protocol not in OPENAI_PROTOCOLS:
        return None
    settings = job.service.openai or OpenAISettings()
    return TokenMeter(
        requests_per_minute=settings.rate_limit,
        tokens_per_minute=settings.token_rate_limit,
        max_total_tokens=settings.max_total_tokens,
        clock=clock,
        sleep=sleep,
        spent=spent,
    )


def read_spent(state: Path) -> TokenCounts | None:
    """The tokens earlier runs kept in the state folder ``state`` spent, if they said."""
    try:
        document = orjson.loads((state / SPENT_FILE).read_bytes())
        return TokenCounts(int(document["prompt"]), int(document["completion"]))
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def write_spent(state: Path, spent: TokenCounts) -> None:
    """Keep the tokens spent so far in the state folder, for a resumed run's budget."""
    path = state / SPENT_FILE
    aside = path.with_name(path.name + ".tmp")
    aside.write_bytes(orjson.dumps({"prompt": spent.prompt, "completion": spent.completion}))
    aside.replace(path)
