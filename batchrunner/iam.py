"""The IAM token source: log in with a user's password, cache the token, renew it in time.

The login is the documented one (``PROTOCOL.md``, "Getting a token (IAM)"): a password
identity scoped to a project, answered by HTTP 201 with the token in ``X-Subject-Token`` and
its end in the body's ``token.expires_at``. ``login_body`` builds the request and
``read_login_answer`` judges the answer, both pure; ``client.login`` sends it.

Tokens are cached in a file readable only by the user (``TokenCache``), one per IAM
endpoint, domain, user and project, and reused across runs until shortly before they end:
a nightly job logs in once a day, not once a run. ``IamToken`` renews the token before it
expires, and again when the service refuses it (once per wave of refusals; see
``auth.RenewingToken``). A login IAM refuses is an ``AuthError`` (exit 3) carrying IAM's
message; the password never appears in any message.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batchrunner.auth import RenewingToken, Secret, scrub
from batchrunner.client import LoginAnswer
from batchrunner.errors import AuthError, ErrorKind, RequestError, ServiceError
from batchrunner.job.service import IamSettings

log = logging.getLogger("batchrunner")

Login = Callable[[str, Secret], Awaitable[LoginAnswer]]
Clock = Callable[[], float]

CACHE_FOLDER = "batchrunner"
_PRIVATE_FOLDER = 0o700


def login_body(settings: IamSettings, password: Secret) -> Secret:
    """The JSON body of a password login scoped to the project (it holds the password)."""
    document = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": settings.user,
                        "password": password.reveal(),
                        "domain": {"name": settings.domain},
                    }
                },
            },
            "scope": {"project": {"name": settings.project}},
        }
    }
    return Secret(orjson.dumps(document).decode("utf-8"))


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token IAM issued: when it was got and when it ends (seconds since the epoch)."""

    token: Secret
    expires_at: float
    obtained_at: float

    def renew_at(self, renew_before: float) -> float:
        """When to renew: ``renew_before`` seconds before the end, but not before half of
        the token's life, so that a short-lived token is not renewed at every request."""
        halfway = self.obtained_at + (self.expires_at - self.obtained_at) / 2
        return max(self.expires_at - renew_before, halfway)


def read_login_answer(
    answer: LoginAnswer, settings: IamSettings, password: Secret, *, now: float
) -> IssuedToken:
    """The token of a successful login; otherwise the error that says why there is none.

    2xx without a token or an end date: ``ServiceError`` (not an IAM token endpoint).
    429 and 5xx: a retryable ``RequestError``. Any other status: IAM refused the login,
    an ``AuthError`` with IAM's own message.
    """
    where = f"IAM at {settings.url}"
    if 200 <= answer.status < 300:
        if answer.subject_token is None:
            raise ServiceError(
                f"{where} answered HTTP {answer.status} without an X-Subject-Token header; "
                "check that service.iam.url is the token endpoint (.../v3/auth/tokens)"
            )
        expires_at = _expires_at(answer.body)
        if expires_at is None:
            raise ServiceError(
                f"{where} answered HTTP {answer.status} without a valid token.expires_at; "
                "check that service.iam.url is the token endpoint (.../v3/auth/tokens)"
            )
        if expires_at <= now:
            raise ServiceError(
                f"{where} issued a token that ended at {_when(expires_at)}, before now by "
                "this machine's clock; check the clock"
            )
        return IssuedToken(answer.subject_token, expires_at, now)
    detail = scrub(_error_message(answer.body), password)
    text = f"HTTP {answer.status}" + (f": {detail}" if detail else "")
    if answer.status == 429 or answer.status >= 500:
        raise RequestError(
            f"{where} could not log in now ({text})", kind=ErrorKind.IAM_LOGIN, retryable=True
        )
    raise AuthError(
        f"{where} refused the login of user {settings.user!r} (domain {settings.domain!r}, "
        f"project {settings.project!r}): {text}; check service.iam.user, service.iam.domain "
        f"and service.iam.project, and the password in {password_source(settings)}"
    )


def password_source(settings: IamSettings) -> str:
    """Where the password is read from, for messages: ``$NAME`` or the file's path."""
    if settings.password_env is not None:
        return f"${settings.password_env}"
    return str(settings.password_file)


def _expires_at(body: bytes) -> float | None:
    try:
        document = orjson.loads(body)
        text = document["token"]["expires_at"]
        when = datetime.fromisoformat(text)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # IAM writes UTC ("...Z"); be lenient without it
    return when.timestamp()


def _error_message(body: bytes) -> str:
    """IAM's message: gateway style ``error_msg``/``error_code``, Keystone style
    ``{"error": {"message": ...}}``, or the words of an HTML page."""
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        words = " ".join(re.sub(r"<[^>]*>", " ", body.decode("utf-8", "replace")).split())
        return words if len(words) <= 200 else words[:197] + "..."
    if isinstance(document, dict):
        nested = document.get("error")
        if isinstance(nested, dict):
            document = nested
        message = document.get("error_msg") or document.get("message") or ""
        code = document.get("error_code")
        return f"{code}: {message}" if code and message else str(message or code or "")
    return ""


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


