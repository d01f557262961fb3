"""The same job on Ray Data: ``batchrunner run JOB.toml --engine ray``.

Ray reads the input (``read_parquet`` / ``read_csv`` / ``read_json``); each block goes
through the same codec and the same ``Dispatcher`` as the local engine (retries, poison-row
splitting, token renewal) inside a callable class run by ``actors`` Ray actors, each with its
own event loop, client session and concurrency bound (the job's ``concurrency`` split across
the actors, so the total in flight never exceeds it). Ray writes the rows to a folder of
Parquet parts, checked (rows and distinct keys against the input) before it is renamed
into place as ``<output>``.

This first version: table input only, keyed by ``input.id_column`` (required: row numbers
are not stable across Ray blocks), a real service URL (``embedded:`` runs in one process),
no resume (a re-run starts fresh and replaces the output folder). This is the only module
that imports ray, and only when a run asks for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from batchrunner.client import ServiceClient
from batchrunner.credentials import read_credentials
from batchrunner.dispatch import Dispatcher
from batchrunner.errors import BatchRunnerError, CoverageError, InputError, ServiceError
from batchrunner.items import STATUS_OK, Batch
from batchrunner.job import DEFAULT_TOKEN_ENV, IMAGES, TABULAR, Job, resolve_output_path
from batchrunner.limiter import ConcurrencyLimiter, RateLimiter
from batchrunner.report import RunStats
from batchrunner.retry import RetryPolicy
from batchrunner.runner import codec_for, kind_of, new_run_id, open_source
from batchrunner.sink import SEQ, outcome_table
from batchrunner.sources.jsonsafe import json_safe

log = logging.getLogger("batchrunner")

INSTALL_HINT = "--engine ray needs Ray: pip install 'batchrunner[ray]'"


@dataclass(frozen=True, slots=True)
class RayResult:
    """A finished Ray run: the output folder and its rows by status."""

    output: Path
    rows: int
    rows_ok: int
    rows_error: int
    actors: int
    seconds: float

    @property
    def error_rate(self) -> float:
        return self.rows_error / self.rows if self.rows else 0.0


def check_ray_job(job: Job) -> None:
    """Refuse, before Ray starts, what this engine does not do (``InputError``: exit 2)."""
    if job.service.embedded_model is not None:
        raise InputError(
            "--engine ray needs a service URL: the embedded service runs inside one process; "
            "start it with `batchrunner serve --model "
            f"{job.service.embedded_model}` and set service.url to its address"
        )
    if job.input.id_column is None:
        raise InputError(
            "--engine ray needs input.id_column: rows are keyed by it (row numbers are not "
            "stable across Ray blocks)"
        )
    if job.batch.concurrency == "auto":
        raise InputError('--engine ray needs a fixed batch.concurrency, not "auto"')
    if job.input.incremental:
        raise InputError("--engine ray does not do input.incremental yet")


def split_concurrency(total: int, actors: int) -> list[int]:
    """``total`` requests in flight shared by at most ``actors`` actors (each gets >= 1)."""
    actors = max(1, min(actors, total))
    share, extra = divmod(total, actors)
    return [share + (1 if index < extra else 0) for index in range(actors)]


class BlockScorer:
    """A Ray actor's work: one block of input rows in, the same block's output rows out."""

    def __init__(self, job: Job, send: list[str], in_flight: int, environ: dict[str, str]) -> None:
        self._job = job
        self._send = send
        self._in_flight = in_flight
        self._environ = environ
        self._loop = asyncio.new_event_loop()

    def __call__(self, table: pa.Table) -> pa.Table:
        scoring = score_block(self._job, table, self._send, self._in_flight, self._environ)
        return self._loop.run_until_complete(scoring)


def secret_environ(job: Job, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the job's credentials are read from, and only those: what the actors
    get (as constructor arguments), since a worker's environment is not the driver's."""
    service = job.service
    names = [service.token_env or DEFAULT_TOKEN_ENV, "XDG_CACHE_HOME", "HOME"]
    if service.iam is not None and service.iam.password_env is not None:
        names.append(service.iam.password_env)
    if service.app is not None and service.app.appcode_env is not None:
        names.append(service.app.appcode_env)
    return {name: environ[name] for name in names if name in environ}


