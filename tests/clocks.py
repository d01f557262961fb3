"""A fake of the run's clock (``batchrunner.clock.Clock``) for tests: time moves only when
the run sleeps, at once, so backoffs, timers and deadlines are tested without waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Timer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Each ``sleep`` moves time forward by its length at once (and lets other tasks run);
    timers set with ``call_later`` fire when time passes them. ``slept`` lists the sleeps."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self.time = start
        self.wall_offset = wall_offset
        self.slept: list[float] = []
        self._timers: list[_Timer] = []

    def now(self) -> float:
        return self.time

    def wall(self) -> float:
        return self.wall_offset + self.time

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.time += max(seconds, 0.0)
        due = sorted((t for t in self._timers if t.when <= self.time), key=lambda t: t.when)
        for timer in due:
            self._timers.remove(timer)
            if not timer.cancelled:
                timer.callback()

    def call_later(self, seconds: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self.time + seconds, callback)
        self._timers.append(timer)
        return timer
