"""The job: a TOML file (or command-line options) validated once, at load, into frozen settings.

Loading goes: parse TOML -> apply overrides (``--input``, ``--set section.key=value``, ...) ->
expand ``${ENV}`` in strings -> validate. Every problem is a ``SettingError`` naming the
setting (``batch.size must be >= 1, got 0``), with a "did you mean" for unknown keys.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from batchrunner.errors import SettingError, did_you_mean
from batchrunner.storage import InputPath, ObjectPath

EMBEDDED_PREFIX = "embedded:"
DEFAULT_TOKEN_ENV = "MODELARTS_TOKEN"
# A real IAM token lives 24 h; it is renewed this long before it ends (at the latest).
DEFAULT_RENEW_BEFORE_S = 300.0

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

DEFAULT_MAX_REQUEST_BYTES = 12 * 1024 * 1024  # the gateway's request body limit (PROTOCOL.md)
# The largest answer kept (decompressed): the gateway's 12 MB, with room for compression.
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# The run stops when no request has succeeded for this long and the latest ones could not
# connect or timed out: the service cannot be reached.
DEFAULT_UNREACHABLE_AFTER = 120.0


#: The two kinds of input, and the protocol input each is sent as.
class Engine(StrEnum):
    """Where a run's requests are made from (``run --engine``)."""

    LOCAL = "local"  # this process: one asyncio pipeline, one output file
    RAY = "ray"  # Ray Data: a folder of Parquet parts (pip install 'batchrunner[ray]')


class InputKind(StrEnum):
    """What the input is, which decides how it is sent."""

    TABULAR = "tabular"  # rows, as text input (req_data)
    IMAGES = "images"  # one file per request, as file input (multipart/form-data)


