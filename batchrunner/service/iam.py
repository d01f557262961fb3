"""The embedded service's IAM: one account, the password login, tokens that expire.

``parse_login`` reads the documented login request (``PROTOCOL.md``, "Getting a token");
``TokenRegistry`` issues tokens with a time to live and tells the inference routes whether
a given token is good, expired or unknown. The HTTP side is in ``handlers`` (the login
route) and ``gateway`` (the token check, the errors).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

# An expired token is remembered this long, to answer "token expires" rather than "not
# valid"; after that it is forgotten, so that a long-running service does not grow.
_EXPIRED_KEPT_S = 3600.0


@dataclass(frozen=True, slots=True)
class IamAccount:
    """The one account the embedded IAM knows (the password never shows in ``repr``)."""

    user: str
    password: str = field(repr=False)
    domain: str
    project: str


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """What a password login asks for."""

    user: str
    password: str = field(repr=False)
    domain: str
    project: str | None


def parse_login(raw: bytes) -> LoginRequest:
    """The fields of a password login body; ``ValueError`` saying what is wrong otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("The request body is not valid JSON") from None
    identity = _dig(body, "auth", "identity")
    if not isinstance(identity, dict) or "password" not in (identity.get("methods") or []):
        raise ValueError("auth.identity.methods must include 'password'")
    user = _dig(identity, "password", "user")
    name, password = _dig(user, "name"), _dig(user, "password")
    domain = _dig(user, "domain", "name")
    if not all(isinstance(value, str) and value for value in (name, password, domain)):
        raise ValueError("auth.identity.password.user needs a name, a password and a domain.name")
    project = _dig(body, "auth", "scope", "project", "name")
    if project is not None and not isinstance(project, str):
        raise ValueError("auth.scope.project.name must be a string")
    return LoginRequest(name, password, domain, project)


def _dig(document: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def login_fails(account: IamAccount, login: LoginRequest) -> str | None:
    """Why ``login`` does not log in to ``account`` (None: it does)."""
    given = (login.user, login.domain, login.password)
    expected = (account.user, account.domain, account.password)
    if not all(
        hmac.compare_digest(a.encode(), b.encode()) for a, b in zip(given, expected, strict=True)
    ):
        return "The username or password is wrong."  # IAM does not say which
    if login.project is not None and login.project != account.project:
        return f"The user has no access to project {login.project!r}."
    return None


class TokenRegistry:
    """The tokens a service accepts: a fixed one, and those it issued until they expire.

    ``clock`` is the wall clock (IAM's ``expires_at`` is wall time); tests inject theirs.
    """

    def __init__(self, fixed: str, ttl: float, clock: Callable[[], float]) -> None:
        self._fixed = fixed.encode("utf-8")
        self._ttl = ttl
        self._clock = clock
        self._expiry: dict[str, float] = {}

    def issue(self) -> tuple[str, float, float]:
        """A new token, when it was issued and when it expires (seconds since the epoch)."""
        now = self._clock()
        self._forget_expired(now)
        token = secrets.token_urlsafe(48)
        self._expiry[token] = now + self._ttl
        return token, now, now + self._ttl

    def refusal(self, given: str | None) -> str | None:
        """Why ``given`` is refused (None: it is accepted)."""
        if given is None:
            return "the X-Auth-Token header is missing"
        if hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._fixed):
            return None
        expires = self._expiry.get(given)
        if expires is None:
            return "the token is not valid"
        if self._clock() >= expires:
            return "token expires"  # the gateway's words
        return None

    @property
    def issued(self) -> tuple[str, ...]:
        """The tokens issued and not yet forgotten (for tests that look for leaks)."""
        return tuple(self._expiry)

    def _forget_expired(self, now: float) -> None:
        stale = [t for t, expires in self._expiry.items() if now - expires > _EXPIRED_KEPT_S]
        for token in stale:
            del self._expiry[token]


def token_document(account: IamAccount, issued_at: float, expires_at: float) -> dict[str, Any]:
    """The body of a successful login: ``{"token": {"expires_at": ..., ...}}``."""
    return {
        "token": {
            "expires_at": _iso(expires_at),
            "issued_at": _iso(issued_at),
            "methods": ["password"],
            "user": {"name": account.user, "domain": {"name": account.domain}},
            "project": {"name": account.project},
        }
    }


def _iso(epoch: float) -> str:
    # IAM's own format: "2019-02-13T06:52:13.855000Z"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
