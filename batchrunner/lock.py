"""One run per job at a time: an exclusive ``flock`` on a lock file beside the job's state.

The kernel drops the lock when its process dies, however it dies, so a lock left by a
crashed run never blocks the next one. The file holds the holder's pid, for the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from batchrunner.errors import LockedError


class JobLock:
    """Hold with ``with JobLock(path, job_name):``; raises ``LockedError`` if held elsewhere."""

    def __init__(self, path: Path, job_name: str) -> None:
        self.path = path
        self.job_name = job_name
        self._descriptor: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise LockedError(
                f"another run of job {self.job_name!r} is going on (pid {holder}, lock "
                f"{self.path}); wait for it to end, or stop it and re-run to resume"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor

    def release(self) -> None:
        # The file stays: deleting a lock file while others may open it is a race.
        if self._descriptor is not None:
            os.ftruncate(self._descriptor, 0)
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
