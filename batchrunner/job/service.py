"""``[service]``: where requests go, how they authenticate, and the sections of each wire
format (``[service.json]``, ``[service.kserve]``, ``[service.oip]``, ``[service.openai]``),
with the faults of the embedded service (``[service.embedded]``)."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal, get_args

from pydantic import Field, field_validator, model_validator

from batchrunner.job.common import (
    _check_env_name,
    _check_http_url,
    _one_of,
    _require_one_secret_source,
    _Settings,
)

EMBEDDED_PREFIX = "embedded:"
DEFAULT_TOKEN_ENV = "MODELARTS_TOKEN"
# A real IAM token lives 24 h; it is renewed this long before it ends (at the latest).
DEFAULT_RENEW_BEFORE_S = 300.0

# The largest answer kept (decompressed): the gateway's 12 MB, with room for compression.
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# The run stops when no request has succeeded for this long and the latest ones could not
# connect or timed out: the service cannot be reached.
DEFAULT_UNREACHABLE_AFTER = 120.0


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
