"""Where credentials come from, how a refused token is renewed, and how secrets stay hidden.

A token, a password or an AppCode is read from an environment variable or a file, never
from the command line or the job file. It is held in a ``Secret`` whose ``repr``/``str``
are masked, so that it cannot reach a log line, an error message or an output file by
accident; only the client asks for ``reveal()``.

A ``TokenProvider`` hands out the token to send and, when the service refuses one, a
better one if there is any. ``RenewingToken`` makes renewal single-flight: however many
requests in flight are refused at once, the token is renewed once for all of them.
``FixedToken`` (an environment variable) has nothing better to offer; ``FileToken``
re-reads its file, so that an external refresher can replace the token under a running
job; the IAM login lives in ``iam``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from batchrunner.errors import AuthError, SettingError

MASK = "****"


class Secret:
    """A string that does not show itself: ``repr`` and ``str`` print a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of request headers fit to show: credentials replaced by the mask."""
    sensitive = {"x-auth-token", "x-subject-token", "authorization", "x-apig-appcode", "cookie"}
    return {k: (MASK if k.lower() in sensitive else v) for k, v in headers.items()}


class Scrubber:
    """Every secret a run holds, to take out of text that comes from elsewhere.

    A service or IAM may echo what it was sent (a token in an error body, a password in a
    login refusal): whatever reaches a log, an error row, a summary or an output passes
    through here first. The dispatcher adds each token it sends (renewed IAM tokens too).
    """

    __slots__ = ("_values",)

    def __init__(self, *secrets: Secret | None) -> None:
        self._values: dict[str, bytes] = {}
        for secret in secrets:
            self.add(secret)

    def add(self, secret: Secret | None) -> None:
        """Hold ``secret`` too (None and empty secrets are ignored)."""
        if secret is not None and secret.reveal() and secret.reveal() not in self._values:
            self._values[secret.reveal()] = secret.reveal().encode("utf-8")

    def text(self, text: str) -> str:
        """``text`` with every secret held replaced by the mask."""
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def body(self, body: bytes) -> bytes:
        """The bytes ``body`` with every secret held replaced by the mask (an answer is
        scrubbed before it is judged, so that no secret reaches a result or a snippet)."""
        for value in self._values.values():
            if value in body:
                body = body.replace(value, _MASK_BYTES)
        return body


_MASK_BYTES = MASK.encode("ascii")


def scrub(text: str, *secrets: Secret | None) -> str:
    """``text`` with every occurrence of the secrets replaced by the mask.

    For text that comes from elsewhere (an IAM error message) and is shown to the user:
    whatever a server chose to echo, our secrets are not shown.
    """
    for secret in secrets:
        if secret is not None and secret.reveal():
            text = text.replace(secret.reveal(), MASK)
    return text


# --- reading secrets -----------------------------------------------------------------------


def read_secret_env(name: str, setting: str, what: str, environ: Mapping[str, str]) -> Secret:
    """The secret in environment variable ``name``; missing or empty is a ``SettingError``.

    ``setting`` names the setting that points there, ``what`` the secret (for the message).
    """
    value = environ.get(name, "").strip()
    if not value:
        raise SettingError(
            f"{setting}: environment variable {name} is not set or empty; "
            f"export the {what} as {name}"
        )
    _check_printable(value, f"{setting}: environment variable {name}")
    return Secret(value)


def _check_printable(value: str, where: str) -> None:
    # A line break would end the HTTP header the secret goes in (aiohttp refuses it with a
    # ValueError mid-run): refused at load, naming where it is, never the value.
    bad = [c for c in value if c < " " or c == "\x7f"]
    if bad:
        names = {"\r": "a carriage return (CR)", "\n": "a line feed (LF)"}
        what = names.get(bad[0], f"a control character (U+{ord(bad[0]):04X})")
        raise SettingError(
            f"{where} holds {what} inside the secret; a secret must be one line of "
            "printable text: remove it"
        )


def read_secret_file(path: Path, setting: str) -> Secret:
    """The secret in the file ``path`` (surrounding whitespace ignored)."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingError(f"{setting}: {path} is not UTF-8 text") from None
    if not value:
        raise SettingError(f"{setting}: {path} is empty")
    _check_printable(value, f"{setting}: {path}")
    return Secret(value)


def read_token_file(path: Path) -> Secret:
    """Read a token file (surrounding whitespace ignored)."""
    return read_secret_file(path, "service.token_file")


def read_env_token(name: str, environ: Mapping[str, str] | None = None) -> Secret:
    """The token in environment variable ``name`` (``service.token_env``)."""
    env = os.environ if environ is None else environ
    return read_secret_env(name, "service.token_env", "service token", env)


