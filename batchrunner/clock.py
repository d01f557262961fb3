"""Time as a run sees it: one object, made at the top and passed down.

The pipeline's backoffs and retry waits, the unreachable timer, the progress reporter, the
grace period after a signal, the rate limiter and token renewal (a token file read again,
an IAM token's end) all ask the run's ``Clock``, never the ``time`` module or the event
loop directly; so a test runs them on a fake clock, with no wall-clock threshold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Clock:
    """The system's time: ``now`` is monotonic (durations, deadlines), ``wall`` is the time
    of day (what an IAM token's ``expires_at`` is measured against)."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Cancellable:
        """Call ``callback`` in ``seconds``, on the running event loop."""
        return asyncio.get_running_loop().call_later(seconds, callback)


SYSTEM_CLOCK = Clock()
