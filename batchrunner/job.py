"""The job: a TOML file (or command-line options) validated once, at load, into frozen settings.

Loading goes: parse TOML -> apply overrides (``--input``, ``--set section.key=value``, ...) ->
expand ``${ENV}`` in strings -> validate. Every problem is a ``SettingError`` naming the
setting (``batch.size must be >= 1, got 0``), with a "did you mean" for unknown keys.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from batchrunner.errors import SettingError

EMBEDDED_PREFIX = "embedded:"
DEFAULT_TOKEN_ENV = "MODELARTS_TOKEN"
# A real IAM token lives 24 h; it is renewed this long before it ends (at the latest).
DEFAULT_RENEW_BEFORE_S = 300.0

# Settings that name where a secret is (a variable, a file), never the secret itself. Their
# values are not echoed in error messages: a user may have pasted the secret there by mistake.
SECRET_POINTERS = frozenset(
    {"token_env", "token_file", "password_env", "password_file", "appcode_env", "appcode_file"}
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class InputSettings(_Settings):
    """``[input]``: what is read, and which fields of each row are sent."""

    path: str
    format: Literal["csv", "parquet", "jsonl"] | None = None
    id_column: str | None = None
    columns: tuple[str, ...] | None = None
    csv_delimiter: str | None = Field(default=None, min_length=1, max_length=1)


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


class IamSettings(_Settings):
    """``[service.iam]``: log in to IAM with a user's password and use the token it gives.

    The password comes from ``password_env`` or ``password_file``, never from the job file.
    """

    url: str
    user: str = Field(min_length=1)
    domain: str = Field(min_length=1)
    project: str = Field(min_length=1)
    password_env: str | None = None
    password_file: str | None = None
    # Renew the token this many seconds before it expires (at the latest at half its life).
    renew_before: float = Field(default=DEFAULT_RENEW_BEFORE_S, ge=0)

    _check_password_env = field_validator("password_env")(_check_env_name)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return _check_http_url(url, "https://iam.<region>.<cloud-domain>/v3/auth/tokens")

    @model_validator(mode="after")
    def _one_password_source(self) -> IamSettings:
        given = _one_of(self, ("password_env", "password_file"))
        if len(given) != 1:
            raise ValueError(
                "set exactly one of password_env (an environment variable holding the IAM "
                "password) or password_file (a file holding it)"
                + (f"; both are set: {', '.join(given)}" if given else "")
            )
        return self


class AppSettings(_Settings):
    """``[service.app]``: App authentication, an AppCode sent in ``X-Apig-AppCode``."""

    appcode_env: str | None = None
    appcode_file: str | None = None

    _check_appcode_env = field_validator("appcode_env")(_check_env_name)

    @model_validator(mode="after")
    def _one_appcode_source(self) -> AppSettings:
        given = _one_of(self, ("appcode_env", "appcode_file"))
        if len(given) != 1:
            raise ValueError(
                "set exactly one of appcode_env (an environment variable holding the AppCode) "
                "or appcode_file (a file holding it)"
                + (f"; both are set: {', '.join(given)}" if given else "")
            )
        return self


TOKEN_SOURCES = ("token_env", "token_file", "iam")


class ServiceSettings(_Settings):
    """``[service]``: where requests go and how they authenticate.

    The token comes from one source: ``token_env``, ``token_file`` or ``[service.iam]``;
    with none of them, from ``$MODELARTS_TOKEN``, unless ``[service.app]`` alone
    authenticates the requests (its AppCode is sent besides a token when both are set).
    """

    url: str
    token_env: str | None = None
    token_file: str | None = None
    iam: IamSettings | None = None
    app: AppSettings | None = None
    protocol: Literal["modelarts"] = "modelarts"
    timeout: float = Field(default=40.0, gt=0)  # the gateway cuts requests at 40 s
    connect_timeout: float = Field(default=10.0, gt=0)
    verify_tls: bool = True
    ca_bundle: str | None = None

    _check_token_env = field_validator("token_env")(_check_env_name)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if url.startswith(EMBEDDED_PREFIX):
            if not url[len(EMBEDDED_PREFIX) :]:
                raise ValueError("name the embedded model, e.g. 'embedded:iris'")
            return url
        return _check_http_url(
            url,
            "https://<gateway>/v1/infers/<service-id>, "
            "or 'embedded:<model>' for the built-in reference service",
        )

    @model_validator(mode="after")
    def _one_token_source(self) -> ServiceSettings:
        given = _one_of(self, TOKEN_SOURCES)
        if len(given) > 1:
            raise ValueError(
                f"choose one token source: token_env, token_file or [service.iam]; "
                f"set here: {', '.join(given)}"
            )
        return self

    @property
    def token_source(self) -> str | None:
        """``token_env``, ``token_file``, ``iam``, or None when only an AppCode is sent."""
        given = _one_of(self, TOKEN_SOURCES)
        if given:
            return given[0]
        return None if self.app is not None else "token_env"

    @property
    def embedded_model(self) -> str | None:
        """The model name of an ``embedded:<model>`` URL, else None."""
        if self.url.startswith(EMBEDDED_PREFIX):
            return self.url[len(EMBEDDED_PREFIX) :]
        return None


class BatchSettings(_Settings):
    """``[batch]``: rows per request and requests in flight."""

    size: int = Field(default=50, ge=1, le=1_000_000)
    concurrency: int = Field(default=8, ge=1, le=4096)


class RetrySettings(_Settings):
    """``[retry]``: how often and how patiently a failed request is sent again."""

    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_initial: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=30.0, ge=0)


class OutputSettings(_Settings):
    """``[output]``: where the Parquet file goes and what it holds."""

    path: str = "out/{name}.parquet"
    keep_input: bool = False


class Job(_Settings):
    """A whole job, validated. Build it with ``load_job``; it never changes afterwards."""

    name: str = Field(min_length=1)
    max_error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    input: InputSettings
    service: ServiceSettings
    batch: BatchSettings = BatchSettings()
    retry: RetrySettings = RetrySettings()
    output: OutputSettings = OutputSettings()

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names files)")
        return name


# --- loading -----------------------------------------------------------------------------

#: Command-line options and the setting each one overrides.
OPTION_SETTINGS = {
    "input": "input.path",
    "output": "output.path",
    "url": "service.url",
    "concurrency": "batch.concurrency",
    "batch_size": "batch.size",
}


def load_job(
    path: str | Path | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    assignments: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Job:
    """Load, override, expand and validate a job.

    ``path`` is the TOML file (None: the job comes from options alone). ``overrides`` maps
    dotted setting names to values (None values are ignored); ``assignments`` are
    ``section.key=value`` strings as given to ``--set``.
    """
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        raw = _read_toml(Path(path))
        source = str(path)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _assign(raw, dotted, value)
    for assignment in assignments:
        dotted, value = parse_assignment(assignment)
        _assign(raw, dotted, value)
    if "name" not in raw:
        raw["name"] = _default_name(path, raw)
    raw = _expand_env(raw, os.environ if environ is None else environ, ())
    try:
        return Job.model_validate(raw)
    except ValidationError as exc:
        raise SettingError(_describe(exc, source)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingError(f"job file not found: {path}") from None
    except OSError as exc:
        raise SettingError(f"cannot read job file {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"{path}: not valid TOML: {exc}") from None


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is read as TOML if it parses, else as text."""
    dotted, sep, text = assignment.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted or not re.fullmatch(r"[A-Za-z_][\w.]*", dotted):
        raise SettingError(
            f"--set {assignment!r}: expected section.key=value, e.g. --set batch.size=100"
        )
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return dotted, value