TABULAR = InputKind.TABULAR
IMAGES = InputKind.IMAGES


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class InputSettings(_Settings):
    """``[input]``: what is read, and which fields of each row are sent.

    ``format = "images"`` (or a folder, glob or manifest of images, see ``sources``) makes
    an image job; ``extensions``, ``recursive`` and ``follow_links`` apply to it alone, as
    ``id_column``, ``columns`` and ``csv_delimiter`` apply to tables alone.
    """

    path: str
    format: Literal["csv", "parquet", "jsonl", "images"] | None = None
    id_column: str | None = None
    columns: tuple[str, ...] | None = None
    csv_delimiter: str | None = Field(default=None, min_length=1, max_length=1)
    # CSV and JSON lines: the text encoding (any Python codec name); bad text is an error.
    encoding: str = Field(default="utf-8", min_length=1)
    # A sent column of bytes (Parquet binary): refused, or sent as base64 text.
    binary: Literal["refuse", "base64"] = "refuse"
    # CSV and JSON lines: bytes read at once (and the sample column types are guessed from);
    # a line longer than this cannot be read.
    block_size: int = Field(default=4 << 20, ge=64 << 10, le=(1 << 31) - 1)
    extensions: tuple[str, ...] | None = None  # None: the common image types
    recursive: bool = True
    follow_links: bool = False
    # Send only items that are new or changed since earlier runs finished them (see
    # ``incremental``): they are remembered beside the output, in .batchrunner/.
    incremental: bool = False

    @field_validator("extensions")
    @classmethod
    def _check_extensions(cls, extensions: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if extensions is None:
            return None
        if not extensions:
            raise ValueError('list at least one extension, e.g. [".jpg", ".png"]')
        normalized = []
        for extension in extensions:
            # ".JPG", "jpg" and ".jpg" all mean the same: matching ignores case.
            name = extension.strip().lower()
            name = name if name.startswith(".") else "." + name
            if len(name) < 2 or "/" in name or "." in name[1:] or any(c.isspace() for c in name):
                raise ValueError(f'{extension!r} is not a file extension such as ".jpg"')
            normalized.append(name)
        return tuple(dict.fromkeys(normalized))


class EmbeddedSettings(_Settings):
    """``[service.embedded]``: faults the embedded service injects, to rehearse a bad day
    (also ``batchrunner serve``'s fault options, and the service's ``FaultSettings``)."""

    latency_ms: float = Field(default=0.0, ge=0)
    jitter_ms: float = Field(default=0.0, ge=0)
    capacity: int | None = Field(default=None, ge=1)  # in flight above it: 429 + Retry-After
    retry_after: float = Field(default=1.0, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)  # 503s
    drop_rate: float = Field(default=0.0, ge=0, le=1)  # connections closed without an answer
    html_rate: float = Field(default=0.0, ge=0, le=1)  # HTML 502 pages
    poison_rate: float = Field(default=0.0, ge=0, le=1)  # rows the model fails on (MR.0105)
    seed: int = 0

    @property
    def any(self) -> bool:
        """Whether any fault is injected at all."""
        return self != EmbeddedSettings(seed=self.seed)


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
        _require_one_secret_source(self, "password")
        return self


class AppSettings(_Settings):
    """``[service.app]``: App authentication, an AppCode sent in ``X-Apig-AppCode``."""

    appcode_env: str | None = None
    appcode_file: str | None = None

    _check_appcode_env = field_validator("appcode_env")(_check_env_name)

    @model_validator(mode="after")
    def _one_appcode_source(self) -> AppSettings:
        _require_one_secret_source(self, "appcode")
        return self


TOKEN_SOURCES = ("token_env", "token_file", "iam")

#: The wire formats ``service.protocol`` names (see ``protocols``).
Protocol = Literal[
    "modelarts",
    "json",
    "kserve-v1",
    "oip-v2",
    "mlflow",
    "openai-chat",
    "openai-embeddings",
    "openai-batch",
]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
#: The protocols of OpenAI-compatible servers, configured by ``[service.openai]``.
OPENAI_PROTOCOLS = ("openai-chat", "openai-embeddings", "openai-batch")
DEFAULT_OPENAI_KEY_ENV = "OPENAI_API_KEY"
#: In a ``[service.json]`` request, these placeholders stand for the whole batch.
ROWS_PLACEHOLDER = "{rows}"
VALUES_PLACEHOLDER = "{values}"


class JsonBodySettings(_Settings):
    """``[service.json]``: the body of a ``protocol = "json"`` request, and where its result is.

    ``request`` is any JSON value; a string that is exactly ``"{column}"`` becomes that
    column's value, ``"{rows}"`` the batch's rows as objects, ``"{values}"`` as lists; a
    longer string holding ``{column}`` is filled in as text. ``response`` is a dotted path
    to the result in the answer ("" or left out: the whole answer).
    """

    request: Any = Field(default_factory=lambda: {"input": ROWS_PLACEHOLDER})
    response: str = ""

    @property
    def batched(self) -> bool:
        """Whether the body carries the whole batch (``{rows}`` or ``{values}``)."""
        return _holds_placeholder(self.request, (ROWS_PLACEHOLDER, VALUES_PLACEHOLDER))


def _holds_placeholder(value: Any, placeholders: tuple[str, ...]) -> bool:
    if isinstance(value, str):
        return value in placeholders
    if isinstance(value, dict):
        return any(_holds_placeholder(v, placeholders) for v in value.values())
    if isinstance(value, list):
        return any(_holds_placeholder(v, placeholders) for v in value)
    return False


class KServeSettings(_Settings):
    """``[service.kserve]``: how KServe v1 instances are written: lists of values or objects."""

    instance_format: Literal["values", "records"] = "values"


class OipSettings(_Settings):
    """``[service.oip]``: the Open Inference Protocol v2 request's inputs and outputs.

    ``layout``: one ``[N, F]`` tensor (``tensor``) or one ``[N]`` tensor per column
    (``columns``, with MLServer's ``content_type = "pd"``); left out: a tensor when the
    columns share a numeric type, else columns. ``input_name`` names the tensor;
    ``outputs`` asks for only these outputs.
    """

    layout: Literal["tensor", "columns"] | None = None
    input_name: str = Field(default="input-0", min_length=1)
    outputs: tuple[str, ...] | None = None
    content_type: str | None = "pd"  # sent with the columns layout; "" sends none


class OpenAISettings(_Settings):
    """``[service.openai]``: the model, the prompt (chat) and the limits of an
    OpenAI-compatible server (``protocol = "openai-chat"`` or ``"openai-embeddings"``).

    ``prompt`` is the user message, ``{column}`` filled in from the row; ``response_format``
    is sent as it is, and a ``json_schema`` one is checked against each reply (a reply that
    does not fit is sent again up to ``schema_attempts`` times). The key comes from
    ``api_key_env`` (default ``OPENAI_API_KEY``; when that default is unset, no key is
    sent, as a local server needs none) or ``api_key_file``. ``rate_limit`` is in requests
    a minute, ``token_rate_limit`` in tokens a minute; ``max_total_tokens`` stops the run
    (exit 3, resumable) before its tokens (and those of the runs it resumes) would go over.
    """

    model: str | None = Field(default=None, min_length=1)  # a batch file's bodies name theirs
    system: str | None = None
    prompt: str | None = Field(default=None, min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    response_format: dict[str, Any] | None = None
    schema_attempts: int = Field(default=2, ge=1, le=100)
    dimensions: int | None = Field(default=None, ge=1)
    api_key_env: str | None = None
    api_key_file: str | None = None
    rate_limit: float | None = Field(default=None, gt=0)
    token_rate_limit: float | None = Field(default=None, gt=0)
    max_total_tokens: int | None = Field(default=None, ge=1)

    _check_api_key_env = field_validator("api_key_env")(_check_env_name)

    @model_validator(mode="after")
    def _check(self) -> OpenAISettings:
        if self.api_key_env is not None and self.api_key_file is not None:
            raise ValueError("set api_key_env or api_key_file, not both")
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(
                f"response_format.type must be text, json_object or json_schema, got {kind!r}"
            )
        return self

    #: What decides the answers (a resumed run must keep them); not the key nor the limits.
    IDENTITY: ClassVar[frozenset[str]] = frozenset(
        {"model", "system", "prompt", "max_tokens", "temperature", "response_format", "dimensions"}
    )


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
    protocol: Protocol = "modelarts"
    # Named "json" in the file; a field of that name would shadow BaseModel.json.
    json_settings: JsonBodySettings | None = Field(default=None, alias="json")
    kserve: KServeSettings | None = None
    oip: OipSettings | None = None
    openai: OpenAISettings | None = None
    timeout: float = Field(default=40.0, gt=0)  # the gateway cuts requests at 40 s
    connect_timeout: float = Field(default=10.0, gt=0)
    verify_tls: bool = True
    ca_bundle: str | None = None
    # An answer larger than this (after decompression) is an error row, read no further.
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=1024)
    # Seconds without a successful request, all the latest failing to connect or timing
    # out, after which the run stops (exit 3) and leaves the rest for a re-run.
    unreachable_after: float = Field(default=DEFAULT_UNREACHABLE_AFTER, gt=0)
    # File input: the model's input parameter the file goes under (curl -F 'images=@x.png').
    file_field: str = "images"
    embedded: EmbeddedSettings | None = None

    @field_validator("file_field")
    @classmethod
    def _check_file_field(cls, name: str) -> str:
        # It is written into a quoted header parameter: no quotes, backslashes or controls.
        if not name or re.search(r'["\\\x00-\x1f\x7f]', name):
            raise ValueError("must be a form field name without quotes or control characters")
        return name

    @model_validator(mode="after")
    def _sections_of_the_protocol(self) -> ServiceSettings:
        sections = (("json_settings", "json"), ("kserve", "kserve-v1"), ("oip", "oip-v2"))
        for section, protocol in sections:
            if getattr(self, section) is not None and self.protocol != protocol:
                raise ValueError(
                    f"[service.{section.removesuffix('_settings')}] applies to protocol = "
                    f"{protocol!r}, "
                    f"but the protocol is {self.protocol!r}"
                )
        if self.openai is not None and self.protocol not in OPENAI_PROTOCOLS:
            raise ValueError(
                "[service.openai] applies to protocol = 'openai-chat', 'openai-embeddings' "
                f"or 'openai-batch', but the protocol is {self.protocol!r}"
            )
        names_model = self.protocol in ("openai-chat", "openai-embeddings")
        if names_model and (self.openai is None or self.openai.model is None):
            raise ValueError(
                f"[service.openai] model: protocol {self.protocol!r} needs the model's name"
            )
        if self.openai is not None and self.protocol == "openai-chat" and not self.openai.prompt:
            raise ValueError("[service.openai] prompt: set the prompt, e.g. 'Label: {text}'")
        return self

    @property
    def json_body(self) -> JsonBodySettings:
        """The ``[service.json]`` settings (their defaults when the section is left out)."""
        return self.json_settings or JsonBodySettings()

    @model_validator(mode="after")
    def _embedded_only_for_embedded(self) -> ServiceSettings:
        if self.embedded is not None and self.embedded_model is None:
            raise ValueError(
                "[service.embedded] sets faults of the embedded service: "
                "it needs url = 'embedded:<model>'"
            )
        return self

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
        if self.protocol in OPENAI_PROTOCOLS:
            return "api_key"
        if self.protocol != "modelarts":  # other servers need no token unless one is set
            return None
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
    # A number, or "auto": find the service's capacity (AIMD), up to max_concurrency.
    concurrency: int | Literal["auto"] = Field(default=8)
    max_concurrency: int = Field(default=64, ge=1, le=4096)
    # Requests started per second at most (token bucket), for services with a quota.
    rate_limit: float | None = Field(default=None, gt=0)
    # The largest request body the service takes (the gateway refuses bodies over 12 MiB
    # with a 413): a bigger batch of rows is split before sending; an image file whose
    # request would be bigger becomes an error row without being sent.
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=1024)
    # After SIGINT/SIGTERM: seconds for requests in flight to finish before they are dropped.
    grace_period: float = Field(default=30.0, ge=0)

    @field_validator("concurrency", mode="before")
    @classmethod
    def _check_concurrency(cls, value: object) -> object:
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
            raise ValueError('must be a whole number from 1 to 4096, or "auto"')
        return value

    @property
    def max_in_flight(self) -> int:
        """The most requests that can be in flight at once."""
        return self.max_concurrency if self.concurrency == "auto" else int(self.concurrency)