# --- token providers -----------------------------------------------------------------------


class TokenProvider(Protocol):
    """Hands out the token to send, and a better one when the service refuses it."""

    async def current(self) -> Secret:
        """The token to send now (renewed first if it is about to expire)."""
        ...

    async def refresh(self, refused: Secret) -> Secret | None:
        """The service refused ``refused``: a token to retry with, or None if there is none.

        None means the refusal is final (the run stops). Raises ``ServiceError`` when
        renewal itself was refused (IAM refused the login), and a retryable
        ``RequestError`` when it could not be tried now (IAM unreachable).
        """
        ...


class RenewingToken:
    """A token that can be renewed, once per wave of refusals (single-flight).

    Subclasses say how a token is got (``_obtain``), renewed after a refusal (``_renew``),
    whether it should be renewed before use (``_expiring``) and whether it can still be
    sent meanwhile (``_still_valid``). Concurrent refusals of the same token share one
    renewal: the first caller renews, the others wait on the lock and then find the token
    already replaced. A token whose renewal found nothing better is remembered, so that
    later refusals of it do not try again. While a token is renewed ahead of its end,
    requests keep going with it: a login must not stall the whole run.
    """

    def __init__(self) -> None:
        self._token: Secret | None = None
        self._lock = asyncio.Lock()
        self._given_up: Secret | None = None

    async def current(self) -> Secret:
        token = self._token
        if token is not None and not self._expiring():
            return token
        if token is not None and self._lock.locked() and self._still_valid():
            return token  # another request is renewing it; until then it is still good
        async with self._lock:
            # Checked again: another request may have renewed it while this one waited.
            token = self._token
            if token is None or self._expiring():
                token = self._token = await self._obtain(token)
            return token

    async def refresh(self, refused: Secret) -> Secret | None:
        async with self._lock:
            if self._token is not None and self._token != refused:
                return self._token  # renewed already, by the first refusal of this wave
            if refused == self._given_up:
                return None
            renewed = await self._renew(refused)
            if renewed is None or renewed == refused:
                self._given_up = refused
                return None
            self._token = renewed
            return renewed

    def _expiring(self) -> bool:
        """Whether the token should be renewed before it is sent (never, by default)."""
        return False

    def _still_valid(self) -> bool:
        """Whether an expiring token may still be sent while it is renewed."""
        return True

    async def _obtain(self, stale: Secret | None) -> Secret:
        """The first token, or a new one when the current one is expiring."""
        raise NotImplementedError

    async def _renew(self, refused: Secret) -> Secret | None:
        """A token to replace ``refused``, or None if there is none."""
        raise NotImplementedError


class FixedToken(RenewingToken):
    """A token that cannot be renewed (``service.token_env``): a refusal is final."""

    def __init__(self, token: Secret) -> None:
        super().__init__()
        self._token = token

    async def _obtain(self, stale: Secret | None) -> Secret:
        assert self._token is not None  # set at construction, never cleared
        return self._token

    async def _renew(self, refused: Secret) -> Secret | None:
        return None


# A refresher that rewrites the token file in place (not by renaming a new file over it)
# leaves it empty or missing for a moment: read it again after these pauses (seconds).
REREAD_DELAYS = (0.01, 0.05, 0.2)


class FileToken(RenewingToken):
    """A token read from a file, and read again when the service refuses it.

    An external refresher (a cron job, a sidecar) may rewrite the file at any time; the
    run picks the new token up at the next refusal. If the file still holds the refused
    token, the refusal is final; if it stays missing or empty, too.
    """

    def __init__(
        self,
        path: Path,
        reread_delays: Sequence[float] = REREAD_DELAYS,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__()
        self.path = path
        self._token = read_token_file(path)  # a missing file is a SettingError at once
        self.first = self._token
        self._reread_delays = reread_delays
        self._sleep = sleep
        self.reads = 1

    async def _obtain(self, stale: Secret | None) -> Secret:
        assert self._token is not None
        return self._token

    async def _renew(self, refused: Secret) -> Secret | None:
        for delay in self._reread_delays:
            token = await self._read()
            if isinstance(token, Secret):
                return token
            await self._sleep(delay)
        token = await self._read()
        if isinstance(token, Secret):
            return token
        raise AuthError(f"the service refused the token, and {token}")

    async def _read(self) -> Secret | SettingError:
        self.reads += 1
        try:
            return await asyncio.to_thread(read_token_file, self.path)
        except SettingError as exc:
            return exc
