"""Where the token comes from, and how it is kept out of sight.

A token is read from an environment variable or a file, never from the command line. It is
held in a ``Secret`` whose ``repr``/``str`` are masked, so that it cannot reach a log line,
an error message or an output file by accident; only the client asks for ``reveal()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from batchrunner.errors import SettingError
from batchrunner.job import DEFAULT_TOKEN_ENV, ServiceSettings

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


def resolve_token(settings: ServiceSettings, environ: Mapping[str, str] | None = None) -> Secret:
    """Read the token the settings point at; a missing one is a ``SettingError`` (exit 2)."""
    env = os.environ if environ is None else environ
    if settings.token_env and settings.token_file:
        raise SettingError(
            "service.token_env and service.token_file are both set: choose one token source"
        )
    if settings.token_file:
        return read_token_file(Path(settings.token_file))
    name = settings.token_env or DEFAULT_TOKEN_ENV
    value = env.get(name, "").strip()
    if not value:
        raise SettingError(
            f"service.token_env: environment variable {name} is not set or empty; "
            f"export the service token as {name}, or set service.token_file"
        )
    return Secret(value)


def read_token_file(path: Path) -> Secret:
    """Read a token file (surrounding whitespace ignored)."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingError(f"service.token_file: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise SettingError(f"service.token_file: {path} is empty")
    return Secret(value)


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of request headers fit to show: credentials replaced by the mask."""
    sensitive = {"x-auth-token", "authorization", "x-apig-appcode", "cookie"}
    return {k: (MASK if k.lower() in sensitive else v) for k, v in headers.items()}