class RetrySettings(_Settings):
    """``[retry]``: how often and how patiently a failed request is sent again."""

    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_initial: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=30.0, ge=0)
    # A Retry-After asking for longer (an HTTP date years ahead) is waited this long at most.
    retry_after_max: float = Field(default=60.0, ge=0)


class OutputSettings(_Settings):
    """``[output]``: where the Parquet file goes and what it holds."""

    path: str = "out/{name}.parquet"
    keep_input: bool = False
    # Keep only these result fields (like SageMaker's OutputFilter); None keeps every one.
    result_fields: tuple[str, ...] | None = Field(default=None, min_length=1)


class ReportSettings(_Settings):
    """``[report]``: what a run leaves for monitoring besides its summary."""

    # Prometheus' text format, for node_exporter's textfile collector (see ``metrics``).
    metrics_file: str | None = None


NOTIFY_EVENTS = ("failure", "success")


class NotifySettings(_Settings):
    """``[notify]``: tell someone when a run ends. ``command`` is run with the summary JSON
    on its stdin; ``webhook_url_env`` names the variable holding an incoming-webhook URL (a
    secret: never in the job file) that is POSTed a short text and the summary."""

    on: tuple[Literal["failure", "success"], ...] = ("failure",)
    command: tuple[str, ...] | None = None
    webhook_url_env: str | None = None
    timeout: float = Field(default=30.0, gt=0)

    _check_webhook_env = field_validator("webhook_url_env")(_check_env_name)

    @model_validator(mode="after")
    def _check_target(self) -> NotifySettings:
        if self.command is None and self.webhook_url_env is None:
            raise ValueError(
                "say how to notify: command = [...] (given the summary JSON on stdin) or "
                'webhook_url_env = "NAME" (the variable holding the webhook URL)'
            )
        if self.command is not None and not self.command:
            raise ValueError('command must name a program, e.g. ["mail", "-s", "batch", "me"]')
        return self