async def score_block(
    job: Job, table: pa.Table, send: list[str], in_flight: int, environ: Mapping[str, str]
) -> pa.Table:
    """Send ``table``'s rows as the local engine would (``batch.size`` rows a request, at
    most ``in_flight`` at once); their output rows, one per input row, in input order."""
    id_column = job.input.id_column
    assert id_column is not None
    rows = table.combine_chunks().to_batches()
    record = rows[0] if rows else pa.RecordBatch.from_pylist([], schema=table.schema)
    keys = pc.cast(record.column(id_column), pa.string()).to_pylist()
    safe = json_safe(record.select(send))
    kept = record if job.output.keep_input else None
    size = job.batch.size
    batches = [
        Batch(
            seq=start // size,
            keys=keys[start : start + size],
            rows=safe.slice(start, size),
            kept=None if kept is None else kept.slice(start, size),
        )
        for start in range(0, record.num_rows, size)
    ]
    credentials = read_credentials(job.service, environ=environ)
    retry = job.retry
    policy = RetryPolicy(retry.max_attempts, retry.backoff_initial, retry.backoff_max)
    service = job.service
    async with AsyncExitStack() as stack:
        client = ServiceClient(
            service.url,
            None,
            app_code=credentials.app_code,
            timeout=service.timeout,
            connect_timeout=service.connect_timeout,
            verify_tls=service.verify_tls,
            ca_bundle=service.ca_bundle,
            max_connections=in_flight,
        )
        await stack.enter_async_context(client)
        share = in_flight / job.batch.max_in_flight
        dispatcher = Dispatcher(
            client,
            codec_for(job, TABULAR),
            ConcurrencyLimiter(in_flight),
            policy,
            RunStats(),
            tokens=credentials.tokens,
            max_request_bytes=job.batch.max_request_bytes,
            rate=RateLimiter(job.batch.rate_limit * share) if job.batch.rate_limit else None,
            rng=random.Random(),
        )
        outcomes = await asyncio.gather(*(dispatcher.send(batch) for batch in batches))
    kept_names = kept.schema.names if kept is not None else []
    hints: dict[str, pa.DataType] = {}
    tables = [_without_seq(outcome_table(finished, kept_names, hints)) for finished in outcomes]
    return _concat(tables)


def _without_seq(batch: pa.RecordBatch) -> pa.Table:
    return pa.Table.from_batches([batch]).drop_columns([SEQ])


