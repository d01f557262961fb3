"""The credentials a run sends, as ``[service]`` chooses them: a token source and an AppCode.

``read_credentials`` reads every secret the settings point at (a missing variable or file is
a ``SettingError`` before any request) and sends nothing: the IAM login happens at the
first ``current()``. ``describe_auth`` says in words where the credentials come from, for
``validate`` and ``--dry-run``.

``open_store`` does the same for ``[storage]``: the object store's keys, read from where the
settings point (or left to the AWS SDK's own sources), handed to the store and nowhere else.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from batchrunner.auth import (
    FileToken,
    FixedToken,
    Scrubber,
    Secret,
    TokenProvider,
    read_env_token,
    read_secret_env,
    read_secret_file,
)
from batchrunner.client import login
from batchrunner.clock import SYSTEM_CLOCK, Clock
from batchrunner.errors import SettingError
from batchrunner.iam import IamToken, TokenCache, default_cache_dir, password_source
from batchrunner.job.service import (
    DEFAULT_OPENAI_KEY_ENV,
    DEFAULT_TOKEN_ENV,
    AppSettings,
    IamSettings,
    OpenAISettings,
    ServiceSettings,
)
from batchrunner.job.settings import StorageSettings
from batchrunner.storage import ObjectStore


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a run authenticates with: a token source (None: no token), an AppCode (or None)."""

    tokens: TokenProvider | None
    app_code: Secret | None
    # Every secret read (the token, the IAM password, the AppCode): scrubbed from whatever
    # the service or IAM sends back (tokens issued later are added as they are sent).
    secrets: tuple[Secret, ...] = ()

    def scrubber(self) -> Scrubber:
        """A scrubber holding every secret read so far."""
        return Scrubber(*self.secrets)


