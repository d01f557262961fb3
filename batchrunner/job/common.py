"""What every section of the job file shares: the frozen base model, and the checks of a
secret's pointers (an environment variable's name, one source of a secret) and of URLs."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

# Settings that name where a secret is (a variable, a file), never the secret itself. Their
# values are not echoed in error messages: a user may have pasted the secret there by mistake.
SECRET_POINTERS = frozenset(
    {
        "token_env",
        "token_file",
        "password_env",
        "password_file",
        "appcode_env",
        "appcode_file",
        "webhook_url_env",
        "access_key_env",
        "access_key_file",
        "secret_key_env",
        "secret_key_file",
        "session_token_env",
    }
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _check_env_name(name: str | None) -> str | None:
    if name is not None and not _ENV_NAME.fullmatch(name):
        raise ValueError(
            "must be the name of an environment variable (letters, digits, '_'), "
            "not the secret itself: secrets never go into the job file"
        )
    return name


def _check_http_url(url: str, example: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"must be an http(s) URL such as {example}")
    return url


def _one_of(settings: BaseModel, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if getattr(settings, name) is not None]


def _require_one_secret_source(settings: BaseModel, secret: str) -> None:
    """Exactly one of ``<secret>_env`` and ``<secret>_file`` must be set."""
    env, file = f"{secret}_env", f"{secret}_file"
    given = _one_of(settings, (env, file))
    if len(given) != 1:
        noun = "the IAM password" if secret == "password" else "the AppCode"
        raise ValueError(
            f"set exactly one of {env} (an environment variable holding {noun}) "
            f"or {file} (a file holding it)"
            + (f"; both are set: {', '.join(given)}" if given else "")
        )