class StorageSettings(_Settings):
    """``[storage]``: how ``s3://`` and ``obs://`` locations are reached.

    ``endpoint`` is the store's URL (OBS: ``https://obs.<region>.myhuaweicloud.com``; left
    out: AWS S3), ``addressing`` puts the bucket in the host name (``virtual``, which OBS
    requires) or in the path. The keys come from ``access_key_env``/``secret_key_env`` (or
    ``_file``), else from the AWS SDK's own sources (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, a profile, an instance role).
    """

    endpoint: str | None = None
    region: str | None = None
    addressing: Literal["virtual", "path"] = "virtual"
    access_key_env: str | None = None
    access_key_file: str | None = None
    secret_key_env: str | None = None
    secret_key_file: str | None = None
    session_token_env: str | None = None

    _check_access_env = field_validator("access_key_env")(_check_env_name)
    _check_secret_env = field_validator("secret_key_env")(_check_env_name)
    _check_session_env = field_validator("session_token_env")(_check_env_name)

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        return _check_http_url(endpoint, "https://obs.<region>.myhuaweicloud.com")

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> StorageSettings:
        access = _one_of(self, ("access_key_env", "access_key_file"))
        secret = _one_of(self, ("secret_key_env", "secret_key_file"))
        if len(access) > 1 or len(secret) > 1:
            raise ValueError(
                "choose one place for each key: access_key_env or access_key_file, "
                "secret_key_env or secret_key_file"
            )
        if bool(access) != bool(secret):
            raise ValueError(
                "the access key and the secret key go together: set both "
                "(access_key_env/_file and secret_key_env/_file), or neither to use the "
                "standard AWS sources"
            )
        return self


