"""The job's settings as pydantic models: ``Job`` and its sections but ``[service]`` (see
``service``), each frozen and checked once, at load (``loading``)."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from batchrunner.job.common import _check_env_name, _check_http_url, _one_of, _Settings
from batchrunner.job.service import (
    ROWS_PLACEHOLDER,
    VALUES_PLACEHOLDER,
    ServiceSettings,
)

DEFAULT_MAX_REQUEST_BYTES = 12 * 1024 * 1024  # the gateway's request body limit (PROTOCOL.md)


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
