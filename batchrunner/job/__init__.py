"""The job: a TOML file (or command-line options) validated once, at load, into frozen settings.

Loading goes: parse TOML -> apply overrides (``--input``, ``--set section.key=value``, ...) ->
expand ``${ENV}`` in strings -> validate. Every problem is a ``SettingError`` naming the
setting (``batch.size must be >= 1, got 0``), with a "did you mean" for unknown keys.

The package's modules, each importing only those above it:

    common      the frozen base model; checks of secret pointers and URLs
    service     ``[service]`` and its sections (IAM, AppCode, each wire format, faults)
    settings    ``Job`` and its other sections (input, batch, retry, output, ...)
    loading     ``load_job``: TOML, overrides, ``${ENV}``, validation; the input kind check
    identity    what makes two runs the same job, its fingerprint, the changes in words
    output      ``output.path`` with its placeholders filled

Everything public is importable from ``batchrunner.job`` itself.
"""

from __future__ import annotations

from batchrunner.job.common import SECRET_POINTERS
from batchrunner.job.identity import (
    INCREMENTAL_IDENTITY,
    fingerprint,
    identity_changes,
    job_identity,
)
from batchrunner.job.loading import (
    OPTION_SETTINGS,
    check_input_kind,
    load_job,
    parse_assignment,
)
from batchrunner.job.output import (
    OUTPUT_PLACEHOLDERS,
    OUTPUT_SUFFIXES,
    output_name_glob,
    resolve_output,
    resolve_output_path,
)
from batchrunner.job.service import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_OPENAI_KEY_ENV,
    DEFAULT_RENEW_BEFORE_S,
    DEFAULT_TOKEN_ENV,
    DEFAULT_UNREACHABLE_AFTER,
    EMBEDDED_PREFIX,
    OPENAI_PROTOCOLS,
    PROTOCOLS,
    ROWS_PLACEHOLDER,
    TOKEN_SOURCES,
    VALUES_PLACEHOLDER,
    AppSettings,
    EmbeddedSettings,
    IamSettings,
    JsonBodySettings,
    KServeSettings,
    OipSettings,
    OpenAISettings,
    Protocol,
    ServiceSettings,
)
from batchrunner.job.settings import (
    DEFAULT_MAX_REQUEST_BYTES,
    IMAGES,
    NOTIFY_EVENTS,
    TABULAR,
    BatchSettings,
    Engine,
    InputKind,
    InputSettings,
    Job,
    NotifySettings,
    OutputSettings,
    ReportSettings,
    RetrySettings,
    RunSettings,
    StorageSettings,
)

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_OPENAI_KEY_ENV",
    "DEFAULT_RENEW_BEFORE_S",
    "DEFAULT_TOKEN_ENV",
    "DEFAULT_UNREACHABLE_AFTER",
    "EMBEDDED_PREFIX",
    "IMAGES",
    "INCREMENTAL_IDENTITY",
    "NOTIFY_EVENTS",
    "OPENAI_PROTOCOLS",
    "OPTION_SETTINGS",
    "OUTPUT_PLACEHOLDERS",
    "OUTPUT_SUFFIXES",
    "PROTOCOLS",
    "ROWS_PLACEHOLDER",
    "SECRET_POINTERS",
    "TABULAR",
    "TOKEN_SOURCES",
    "VALUES_PLACEHOLDER",
    "AppSettings",
    "BatchSettings",
    "EmbeddedSettings",
    "Engine",
    "IamSettings",
    "InputKind",
    "InputSettings",
    "Job",
    "JsonBodySettings",
    "KServeSettings",
    "NotifySettings",
    "OipSettings",
    "OpenAISettings",
    "OutputSettings",
    "Protocol",
    "ReportSettings",
    "RetrySettings",
    "RunSettings",
    "ServiceSettings",
    "StorageSettings",
    "check_input_kind",
    "fingerprint",
    "identity_changes",
    "job_identity",
    "load_job",
    "output_name_glob",
    "parse_assignment",
    "resolve_output",
    "resolve_output_path",
]
