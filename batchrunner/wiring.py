"""What a run needs, whichever engine makes it: the wiring both engines share.

The job's input opened as a source, its protocol's codec, the service client, the
concurrency limiter and retry policy, where the output goes, the plan that ``validate`` and
``--dry-run`` show, the run summary, and the one result type both engines return
(``RunReport``, with a ``RunOutcome``). The engines (``engines.local``, the asyncio
pipeline; ``engines.ray``) build on this and never on each other.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import uuid
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchrunner.auth import Secret, mask_headers
from batchrunner.client import APP_CODE_HEADER, TOKEN_HEADER, ServiceClient
from batchrunner.credentials import (
    describe_auth,
    describe_storage,
    open_store,
    read_credentials,
)
from batchrunner.errors import (
    ErrorKind,
    ExitCode,
    RequestError,
    SettingError,
    did_you_mean,
)
from batchrunner.job.identity import fingerprint
from batchrunner.job.loading import check_input_kind
from batchrunner.job.output import resolve_output
from batchrunner.job.service import OPENAI_PROTOCOLS, ServiceSettings
from batchrunner.job.settings import IMAGES, TABULAR, Engine, InputKind, Job
from batchrunner.limiter import AdaptiveLimiter, ConcurrencyLimiter
from batchrunner.protocols import Codec
from batchrunner.protocols.jsonbody import JsonCodec, check_template
from batchrunner.protocols.kserve import KServeCodec
from batchrunner.protocols.mlflow import MlflowCodec
from batchrunner.protocols.modelarts import FileCodec, TextCodec
from batchrunner.protocols.oip import OipCodec
from batchrunner.protocols.openai import check_prompt, endpoint_url, openai_codec
from batchrunner.protocols.openaibatch import BatchFileCodec
from batchrunner.report import StatsSnapshot
from batchrunner.retry import RetryPolicy
from batchrunner.sources import Source, input_kind, open_images, open_tabular
from batchrunner.sources.batchfile import open_batch_file
from batchrunner.startup import ARROW_POOL_VARIABLE, LEAN_POOL
from batchrunner.storage import ObjectPath, ObjectStore, is_uri
from batchrunner.summary import RunSummary, build_summary
from batchrunner.writing import check_writable

log = logging.getLogger("batchrunner")

NOT_SENT = ErrorKind.NOT_SENT.value  # the error kind of rows a stopped run did not send
SUMMARY_SUFFIX = ".summary.json"  # the summary's file name: the output's, with this added


class RunOutcome(enum.StrEnum):
    """How a finished run went."""

    DONE = "done"  # error rows, if any, within max_error_rate
    TOO_MANY_ERRORS = "too_many_errors"  # the output is written, but over max_error_rate
    ABORTED = "aborted"  # a fatal service condition stopped it; re-running resumes

    @property
    def exit_code(self) -> ExitCode:
        """The command line's exit code for a run that ended so."""
        return _EXIT_CODES[self]


_EXIT_CODES = {
    RunOutcome.DONE: ExitCode.OK,
    RunOutcome.TOO_MANY_ERRORS: ExitCode.TOO_MANY_ERRORS,
    RunOutcome.ABORTED: ExitCode.ABORTED,
}


@dataclass(frozen=True, slots=True)
class RayFigures:
    """What only a Ray run has to tell: its actors and blocks."""

    actors: int
    blocks: int
    blocks_reused: int  # finished by an earlier, interrupted run of the job
    seconds: float  # from the start of Ray's execution to the checked output