class RunSettings(_Settings):
    """``[run]``: where the run keeps its state (journal, lock, incremental memory).

    Default: ``.batchrunner/`` beside a local output; for an output in a bucket,
    ``.batchrunner/`` in the working folder. State always stays on local disk.
    """

    state_dir: str | None = None


class Job(_Settings):
    """A whole job, validated. Build it with ``load_job``; it never changes afterwards."""

    name: str = Field(min_length=1)
    max_error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    input: InputSettings
    service: ServiceSettings
    batch: BatchSettings = BatchSettings()
    retry: RetrySettings = RetrySettings()
    output: OutputSettings = OutputSettings()
    report: ReportSettings = ReportSettings()
    notify: NotifySettings | None = None

    storage: StorageSettings = StorageSettings()
    run: RunSettings = RunSettings()

    @model_validator(mode="after")
    def _one_row_per_json_body(self) -> Job:
        if self.service.protocol != "json" or self.service.json_body.batched:
            return self
        if "size" in self.batch.model_fields_set and self.batch.size != 1:
            raise ValueError(
                f"batch.size: a [service.json] request without {ROWS_PLACEHOLDER} or "
                f"{VALUES_PLACEHOLDER} carries one row, so batch.size must be 1 or left out, "
                f"got {self.batch.size}"
            )
        return self

    @model_validator(mode="after")
    def _one_row_per_chat(self) -> Job:
        chat = self.service.protocol in ("openai-chat", "openai-batch")
        if chat and "size" in self.batch.model_fields_set and self.batch.size != 1:
            raise ValueError(
                f"batch.size: protocol {self.service.protocol!r} sends one row a request, "
                "so batch.size "
                f"must be 1 or left out, got {self.batch.size}"
            )
        if self.service.protocol == "openai-embeddings":
            columns = self.input.columns
            if columns is None or len(columns) != 1:
                raise ValueError(
                    "input.columns: protocol 'openai-embeddings' embeds one column's text; "
                    'name it, e.g. columns = ["text"]'
                )
        return self

    @property
    def rows_per_request(self) -> int:
        """Rows per request: ``batch.size``, or 1 for a one-row JSON body or a chat."""
        if self.service.protocol == "json" and not self.service.json_body.batched:
            return 1
        if self.service.protocol in ("openai-chat", "openai-batch"):
            return 1
        return self.batch.size

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
    "metrics_file": "report.metrics_file",
    "state_dir": "run.state_dir",
    "max_error_rate": "max_error_rate",
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
            lines.append(f"  unknown setting {location}{_unknown_setting_hint(error['loc'])}")
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