def read_credentials(
    settings: ServiceSettings,
    *,
    environ: Mapping[str, str] | None = None,
    cache_dir: Path | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Credentials:
    """Read the secrets ``settings`` point at; a missing one is a ``SettingError``.

    ``cache_dir`` holds the IAM token cache (default: ``$XDG_CACHE_HOME/batchrunner``);
    ``clock`` is the run's (an IAM token's end, a token file's re-reads).
    """
    env = os.environ if environ is None else environ
    tokens: TokenProvider | None = None
    secrets: list[Secret] = []
    source = settings.token_source
    if source == "token_file":
        assert settings.token_file is not None
        file_token = FileToken(Path(settings.token_file), sleep=clock.sleep)
        secrets.append(file_token.first)
        tokens = file_token
    elif source == "iam":
        assert settings.iam is not None
        password = _read_password(settings.iam, env)
        secrets.append(password)
        tokens = IamToken(
            settings.iam,
            password,
            login=functools.partial(
                login,
                timeout=settings.timeout,
                connect_timeout=settings.connect_timeout,
                verify_tls=settings.verify_tls,
                ca_bundle=settings.ca_bundle,
            ),
            cache=TokenCache(cache_dir or default_cache_dir(env), settings.iam),
            clock=clock.wall,
        )
    elif source == "token_env":
        token = read_env_token(settings.token_env or DEFAULT_TOKEN_ENV, env)
        secrets.append(token)
        tokens = FixedToken(token)
    elif source == "api_key":
        key = _read_api_key(settings, env)
        if key is not None:
            secrets.append(key)
            tokens = FixedToken(key)
    app_code = _read_app_code(settings.app, env) if settings.app is not None else None
    if app_code is not None:
        secrets.append(app_code)
    return Credentials(tokens, app_code, tuple(secrets))


def _read_api_key(settings: ServiceSettings, environ: Mapping[str, str]) -> Secret | None:
    """An OpenAI-compatible server's key; None when only the default variable was looked
    at and is unset (a local server needs no key)."""
    openai = settings.openai or OpenAISettings()
    if openai.api_key_file is not None:
        return read_secret_file(Path(openai.api_key_file), "service.openai.api_key_file")
    if openai.api_key_env is None and not environ.get(DEFAULT_OPENAI_KEY_ENV, "").strip():
        return None
    name = openai.api_key_env or DEFAULT_OPENAI_KEY_ENV
    return read_secret_env(name, "service.openai.api_key_env", "API key", environ)


def _read_password(settings: IamSettings, environ: Mapping[str, str]) -> Secret:
    if settings.password_env is not None:
        return read_secret_env(
            settings.password_env, "service.iam.password_env", "IAM password", environ
        )
    assert settings.password_file is not None
    return read_secret_file(Path(settings.password_file), "service.iam.password_file")


def _read_app_code(settings: AppSettings, environ: Mapping[str, str]) -> Secret:
    if settings.appcode_env is not None:
        return read_secret_env(settings.appcode_env, "service.app.appcode_env", "AppCode", environ)
    assert settings.appcode_file is not None
    return read_secret_file(Path(settings.appcode_file), "service.app.appcode_file")


def describe_auth(settings: ServiceSettings) -> str:
    """Where the credentials come from, in words (no secret in them)."""
    source = settings.token_source
    if settings.embedded_model is not None:
        return "a random token of the embedded service"
    parts: list[str] = []
    if source == "token_file":
        parts.append(f"token from file {settings.token_file} (read again when refused)")
    elif source == "iam":
        iam = settings.iam
        assert iam is not None
        parts.append(
            f"token from an IAM login at {iam.url} as user {iam.user} (domain {iam.domain}, "
            f"project {iam.project}; password in {password_source(iam)}), cached and renewed"
        )
    elif source == "token_env":
        parts.append(f"token from ${settings.token_env or DEFAULT_TOKEN_ENV}")
    elif source == "api_key":
        openai = settings.openai or OpenAISettings()
        where = openai.api_key_file
        parts.append(
            f"API key (Authorization: Bearer) from file {where}"
            if where
            else f"API key (Authorization: Bearer) from "
            f"${openai.api_key_env or DEFAULT_OPENAI_KEY_ENV}"
            + ("" if openai.api_key_env else ", if set")
        )
    if settings.app is not None:
        where = settings.app.appcode_env
        parts.append(
            f"AppCode from ${where}" if where else f"AppCode from file {settings.app.appcode_file}"
        )
    return "; ".join(parts) or "none (no token is set for this protocol)"


def open_store(
    settings: StorageSettings, *, environ: Mapping[str, str] | None = None
) -> ObjectStore:
    """The object store ``[storage]`` describes, with its keys (not connected yet).

    Keys named by ``access_key_env``/``secret_key_env`` (or ``_file``) must be there (a
    ``SettingError`` otherwise); with neither, the AWS SDK finds them itself.
    """
    env = os.environ if environ is None else environ
    access = secret = token = None
    if settings.access_key_env is not None:
        access = read_secret_env(
            settings.access_key_env, "storage.access_key_env", "access key", env
        )
    elif settings.access_key_file is not None:
        access = _read_key_file(settings.access_key_file, "storage.access_key_file")
    if settings.secret_key_env is not None:
        secret = read_secret_env(
            settings.secret_key_env, "storage.secret_key_env", "secret key", env
        )
    elif settings.secret_key_file is not None:
        secret = _read_key_file(settings.secret_key_file, "storage.secret_key_file")
    if settings.session_token_env is not None:
        token = read_secret_env(
            settings.session_token_env, "storage.session_token_env", "session token", env
        )
    return ObjectStore(
        endpoint=settings.endpoint,
        region=settings.region,
        virtual=settings.addressing == "virtual",
        access_key=access.reveal() if access is not None else None,
        secret_key=secret.reveal() if secret is not None else None,
        session_token=token.reveal() if token is not None else None,
        keys_from=_describe_keys(settings),
    )


def standard_store(*, environ: Mapping[str, str] | None = None) -> ObjectStore:
    """The object store the standard AWS variables describe, for a command without a job
    (``inspect``): ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (none: AWS S3),
    ``AWS_REGION`` or ``AWS_DEFAULT_REGION``; the keys from the AWS SDK's own sources.
    The bucket goes where the SDK puts it: in the host name on AWS, in the path elsewhere."""
    env = os.environ if environ is None else environ
    return ObjectStore(
        endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        keys_from="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role; or give "
        "--job with a [storage] section",
    )


def _read_key_file(path: str, setting: str) -> Secret:
    # Unlike a token file's, the path is not echoed: a key pasted where its file's name
    # belongs would be shown otherwise.
    try:
        return read_secret_file(Path(path), setting)
    except SettingError:
        raise SettingError(
            f"{setting}: cannot read the file it names, or it is empty; give the path of a "
            f"file holding the key (never the key itself)"
        ) from None


def describe_storage(settings: StorageSettings) -> str:
    """Where the object store is and where its keys come from, in words (no key in them)."""
    where = settings.endpoint or "AWS S3"
    region = settings.region or "default"
    return (
        f"{where} ({settings.addressing} addressing, region {region}); {_describe_keys(settings)}"
    )


def _describe_keys(settings: StorageSettings) -> str:
    if settings.access_key_env or settings.access_key_file:
        keys = (
            f"access key from ${settings.access_key_env}"
            if settings.access_key_env
            else f"access key from file {settings.access_key_file}"
        )
        keys += (
            f", secret key from ${settings.secret_key_env}"
            if settings.secret_key_env
            else f", secret key from file {settings.secret_key_file}"
        )
    else:
        keys = "keys from the standard AWS sources (AWS_ACCESS_KEY_ID, profile, instance role)"
    return keys