@dataclass(frozen=True, slots=True)
class RunReport:
    """A finished run, whichever the engine: where its output is, and how it went."""

    engine: Engine
    outcome: RunOutcome
    output: Path | ObjectPath  # a file (local, or in a bucket) or a folder of parts (ray)
    summary_path: Path | ObjectPath  # <output>.summary.json
    summary: RunSummary  # what summary_path holds
    rows: int  # finished rows (a Ray run: the rows its parts hold)
    rows_ok: int
    rows_error: int
    stats: StatsSnapshot  # the figures at the end: the summary was built from them
    abort_reason: str | None = None  # with RunOutcome.ABORTED: why
    ray: RayFigures | None = None  # with Engine.RAY

    @property
    def exit_code(self) -> int:
        """The command line's exit code for this run (0, 1 or 3)."""
        return int(self.outcome.exit_code)

    @property
    def error_rate(self) -> float:
        finished = self.rows_ok + self.rows_error
        return self.rows_error / finished if finished else 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run would do: shown by ``validate`` and ``run --dry-run``; nothing is sent."""

    job: Job
    kind: InputKind
    files: list[Path | ObjectPath]
    format: str
    send_columns: list[str]
    key: str  # what each row's key is, for people
    rows: int | None
    batch_size: int  # items per request (image input: 1)
    batches: int | None
    output: Path | ObjectPath
    url: str
    auth: str
    headers: dict[str, str]
    first_request: bytes | None
    first_request_preview: str | None = None  # a body that is not text, as shown to people
    first_request_error: str | None = None  # why the first item would not be sent
    send_schema: pa.Schema | None = None  # the Arrow types of the columns sent (tables)
    storage: str | None = None  # the object store and where its keys come from (no key)


def job_store(job: Job) -> ObjectStore | None:
    """The object store of a job that reads or writes a bucket; None for local paths only."""
    if is_uri(job.input.path) or is_uri(job.output.path):
        return open_store(job.storage)
    return None


def locate_output(
    job: Job, started: datetime, run_id: str, store: ObjectStore | None
) -> Path | ObjectPath:
    """Where the run's output goes: a local path, or an object of ``store``."""
    text = resolve_output(job, started, run_id)
    if store is not None and is_uri(text):
        return store.locate(text)
    return Path(text)


def writable_output(
    job: Job, started: datetime, run_id: str, store: ObjectStore | None, *, folder: bool = False
) -> Path | ObjectPath:
    """Where the run's output goes (``locate_output``), checked writable before any request:
    a probe object in its bucket (a refused key stops here), or its local folder (``folder``:
    an output that is itself a folder, as Ray writes one)."""
    output = locate_output(job, started, run_id, store)
    if isinstance(output, ObjectPath):
        output.store.check_writable(output)
    else:
        check_writable(output, folder=folder)
    return output


def open_source(job: Job, store: ObjectStore | None = None) -> Source:
    """Open and check the job's input (raises ``InputError`` before anything is sent).

    A folder, glob or manifest of images (or ``input.format = "images"``) is image input;
    anything else is a table. Settings that do not apply to the kind found are refused.
    ``store`` reads an input in a bucket.
    """
    settings = job.input
    if job.service.protocol == "openai-batch":
        return open_batch_file(settings.path)
    kind = input_kind(settings.path, settings.format, settings.extensions, store)
    check_input_kind(job, kind, settings.path)
    if kind == IMAGES:
        return open_images(
            settings.path,
            extensions=settings.extensions,
            recursive=settings.recursive,
            follow_links=settings.follow_links,
            store=store,
        )
    return open_tabular(
        settings.path,
        format=settings.format,
        id_column=settings.id_column,
        columns=settings.columns,
        keep_input=job.output.keep_input,
        csv_delimiter=settings.csv_delimiter,
        encoding=settings.encoding,
        binary=settings.binary,
        block_bytes=settings.block_size,
        store=store,
    )


def kind_of(source: Source) -> InputKind:
    """``IMAGES`` for image input, else ``TABULAR``."""
    return IMAGES if source.format == IMAGES else TABULAR


def batch_size_for(job: Job, kind: InputKind) -> int:
    """Items per request: ``batch.size`` rows for a table (one for a one-row JSON body),
    one file for image input."""
    return 1 if kind == IMAGES else job.rows_per_request