def _unknown_setting_hint(location: tuple[int | str, ...]) -> str:
    model: type[BaseModel] = Job
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        # A section may be optional (`EmbeddedSettings | None`): its model is in the union.
        options = get_args(annotation) or (annotation,)
        sections = [o for o in options if isinstance(o, type) and issubclass(o, BaseModel)]
        if not sections:
            return ""
        model = sections[0]
    known = list(model.model_fields)
    return f"{did_you_mean(str(location[-1]), known)}; known settings here: {', '.join(known)}"


# --- identity ------------------------------------------------------------------------------


def job_identity(
    job: Job, input_files: Iterable[InputPath], *, kind: str = TABULAR
) -> dict[str, Any]:
    """What makes two runs "the same job": a resumed run must match its predecessor's.

    Input identity (paths, sizes, modification times; for an image folder, the folder
    itself), URL, protocol, batch size and what decides what is sent: the columns of a
    table (``kind`` ``TABULAR``); the extensions, walk, form field and body limit of an image
    job (``IMAGES``, always one file per request). Not the token, concurrency or output
    path: those may change between runs.

    An image folder's identity does not cover each file (that would stat every file up
    front): the journal records each batch's key, and a resumed run checks them (see
    ``checkpoint``).
    """
    files = []
    for path in input_files:
        if isinstance(path, ObjectPath):  # a prefix has no size: its identity is its name
            stat = path.stat() if not path.key.endswith("/") and path.key else None
            files.append([path.uri, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0])
            continue
        local = path.stat()
        files.append([str(path.resolve()), local.st_size, local.st_mtime_ns])
    identity: dict[str, Any] = {
        "url": job.service.url,
        "protocol": job.service.protocol,
        "batch_size": 1 if kind == IMAGES else job.rows_per_request,
        "columns": list(job.input.columns) if job.input.columns is not None else None,
        "id_column": job.input.id_column,
        "format": job.input.format,
        "files": files,
    }
    if job.input.encoding != "utf-8":  # only when set: other runs' identities stay the same
        identity["encoding"] = job.input.encoding
    if job.input.binary != "refuse":
        identity["binary"] = job.input.binary
    if job.output.result_fields is not None:  # what the output holds
        identity["result_fields"] = list(job.output.result_fields)
    if job.service.protocol != "modelarts":  # what the body looks like decides the results
        identity["wire"] = job.service.model_dump(
            mode="json",
            include={
                "json_settings": True,
                "kserve": True,
                "oip": True,
                "openai": set(OpenAISettings.IDENTITY),
            },
            exclude_none=True,
        )
    if kind == IMAGES:
        extensions = job.input.extensions
        identity["images"] = {
            "extensions": list(extensions) if extensions is not None else None,
            "recursive": job.input.recursive,
            "follow_links": job.input.follow_links,
            "file_field": job.service.file_field,
            # It decides which files are sent and which become error rows unsent.
            "max_request_bytes": job.batch.max_request_bytes,
        }
    return identity


# Settings that mean something for one input kind only: given for the other kind, they are
# a mistake (a job pointed at the wrong input), never silently ignored.
_IMAGE_ONLY = ("input.extensions", "input.recursive", "input.follow_links", "service.file_field")
_TABLE_ONLY = (
    "input.id_column",
    "input.columns",
    "input.csv_delimiter",
    "input.encoding",
    "input.binary",
    "output.keep_input",
)


def _given(job: Job, dotted: str) -> bool:
    section, key = dotted.split(".")
    settings: BaseModel = getattr(job, section)
    return key in settings.model_fields_set