def _concat(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


def import_ray() -> Any:
    """The ``ray`` module, or ``InputError`` (exit 2) saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return ray


def run_on_ray(job: Job, *, actors: int | None = None) -> RayResult:
    """Run ``job`` on Ray (the running one, ``RAY_ADDRESS``, or a local one started here)."""
    ray = import_ray()
    check_ray_job(job)
    source = open_source(job)  # the same checks of the input as the local engine
    if kind_of(source) == IMAGES:
        raise InputError("--engine ray reads tables only for now; run image input locally")
    read_credentials(job.service)  # a missing secret stops the run here, before Ray starts
    environ = secret_environ(job, os.environ)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    if hasattr(context, "raise_original_map_exception"):  # a refused token says so, as itself
        context.raise_original_map_exception = True
    started = datetime.now().astimezone()
    output = resolve_output_path(job, started, new_run_id(started)).absolute()
    work = output.with_name(f".{output.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    clock = time.perf_counter()
    count = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    shares = split_concurrency(job.batch.max_in_flight, count)
    # Ray's actors are alike (one constructor): each gets the smallest share, so the total in
    # flight is never above the job's concurrency (7 over 2 actors: 3 each).
    each = shares[-1]
    paths = [str(path.absolute()) for path in source.paths]  # workers have their own cwd
    dataset = _read(ray, source.format, paths, job)
    log.info(
        "ray run: %s -> %s via %s (%d actors, %s in flight each)",
        job.input.path, output, job.service.url, len(shares), each,
    )  # fmt: skip
    scored = dataset.map_batches(
        BlockScorer,
        fn_constructor_args=(job, list(source.send_columns), each, environ),
        batch_format="pyarrow",
        batch_size=job.batch.size * each * 8,
        compute=ray.data.ActorPoolStrategy(size=len(shares)),
        num_cpus=0.5,
    )
    try:
        scored.write_parquet(str(work))
    except (ray.exceptions.RayError, BatchRunnerError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise _failure(exc) from None
    result = check_output(work, source_keys(paths, source.format, job))
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    output.parent.mkdir(parents=True, exist_ok=True)
    work.rename(output)
    rows, ok = result
    return RayResult(output, rows, ok, rows - ok, len(shares), time.perf_counter() - clock)


def _read(ray: Any, format: str, paths: list[str], job: Job) -> Any:
    if format == "parquet":
        return ray.data.read_parquet(paths)
    if format == "jsonl":
        return ray.data.read_json(paths, lines=True)
    import pyarrow.csv as csv

    delimiter = job.input.csv_delimiter or ("\t" if format == "tsv" else ",")
    return ray.data.read_csv(paths, parse_options=csv.ParseOptions(delimiter=delimiter))


def _failure(exc: BaseException) -> BatchRunnerError:
    """Our own error behind Ray's wrappers (a refused token: exit 3), else Ray's last line."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # Ray re-raises a task's error as a class derived from both its own and ours: the
        # error itself is the one whose class is ours.
        if (
            isinstance(current, BatchRunnerError)
            and type(current).__module__ == "batchrunner.errors"
        ):
            return current
        pending += [current.__context__, current.__cause__, getattr(current, "cause", None)]
    text = str(exc).strip()
    return ServiceError(f"the Ray run failed: {text.splitlines()[-1] if text else exc!r}")


def source_keys(paths: list[str], format: str, job: Job) -> pa.Array:
    """Every input row's key, as the engine makes it (the id column as text)."""
    assert job.input.id_column is not None
    fmt = "json" if format == "jsonl" else ("csv" if format in ("csv", "tsv") else format)
    options: dict[str, Any] = {}
    if fmt == "csv":
        import pyarrow.csv as csv

        delimiter = job.input.csv_delimiter or ("\t" if format == "tsv" else ",")
        options["format"] = ds.CsvFileFormat(parse_options=csv.ParseOptions(delimiter=delimiter))
    dataset = ds.dataset(paths, format=options.get("format", fmt))
    column = dataset.to_table(columns=[job.input.id_column]).column(0)
    return pc.cast(column, pa.string())


def check_output(folder: Path, keys: pa.Array) -> tuple[int, int]:
    """Rows and ``ok`` rows of the written folder, after checking it holds one row per input
    row: as many rows, and the same distinct keys, as the input (``CoverageError``)."""
    table = ds.dataset(str(folder), format="parquet").to_table(columns=["_key", "_status"])
    written = table.column("_key")
    if table.num_rows != len(keys):
        raise CoverageError(
            f"the Ray output has {table.num_rows:,} rows for {len(keys):,} input rows; "
            "nothing was committed"
        )
    expected = pc.unique(keys)
    got = pc.unique(written)
    if len(got) != len(expected) or not pc.all(pc.is_in(expected, value_set=got)).as_py():
        raise CoverageError("the Ray output's keys are not the input's; nothing was committed")
    ok = pc.sum(pc.equal(table.column("_status"), STATUS_OK)).as_py() or 0
    return table.num_rows, int(ok)
