"""What steers a local run from outside while it goes: signals and their grace period, and
the progress reporter.

The first SIGINT or SIGTERM stops new requests; those in flight get ``batch.grace_period``
seconds to finish (then they are dropped); a second signal stops the run at once. Either
way the finished rows are kept, and re-running the same command resumes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from batchrunner.clock import Cancellable, Clock
from batchrunner.report import StatsSnapshot

log = logging.getLogger("batchrunner")


class Stopping:
    """A run's stop: by ``stop()`` or a signal (when ``handle_signals``), with a grace
    period of ``grace`` seconds (on ``clock``) for the requests in flight.

    ``event`` is set once the run stops taking new batches; ``in_flight()`` says how many
    requests are out (for the log); the request tasks to drop after the grace period are
    given with ``track``.
    """

    def __init__(
        self, clock: Clock, grace: float, in_flight: Callable[[], int], *, handle_signals: bool
    ) -> None:
        self.event = asyncio.Event()
        self._clock = clock
        self._grace = grace
        self._in_flight = in_flight
        self._handle_signals = handle_signals
        self.signals = 0  # signals received
        self._requests: set[asyncio.Task[None]] = set()
        self._main_task: asyncio.Task[Any] | None = None
        self._grace_timer: Cancellable | None = None

    def track(self, task: asyncio.Task[None]) -> None:
        """Drop ``task`` (a request) once the grace period is over, unless done by then."""
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    def stop(self) -> None:
        """Stop feeding new batches; requests in flight finish (see ``grace_period``)."""
        self.event.set()

    def install(self) -> None:
        """Handle SIGINT and SIGTERM for the running task (the pipeline's) from now on."""
        self._main_task = asyncio.current_task()
        if not self._handle_signals:
            return
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(number, self._on_signal, number)
            except (RuntimeError, ValueError):  # not the main thread: the caller handles them
                self._handle_signals = False
                return

    def remove(self) -> None:
        """Leave the signals to their earlier handlers, and the grace period's timer off."""
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for number in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(number)
        if self._grace_timer is not None:
            self._grace_timer.cancel()

    def _on_signal(self, number: int) -> None:
        self.signals += 1
        name = signal.Signals(number).name
        if self.signals > 1:
            log.warning("%s again: stopping at once", name)
            if self._main_task is not None:
                self._main_task.cancel()
            return
        log.warning(
            "%s: no new requests; %d in flight get %.0f s to finish (signal again to stop now)",
            name, self._in_flight(), self._grace,
        )  # fmt: skip
        # Batches waiting to retry (however long a Retry-After asked) or for a slot are not
        # in flight: they stop at once, and with nothing in flight so does the run.
        self.stop()
        self._grace_timer = self._clock.call_later(self._grace, self._drop_requests)

    def _drop_requests(self) -> None:
        for task in self._requests:
            task.cancel()


async def report_progress(
    clock: Clock,
    interval: float,
    snapshot: Callable[[], StatsSnapshot],
    on_progress: Callable[[StatsSnapshot], None],
) -> None:
    """Give ``on_progress`` the run's snapshot every ``interval`` seconds, until cancelled."""
    while True:
        await clock.sleep(interval)
        on_progress(snapshot())