def check_input_kind(job: Job, kind: str, path: str) -> None:
    """Refuse settings that do not apply to the input's kind (``TABULAR`` or ``IMAGES``).

    ``path`` is the input as found, for the message. Image input sends one file per
    request, so an explicit ``batch.size`` other than 1 is refused; left out, it is 1.
    """
    if kind == IMAGES:
        wrong = [dotted for dotted in _TABLE_ONLY if _given(job, dotted)]
        if _given(job, "batch.size") and job.batch.size != 1:
            wrong.append("batch.size")
        what, reason = "image input", "each file is sent as it is, one file per request"
    else:
        wrong = [dotted for dotted in _IMAGE_ONLY if _given(job, dotted)]
        what, reason = "a table", "they apply to image input only"
    if not wrong:
        return
    message = (
        f"input.path {path!r} is read as {what}, so {', '.join(wrong)} cannot be used "
        f"({reason}); remove {'it' if len(wrong) == 1 else 'them'}"
    )
    if job.input.format is None:
        message += f", or set input.format if {path!r} is not {what}"
    raise SettingError(message)


def fingerprint(identity: Mapping[str, Any]) -> str:
    """A short stable hash of a job identity (see ``job_identity``)."""
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


#: The key a resumable run adds to its identity when ``input.incremental`` is on: which
#: remembered items filtered its batches. Not part of ``job_identity`` (nor of the job's
#: fingerprint): the remembered items change every night, the job does not.
INCREMENTAL_IDENTITY = "incremental"


def identity_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What differs between two identities, in words: ``batch_size: 50 -> 20``."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key == "files":
            changes.append("the input files changed (names, sizes or modification times)")
        elif key == INCREMENTAL_IDENTITY:
            changes.append("input.incremental, or the items it remembers, changed")
        elif isinstance(old, Mapping) and isinstance(new, Mapping):  # a section: images
            changes.extend(f"{key}.{change}" for change in identity_changes(old, new))
        else:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


OUTPUT_PLACEHOLDERS = ("name", "date", "time", "run_id")
OUTPUT_SUFFIXES = (".parquet", ".csv", ".jsonl")  # the formats of ``formats``


def output_name_glob(job: Job) -> str:
    """A glob matching the file name of every run's output (placeholders of the date, time
    and run id as ``*``), for finding what earlier runs of the job left beside it."""
    name = Path(job.output.path).name
    wild = "\x00"
    try:
        filled = name.format(name=job.name, date=wild, time=wild, run_id=wild)
    except (KeyError, ValueError, IndexError):
        return glob.escape(name)
    return "*".join(glob.escape(part) for part in filled.split(wild))


def resolve_output_path(job: Job, started: datetime, run_id: str) -> Path:
    """``output.path`` with its placeholders filled: ``{name} {date} {time} {run_id}``.

    ``started`` is the run's start in local time: each night's run writes its own file.
    A bucket location (``s3://``, ``obs://``) is refused here: see ``resolve_output``.
    """
    text = resolve_output(job, started, run_id)
    if "://" in text:
        raise SettingError(f"output.path: a local path is needed here, got {text!r}")
    return Path(text)


def resolve_output(job: Job, started: datetime, run_id: str) -> str:
    """``output.path`` with its placeholders filled, as text: a local path or a URI."""
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
    text = template.format(
        name=job.name,
        date=started.strftime("%Y-%m-%d"),
        time=started.strftime("%H%M%S"),
        run_id=run_id,
    )
    suffix = "." + text.rpartition(".")[2].lower() if "." in text.rpartition("/")[2] else ""
    if suffix not in OUTPUT_SUFFIXES or text.endswith("/"):
        raise SettingError(f"output.path: must end in .parquet (or .csv, .jsonl), got {text!r}")
    if job.input.incremental and suffix != ".parquet":
        raise SettingError(
            f"output.path: input.incremental remembers items from a Parquet output; got {text!r}"
        )
    folder = template.rpartition("/")[0]
    if job.input.incremental and any(name for _, name, _, _ in string.Formatter().parse(folder)):
        raise SettingError(
            f"output.path: with input.incremental the output's folder must stay the same from "
            f"run to run (the remembered items live in its .batchrunner/ folder): put the "
            f"placeholders in the file name, e.g. 'out/{{name}}-{{date}}.parquet', "
            f"got {template!r}"
        )
    return text if "://" in text else str(Path(text))