def check_service_url(service: ServiceSettings) -> None:
    """Raise ``SettingError`` for an ``embedded:<model>`` URL of a model there is none of."""
    model = service.embedded_model
    if model is None:
        return
    from batchrunner.service import MODEL_NAMES

    if model not in MODEL_NAMES:
        raise SettingError(
            f"service.url: no embedded model {model!r}{did_you_mean(model, MODEL_NAMES)}; "
            f"the embedded models are: {', '.join(MODEL_NAMES)}"
        )


def plan_job(
    job: Job, *, limit: int | None = None, count: bool = True, folder_output: bool = False
) -> Plan:
    """Check the job, its token source, its input and its output path, and describe the run;
    send nothing. ``folder_output``: the output is a folder (``--engine ray``).

    A bucket is checked too: the input listed, the output's place written to (a probe
    object, removed), so that a missing bucket or a refused key stops here."""
    check_service_url(job.service)
    store = job_store(job)
    source = open_source(job, store)
    kind = kind_of(source)
    size = batch_size_for(job, kind)
    sends_token, sends_app_code = True, False  # the embedded service: its own token
    if job.service.embedded_model is None:
        # A missing secret is an error now, not at the first request. No IAM login: a plan
        # sends nothing, to IAM neither.
        credentials = read_credentials(job.service)
        sends_token = credentials.tokens is not None
        sends_app_code = credentials.app_code is not None
    rows = source.count_rows()
    if rows is None and count:
        rows = source.scan_count()
    if rows is not None and limit is not None:
        rows = min(rows, limit)
    batches = None if rows is None else -(-rows // size)
    if kind == TABULAR and job.service.protocol == "json":
        check_template(job.service.json_body.request, list(source.send_columns))
    if kind == TABULAR and job.service.openai is not None and job.service.openai.prompt:
        check_prompt(job.service.openai.prompt, list(source.send_columns))
    first = next(source.iter_batches(size, limit=limit), None)
    body = preview = refused = None
    headers = {}
    if sends_token and job.service.protocol in OPENAI_PROTOCOLS:
        headers["Authorization"] = "Bearer <API key>"
    elif sends_token:
        headers[TOKEN_HEADER] = "<token>"
    if sends_app_code:
        headers[APP_CODE_HEADER] = "<AppCode>"
    if first is not None:
        try:
            request = codec_for(job, kind).encode(first, str(uuid.uuid4()))
        except RequestError as exc:
            refused = f"{first.keys[0]}: {exc.message}"
        else:
            body, preview = request.body, request.preview
            headers["Content-Type"] = request.content_type
    if kind == IMAGES:
        sends = [f"each file as form field {job.service.file_field!r} (multipart/form-data)"]
        key = "the file's path relative to the input folder"
    else:
        sends = list(source.send_columns)
        key = job.input.id_column or "row number"
    now = datetime.now()
    output = writable_output(job, now, new_run_id(now), store, folder=folder_output)
    return Plan(
        job=job,
        kind=kind,
        files=list(source.paths),
        format=source.format,
        send_columns=sends,
        key=key,
        rows=rows,
        batch_size=size,
        batches=batches,
        output=output,
        url=job.service.url,
        auth=describe_auth(job.service),
        headers=mask_headers(headers),
        first_request=body,
        first_request_preview=preview,
        storage=None if store is None else describe_storage(job.storage),
        first_request_error=refused,
        send_schema=first.rows.schema if first is not None and first.rows is not None else None,
    )


def codec_for(job: Job, kind: InputKind) -> Codec:
    """The codec of the job's protocol and input kind: text input for tables, file input
    for images (a file whose request would be over ``batch.max_request_bytes`` is refused
    unsent)."""
    service = job.service
    if kind == IMAGES:
        if service.protocol != "modelarts":
            raise SettingError(
                f"service.protocol = {service.protocol!r} sends rows of a table; image input "
                "is sent with protocol = 'modelarts' (file input)"
            )
        return FileCodec(service.file_field, job.batch.max_request_bytes)
    if service.protocol == "json":
        body = service.json_body
        return JsonCodec(body.request, body.response, batched=body.batched)
    if service.protocol == "kserve-v1":
        kserve = service.kserve
        return KServeCodec(instance_format=kserve.instance_format if kserve else "values")
    if service.protocol == "oip-v2":
        oip = service.oip
        if oip is None:
            return OipCodec()
        return OipCodec(
            layout=oip.layout,
            input_name=oip.input_name,
            outputs=oip.outputs,
            content_type=oip.content_type or None,
        )
    if service.protocol == "mlflow":
        return MlflowCodec()
    if service.protocol == "openai-batch":
        return BatchFileCodec()
    if service.openai is not None:
        return openai_codec(job)
    return TextCodec()


def retry_policy(job: Job) -> RetryPolicy:
    """The job's ``[retry]`` settings as a policy."""
    retry = job.retry
    openai = job.service.openai
    return RetryPolicy(
        retry.max_attempts,
        retry.backoff_initial,
        retry.backoff_max,
        retry.retry_after_max,
        attempts_by_kind=(("schema_mismatch", openai.schema_attempts),) if openai else (),
    )


def service_client(
    service: ServiceSettings, url: str, app_code: Secret | None, max_connections: int
) -> ServiceClient:
    """A client of the service at ``url`` with the job's ``[service]`` settings; each
    request carries the token the caller gives it."""
    openai = service.protocol in OPENAI_PROTOCOLS
    return ServiceClient(
        endpoint_url(url, service.protocol) if openai else url,
        None,
        app_code=app_code,
        bearer=openai,
        timeout=service.timeout,
        connect_timeout=service.connect_timeout,
        verify_tls=service.verify_tls,
        ca_bundle=service.ca_bundle,
        max_connections=max_connections,
        max_response_bytes=service.max_response_bytes,
    )


def use_lean_memory_pool() -> None:
    """Have all of Arrow allocate from the lean pool (``startup.LEAN_POOL``), unless another
    pool was chosen with ``ARROW_DEFAULT_MEMORY_POOL``. Arrow's C++ code (the Parquet reader
    and writer) allocates from the pool that variable named when pyarrow loaded: the console
    names it first (``startup.arrow_pool_first``); here the Python side follows. pyarrow's
    default, mimalloc, keeps what a run's batches used (160-185 MB on a 1,000,000-row run
    instead of about 145), and two allocators side by side each keep what they freed. Freed
    memory is given back as a night reads (``incremental.release_unused``); jemalloc's decay
    is set to give it back at once."""
    chosen = os.environ.get(ARROW_POOL_VARIABLE) or LEAN_POOL
    with suppress(NotImplementedError, pa.ArrowNotImplementedError):
        pool = {"system": pa.system_memory_pool, "jemalloc": pa.jemalloc_memory_pool}.get(chosen)
        if pool is not None and pa.default_memory_pool().backend_name != chosen:
            pa.set_memory_pool(pool())
        if chosen == "jemalloc":
            pa.jemalloc_set_decay_ms(0)


def make_limiter(job: Job) -> ConcurrencyLimiter:
    """A fixed bound, or with ``concurrency = "auto"`` one that finds the service's capacity."""
    batch = job.batch
    if batch.concurrency == "auto":
        return AdaptiveLimiter(initial=min(4, batch.max_concurrency), maximum=batch.max_concurrency)
    return ConcurrencyLimiter(batch.concurrency)


def job_summary(
    job: Job,
    snapshot: StatsSnapshot,
    identity: Mapping[str, Any],
    run_id: str,
    output: Path | ObjectPath,
    started: datetime,
    outcome: str,
) -> RunSummary:
    """The run summary of a run of ``job`` (either engine), finished now."""
    return build_summary(
        snapshot,
        job_name=job.name,
        fingerprint=fingerprint(identity),
        run_id=run_id,
        input_path=job.input.path,
        output_path=str(output),
        url=job.service.url,
        started=started.isoformat(timespec="seconds"),
        finished=datetime.now().astimezone().isoformat(timespec="seconds"),
        outcome=outcome,
        max_error_rate=job.max_error_rate,
    )


def new_run_id(started: datetime) -> str:
    return f"{started:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
