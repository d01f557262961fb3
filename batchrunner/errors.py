"""The one tree of errors batchrunner raises.

Library code raises these; only ``cli.py`` turns them into a message and an exit code.
Every message says what failed, where (setting, file, line, column, key), and what to do.

    BatchRunnerError                  base of everything we raise on purpose
    ├── JobError                      the job is invalid: exit 2, nothing was sent
    │   ├── SettingError              a setting is unknown, mistyped or out of range
    │   ├── InputError                the input is missing, unreadable or lacks a column
    │   └── StateError                what earlier runs left (remembered items, an unfinished
    │                                 run's rows) cannot be read back or used as asked
    ├── RequestError                  one request failed; its rows become error rows
    ├── ServiceError                  the service answered in a way that stops the whole run
    │   └── AuthError                 no token the service accepts (401/403), or IAM refused
    │                                 the login: exit 3
    ├── CoverageError                 the output would lose or double an input item; not committed
    ├── DataError                     the input turned out bad after requests went out (a
    │                                 line too long, a bad row past the first block): exit 65,
    │                                 what is finished is kept, a re-run resumes
    ├── WriteError                    a local write failed mid-run (disk full, folder gone):
    │                                 exit 74, what is finished is kept, a re-run resumes
    ├── LockedError                   another run of this job holds its lock: exit 75
    ├── RunInterrupted                stopped by a signal; the state is kept: exit 130
    ├── ScheduleError                 a cron line cannot be made (bad schedule, no env file): exit 2
    └── CrontabError                  the crontab command is missing or refused the table: exit 1

A ``RequestError`` (a 5xx, a timeout, a malformed response) never escapes the runner: it is
retried or becomes the error rows of its batch (see ``retry``).

``ExitCode`` holds the command line's exit codes (each error class says its own), and
``ErrorKind`` the names of why a request failed, as error rows, summaries and metrics show
them.

Two helpers write the parts messages share: ``did_you_mean`` (a close name, for typos in
settings, columns and paths) and ``clip`` (a long value shortened for a message).
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable


class ExitCode(enum.IntEnum):
    """The command line's exit codes, defined here once (the README's table says the same)."""

    OK = 0  # done: error rows, if any, within max_error_rate
    TOO_MANY_ERRORS = 1  # the output is written, over max_error_rate (or another failure)
    INVALID = 2  # the job, its input or its settings are invalid: nothing was sent
    ABORTED = 3  # the service stopped the run (token refused, unreachable): re-run resumes
    DATA = 65  # the input turned out bad mid-run (EX_DATAERR): re-run resumes
    WRITE = 74  # a local write failed mid-run (EX_IOERR): re-run resumes
    LOCKED = 75  # another run of the job holds its lock (EX_TEMPFAIL): nothing was done
    INTERRUPTED = 130  # SIGINT/SIGTERM: the state is kept, re-run resumes


class ErrorKind(enum.StrEnum):
    """Why a request or an item failed: a short stable name in error rows (``_error_kind``),
    summaries, metrics and retry decisions. An HTTP status without a kind of its own is
    ``http_<status>`` (``http_kind``)."""

    TIMEOUT = "timeout"  # no answer in service.timeout
    CONNECTION = "connection"  # refused, reset, or cut off mid-answer
    TLS = "tls"  # the certificate was refused
    AUTH = "auth"  # the token was refused (401/403)
    IAM_LOGIN = "iam_login"  # IAM could not log in now
    REDIRECT = "redirect"  # the service answered with a redirect, never followed
    NOT_JSON = "not_json"  # an answer that is not JSON (an HTML error page)
    BAD_RESPONSE = "bad_response"  # JSON, but not the answer the protocol expects
    RESPONSE_TOO_LARGE = "response_too_large"  # over service.max_response_bytes
    REQUEST_TOO_LARGE = "request_too_large"  # over batch.max_request_bytes: never sent
    REQUEST_UNFIT = "request_unfit"  # the rows cannot be put in the protocol's request
    MISSING_VALUE = "missing_value"  # a null where the model needs a value
    MODEL_ERROR = "model_error"  # the model's code failed on the request
    UNREADABLE = "unreadable"  # a file that could not be read (gone, no permission)
    NOT_SENT = "not_sent"  # a stopped run did not send it; a later run does
    TOKEN_RENEWED = "token_renewed"  # a retry reason: sent again with a renewed token


def http_kind(status: int) -> str:
    """The kind of an HTTP status that has none of its own: ``http_503``."""
    return f"http_{status}"


class BatchRunnerError(Exception):
    """Base class of every error batchrunner raises on purpose."""

    exit_code: int = ExitCode.TOO_MANY_ERRORS


class JobError(BatchRunnerError):
    """The job (settings or input) is invalid; raised before any request is sent."""

    exit_code = ExitCode.INVALID


class SettingError(JobError):
    """A job setting is unknown, of the wrong type, or out of range."""


class InputError(JobError):
    """The input is missing or unreadable, or lacks a column the job asks for."""


class StateError(JobError):
    """What earlier runs left to go on from (``input.incremental``'s remembered items, an
    unfinished run's finished rows) cannot be read, or would be discarded by a changed
    setting; raised before any request is sent, rather than sending everything again."""


class RequestError(BatchRunnerError):
    """One request failed: raised by the client and the protocol codec, caught by the runner.

    ``kind`` is a short stable name for summaries (``http_503``, ``timeout``, ``bad_response``);
    ``retryable`` says whether sending the same request again may succeed; ``retry_after`` is
    the wait the service asked for, in seconds, if it asked; ``fatal`` means no request can
    succeed (the token is refused) and the run stops; ``row_specific`` means one row of the
    request may be to blame (a model error, a 400, a ``resp_data`` of the wrong length), so
    the request is worth splitting to isolate it.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        retryable: bool,
        fatal: bool = False,
        row_specific: bool = False,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = str(kind)  # an ErrorKind's text: kinds are keys of counts written as JSON
        self.retryable = retryable
        self.fatal = fatal
        self.row_specific = row_specific
        self.http_status = http_status
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        return str(self.args[0])


class ServiceError(BatchRunnerError):
    """The service answered in a way that makes going on pointless (raised mid-run)."""

    exit_code = ExitCode.ABORTED


class AuthError(ServiceError):
    """The service refused the token (HTTP 401 or 403) and no better one could be had, or
    IAM refused the login that would give one."""


class CoverageError(BatchRunnerError):
    """Committing would lose or double input items; the output is not written."""

    exit_code = ExitCode.TOO_MANY_ERRORS


class DataError(BatchRunnerError):
    """The input turned out bad after the run had started sending it (a line longer than
    ``input.block_size``, a malformed row or bad text past the first block): the run stops,
    keeping what is finished; fixing the input (or the setting named) and re-running resumes.
    Exit 65 (``EX_DATAERR``)."""

    exit_code = ExitCode.DATA


class WriteError(BatchRunnerError):
    """Writing the journal, the output or the summary failed (the disk is full, a folder was
    removed or became read-only); the run stops, keeping what is finished for a re-run.
    Exit 74 (``EX_IOERR``)."""

    exit_code = ExitCode.WRITE


class LockedError(BatchRunnerError):
    """Another run of the same job holds its lock."""

    exit_code = ExitCode.LOCKED


class RunInterrupted(BatchRunnerError):
    """The run was stopped by SIGINT/SIGTERM; finished batches are kept for the next run."""

    exit_code = ExitCode.INTERRUPTED


# -- writing messages -------------------------------------------------------------------


def closest_name(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``name`` was most likely meant to be, or None when none is close.

    One that differs only in case wins; else the closest spelling (``difflib``, similarity
    0.6 or more).
    """
    names = list(candidates)
    folded = {candidate.casefold(): candidate for candidate in names}
    if name.casefold() in folded:
        return folded[name.casefold()]
    close = difflib.get_close_matches(name, names, n=1)
    return close[0] if close else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the candidate closest to ``name``, or ``""``."""
    close = closest_name(name, candidates)
    return "" if close is None else f" (did you mean {close!r}?)"


def clip(text: str, limit: int = 80) -> str:
    """``text``, cut to ``limit`` characters with ``...`` when longer (a value in a message)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ScheduleError(BatchRunnerError):
    """``batchrunner cron`` cannot make a line: the schedule is malformed, the env file is
    missing, or a path cannot be written into a crontab."""

    exit_code = ExitCode.INVALID


class CrontabError(BatchRunnerError):
    """The ``crontab`` command is missing, or failed to read or install the table."""

    exit_code = ExitCode.TOO_MANY_ERRORS