def _assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    node = raw
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise SettingError(f"cannot set {dotted}: {section} is a value, not a section")
        node = child
    node[key] = value


def _default_name(path: str | Path | None, raw: Mapping[str, Any]) -> str:
    if path is not None:
        stem = Path(path).stem
    else:
        input_path = str(raw.get("input", {}).get("path", "job"))
        stem = Path(input_path.rstrip("/*")).stem or "job"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "job"


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, environ: Mapping[str, str], where: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, environ, (*where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, environ, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise SettingError(
            f"{'.'.join(where)}: environment variable {name} is not set "
            f"(used as ${{{name}}}); set it, or write ${{{name}:-default}}"
        )

    return _ENV_REFERENCE.sub(substitute, value)


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid job ({source}):"]
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            lines.append(f"  unknown setting {location}{_did_you_mean(error['loc'])}")
        elif kind == "missing":
            lines.append(f"  {location}: required setting is missing")
        else:
            message = error["msg"]
            message = message[0].lower() + message[1:] if message else message
            message = message.removeprefix("value error, ")
            if _shows_input(error["loc"], error["input"]):
                message += f", got {error['input']!r}"
            lines.append(f"  {location}: {message}")
    return "\n".join(lines)


def _shows_input(location: tuple[int | str, ...], value: Any) -> bool:
    # A whole section (a rule across its settings) is not worth echoing; a secret pointer
    # may hold a pasted secret, so it is never echoed.
    return not isinstance(value, dict) and not (location and location[-1] in SECRET_POINTERS)


def _did_you_mean(location: tuple[int | str, ...]) -> str:
    model: type[BaseModel] = Job
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        section = _section_model(field.annotation if field else None)
        if section is None:
            return ""
        model = section
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(location[-1]), known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; known settings here: {', '.join(known)}"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The settings model of a section's annotation (``IamSettings | None`` included)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


# --- identity ------------------------------------------------------------------------------


def fingerprint(job: Job, input_files: Iterable[Path]) -> str:
    """What makes two runs "the same job": a resumed run must match its predecessor's.

    Input identity (paths, sizes, modification times), URL, protocol, batch size and the
    columns sent. Not the token, concurrency or output path: those may change between runs.
    """
    files = []
    for path in input_files:
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    identity = {
        "url": job.service.url,
        "protocol": job.service.protocol,
        "batch_size": job.batch.size,
        "columns": job.input.columns,
        "id_column": job.input.id_column,
        "format": job.input.format,
        "files": files,
    }
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


OUTPUT_PLACEHOLDERS = ("name", "date", "time", "run_id")


def resolve_output_path(job: Job, started: datetime, run_id: str) -> Path:
    """``output.path`` with its placeholders filled: ``{name} {date} {time} {run_id}``.

    ``started`` is the run's start in local time: each night's run writes its own file.
    """
    template = job.output.path
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise SettingError(f"output.path: {exc} in {template!r}") from None
    for name in fields:
        if name not in OUTPUT_PLACEHOLDERS:
            raise SettingError(
                f"output.path: unknown placeholder {{{name}}} in {template!r}; "
                f"known: {', '.join('{' + p + '}' for p in OUTPUT_PLACEHOLDERS)}"
            )
    path = Path(
        template.format(
            name=job.name,
            date=started.strftime("%Y-%m-%d"),
            time=started.strftime("%H%M%S"),
            run_id=run_id,
        )
    )
    if path.suffix.lower() != ".parquet":
        raise SettingError(f"output.path: must end in .parquet, got {str(path)!r}")
    return path