# --- the cache -----------------------------------------------------------------------------


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/batchrunner``, else ``~/.cache/batchrunner``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME", "")
    # The XDG spec ignores a relative path: it would put tokens in the working folder.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / CACHE_FOLDER


class TokenCache:
    """One IAM token in a file only its user can read, shared by every run of that user.

    The file is named by a hash of (endpoint, domain, user, project) and also holds those,
    so a token is never used for another account. It is written whole with mode 0600 from
    the start (a temporary file renamed into place). A cache that cannot be read or written
    costs a login, never the run.
    """

    def __init__(self, folder: Path, settings: IamSettings) -> None:
        self._identity = {
            "url": settings.url,
            "domain": settings.domain,
            "user": settings.user,
            "project": settings.project,
        }
        key = hashlib.sha256(orjson.dumps(self._identity, option=orjson.OPT_SORT_KEYS))
        self.path = folder / f"iam-token-{key.hexdigest()[:24]}.json"

    def load(self) -> IssuedToken | None:
        """The cached token, or None if there is none fit to use."""
        try:
            stat = self.path.stat()
            if stat.st_uid != os.getuid():
                log.warning(
                    "ignoring the IAM token cache %s: it belongs to another user", self.path
                )
                return None
            if stat.st_mode & 0o077:
                # Someone may have read the token: do not use it; the next login replaces it.
                log.warning(
                    "ignoring the IAM token cache %s: it is readable by others "
                    "(mode %o); it will be replaced",
                    self.path, stat.st_mode & 0o777,
                )  # fmt: skip
                return None
            document = orjson.loads(self.path.read_bytes())
            if document.get("identity") != self._identity:
                return None
            return IssuedToken(
                Secret(str(document["token"])),
                float(document["expires_at"]),
                float(document["obtained_at"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.warning("ignoring the IAM token cache %s: it cannot be read", self.path)
            return None

    def store(self, issued: IssuedToken) -> None:
        """Write ``issued`` atomically, readable only by the user."""
        document = {
            "identity": self._identity,
            "token": issued.token.reveal(),
            "expires_at": issued.expires_at,
            "obtained_at": issued.obtained_at,
        }
        folder = self.path.parent
        try:
            folder.mkdir(mode=_PRIVATE_FOLDER, parents=True, exist_ok=True)
            # mkstemp creates the file with mode 0600 and O_EXCL: never readable by others,
            # not even for a moment, whatever the umask.
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=".iam-token-", suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(orjson.dumps(document))
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning(
                "cannot cache the IAM token in %s (%s): the next run will log in again",
                self.path, exc.strerror,
            )  # fmt: skip


# --- the token source ----------------------------------------------------------------------


class IamToken(RenewingToken):
    """Tokens from IAM logins: cached, renewed before they end and after a refusal.

    ``login`` sends a login body to the IAM URL (``client.login`` with the run's TLS
    settings); ``clock`` is the wall clock, which IAM's ``expires_at`` is measured against.
    ``logins`` counts the logins sent, ``cache_hits`` the tokens taken from the cache.
    """

    def __init__(
        self,
        settings: IamSettings,
        password: Secret,
        *,
        login: Login,
        cache: TokenCache | None,
        clock: Clock = time.time,
    ) -> None:
        super().__init__()
        self._settings = settings
        self._password = password
        self._login = login
        self._cache = cache
        self._clock = clock
        self._issued: IssuedToken | None = None
        self.logins = 0
        self.cache_hits = 0

    def __repr__(self) -> str:
        return f"<IamToken user={self._settings.user!r} project={self._settings.project!r}>"

    def _expiring(self) -> bool:
        issued = self._issued
        return issued is None or self._clock() >= issued.renew_at(self._settings.renew_before)

    def _still_valid(self) -> bool:
        return self._issued is not None and self._clock() < self._issued.expires_at

    async def _obtain(self, stale: Secret | None) -> Secret:
        return await self._from_cache(refused=stale) or await self._log_in()

    async def _renew(self, refused: Secret) -> Secret | None:
        # Another run of this user may have logged in since: its token is as good as ours.
        return await self._from_cache(refused=refused) or await self._log_in()

    async def _from_cache(self, refused: Secret | None) -> Secret | None:
        # File I/O in a worker thread: a home folder may be on a slow network mount.
        issued = await asyncio.to_thread(self._cache.load) if self._cache is not None else None
        if issued is None or issued.token == refused:
            return None
        if self._clock() >= issued.renew_at(self._settings.renew_before):
            return None
        self._issued = issued
        self.cache_hits += 1
        log.info(
            "IAM: using the cached token of user %s (project %s), valid until %s",
            self._settings.user, self._settings.project, _when(issued.expires_at),
        )  # fmt: skip
        return issued.token

    async def _log_in(self) -> Secret:
        settings = self._settings
        now = self._clock()
        self.logins += 1
        answer = await self._login(settings.url, login_body(settings, self._password))
        issued = read_login_answer(answer, settings, self._password, now=now)
        self._issued = issued
        log.info(
            "IAM: logged in as user %s (domain %s, project %s); the token is valid until %s",
            settings.user, settings.domain, settings.project, _when(issued.expires_at),
        )  # fmt: skip
        if self._cache is not None:
            await asyncio.to_thread(self._cache.store, issued)
        return issued.token
