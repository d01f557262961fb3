"""The same job on Ray Data: ``batchrunner run JOB.toml --engine ray``.

Ray reads a table (``read_parquet`` / ``read_csv`` / ``read_json``); an image folder is
walked here, by the local engine's own walk (same extensions, links, manifest and keys), and
its files' paths handed to Ray in blocks. Each block goes through the same codec and the same
``Dispatcher`` as the local engine (retries, poison-row splitting, token renewal; each image
read, size-checked and sent as multipart by the actor) inside a callable class run by
``actors`` Ray actors, each with its own event loop, client session and concurrency bound (the
job's ``concurrency`` split across the actors, so the total in flight never exceeds it).

Each actor writes its finished block as a Parquet part into the run's state (see ``blocks``)
and hands the driver only the block's name and counts. When every block is done, the driver
checks the parts (rows and distinct keys against the input), puts them in a folder renamed
into place as ``<output>``, and writes ``<output>.summary.json`` beside it. A run that stops
(a refused token: exit 3; a crash) keeps its finished blocks: a re-run of the same job sends
only the others.

Tables are keyed by ``input.id_column`` (required: row numbers are not stable across Ray
blocks); a real service URL is needed (``embedded:`` runs in one process). This is the only
module that imports ray, and only when a run asks for it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from batchrunner.checkpoint import StatePaths
from batchrunner.credentials import read_credentials
from batchrunner.dispatch import Dispatcher
from batchrunner.engines.blocks import (
    RayState,
    block_name,
    open_ray_state,
    reusable_part,
    write_part,
)
from batchrunner.errors import (
    BatchRunnerError,
    CoverageError,
    InputError,
    RequestError,
    ServiceError,
    SettingError,
)
from batchrunner.items import STATUS_OK, Batch
from batchrunner.job.identity import job_identity
from batchrunner.job.output import resolve_output_path
from batchrunner.job.service import DEFAULT_OPENAI_KEY_ENV, DEFAULT_TOKEN_ENV, OPENAI_PROTOCOLS
from batchrunner.job.settings import IMAGES, TABULAR, Engine, InputKind, Job
from batchrunner.limiter import ConcurrencyLimiter, RateLimiter
from batchrunner.lock import JobLock
from batchrunner.report import FinishTally, ReadStatistics, RunStatistics
from batchrunner.sink import SEQ, outcome_table
from batchrunner.sources import ImageSource, Source
from batchrunner.sources.jsonsafe import json_safe
from batchrunner.storage import is_uri
from batchrunner.summary import BlockFigures
from batchrunner.wiring import (
    SUMMARY_SUFFIX,
    RayFigures,
    RunOutcome,
    RunReport,
    codec_for,
    job_summary,
    kind_of,
    new_run_id,
    open_source,
    retry_policy,
    service_client,
)
from batchrunner.writing import check_writable, write_json_atomically

log = logging.getLogger("batchrunner")

INSTALL_HINT = "--engine ray needs Ray: pip install 'batchrunner[ray]'"
# What an image block carries to its actor: each file's key and absolute path.
IMAGE_KEY, IMAGE_PATH = "_key", "_path"
# What an actor hands back for each block: its name, rows, whether an earlier run had
# finished it, and its statistics (a pickled ``RunStatistics``).
BLOCK_SCHEMA = pa.schema(
    [("block", pa.string()), ("rows", pa.int64()), ("reused", pa.bool_()), ("stats", pa.binary())]
)


def check_ray_job(job: Job, kind: InputKind = TABULAR) -> None:
    """Refuse, before Ray starts, what this engine does not do (``InputError``: exit 2)."""
    if job.service.embedded_model is not None:
        raise InputError(
            "--engine ray needs a service URL: the embedded service runs inside one process; "
            "start it with `batchrunner serve --model "
            f"{job.service.embedded_model}` and set service.url to its address"
        )
    if kind == TABULAR and job.input.id_column is None:
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


def block_items(job: Job, kind: InputKind) -> int:
    """Items per block: twice ``concurrency`` requests' worth (rows, or image files), so each
    actor keeps its share in flight; a block is also the unit of resume."""
    return (1 if kind == IMAGES else job.batch.size) * 2 * job.batch.max_in_flight


class BlockScorer:
    """A Ray actor's work: one block of input in, its part written, its counts out.

    A block whose part an earlier run of the same job finished is not sent again.
    """

    def __init__(
        self,
        job: Job,
        kind: InputKind,
        send: list[str],
        in_flight: int,
        environ: dict[str, str],
        parts: str,
    ) -> None:
        self._job = job
        self._kind = kind
        self._send = send
        self._in_flight = in_flight
        self._environ = environ
        self._state = RayState(Path(parts).parent)
        self._loop = asyncio.new_event_loop()

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return BLOCK_SCHEMA.empty_table()
        record = table.combine_chunks().to_batches()[0]
        keys = block_keys(self._job, self._kind, record)
        name = block_name(keys)
        part = self._state.part(name)
        stats = reusable_part(part)
        reused = stats is not None
        if stats is None:
            scoring = score_block(
                self._job, self._kind, record, keys, self._send, self._in_flight, self._environ
            )
            rows, stats = self._loop.run_until_complete(scoring)
            write_part(part, rows, stats)
        row = {"block": name, "rows": len(keys), "reused": reused, "stats": pickle.dumps(stats)}
        return pa.Table.from_pylist([row], schema=BLOCK_SCHEMA)


def block_keys(job: Job, kind: InputKind, record: pa.RecordBatch) -> list[str]:
    """Each row's key, as the local engine makes it: the id column as text, or an image's
    path relative to the input folder."""
    column = IMAGE_KEY if kind == IMAGES else job.input.id_column
    assert column is not None
    keys: list[str] = pc.cast(record.column(column), pa.string()).to_pylist()
    return keys


def secret_environ(job: Job, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the job's credentials are read from, and only those: what the actors
    get (as constructor arguments), since a worker's environment is not the driver's."""
    service = job.service
    names = [service.token_env or DEFAULT_TOKEN_ENV, "XDG_CACHE_HOME", "HOME"]
    if service.iam is not None and service.iam.password_env is not None:
        names.append(service.iam.password_env)
    if service.app is not None and service.app.appcode_env is not None:
        names.append(service.app.appcode_env)
    if service.protocol in OPENAI_PROTOCOLS:
        names.append((service.openai and service.openai.api_key_env) or DEFAULT_OPENAI_KEY_ENV)
    return {name: environ[name] for name in names if name in environ}


async def score_block(
    job: Job,
    kind: InputKind,
    record: pa.RecordBatch,
    keys: Sequence[str],
    send: list[str],
    in_flight: int,
    environ: Mapping[str, str],
) -> tuple[pa.Table, RunStatistics]:
    """Send a block as the local engine would (``batch.size`` rows a request, or one file,
    at most ``in_flight`` at once): its output rows, one per input row in input order, and
    its statistics."""
    batches = _batches(job, kind, record, keys, send)
    credentials = read_credentials(job.service, environ=environ)
    async with AsyncExitStack() as stack:
        client = service_client(job.service, job.service.url, credentials.app_code, in_flight)
        await stack.enter_async_context(client)
        share = in_flight / job.batch.max_in_flight
        dispatcher = Dispatcher(
            client,
            codec_for(job, kind),
            ConcurrencyLimiter(in_flight),
            retry_policy(job),
            tokens=credentials.tokens,
            max_request_bytes=job.batch.max_request_bytes,
            rate=RateLimiter(job.batch.rate_limit * share) if job.batch.rate_limit else None,
            rng=random.Random(),
            scrubber=credentials.scrubber(),
            unreachable_after=job.service.unreachable_after,
        )
        outcomes = await asyncio.gather(*(dispatcher.send(batch) for batch in batches))
    kept_names = list(record.schema.names) if job.output.keep_input else []
    hints: dict[str, pa.DataType] = {}
    tables = []
    finishing = FinishTally()
    for finished in outcomes:
        # As the local engine counts what it journals: rows by status, error rows by kind.
        for outcome in finished:
            finishing.count_outcome(outcome)
        tables.append(
            _without_seq(outcome_table(finished, kept_names, hints, job.output.result_fields))
        )
    reading = ReadStatistics(len(batches), sum(len(batch) for batch in batches))
    stats = RunStatistics(reading, dispatcher.statistics(), finishing.statistics())
    return _concat(tables), stats


def _batches(
    job: Job, kind: InputKind, record: pa.RecordBatch, keys: Sequence[str], send: list[str]
) -> list[Batch]:
    if kind == IMAGES:
        paths = record.column(IMAGE_PATH).to_pylist()
        return [
            Batch(seq=seq, keys=(key,), path=Path(path))
            for seq, (key, path) in enumerate(zip(keys, paths, strict=True))
        ]
    safe = json_safe(record.select(send))
    kept = record if job.output.keep_input else None
    size = job.batch.size
    return [
        Batch(
            seq=start // size,
            keys=keys[start : start + size],
            rows=safe.slice(start, size),
            kept=None if kept is None else kept.slice(start, size),
        )
        for start in range(0, record.num_rows, size)
    ]


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


def run_on_ray(job: Job, *, actors: int | None = None, resume: bool = True) -> RunReport:
    """Run ``job`` on Ray (the running one, ``RAY_ADDRESS``, or a local one started here).

    With ``resume``, blocks an unfinished run of the same job finished are not sent again.
    """
    ray = import_ray()
    if is_uri(job.input.path) or is_uri(job.output.path):
        raise SettingError(
            "--engine ray reads and writes local (or shared) paths only for now; a job whose "
            "input or output is in a bucket (s3://, obs://) runs with the local engine"
        )
    source = open_source(job)  # the same checks of the input as the local engine
    kind = kind_of(source)
    check_ray_job(job, kind)
    read_credentials(job.service)  # a missing secret stops the run here, before Ray starts
    environ = secret_environ(job, os.environ)
    started = datetime.now().astimezone()
    run_id = new_run_id(started)
    output = resolve_output_path(job, started, run_id).absolute()
    check_writable(output, folder=True)
    identity = job_identity(job, source.paths, kind=kind)
    with JobLock(StatePaths.beside(output, job.name).lock, job.name):
        state, note = open_ray_state(output, job.name, identity, resume=resume)
        if note:
            log.info("%s", note)
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        clock = time.perf_counter()
        scored = _score_blocks(ray, job, source, state, environ, actors, f"{run_id} -> {output}")
        if isinstance(scored, BatchRunnerError):
            # The failed execution keeps its actors (and their CPUs) while it is referenced,
            # through cycles in its traceback: collect it (its frame is gone), so that they
            # go now; a re-run in the same process would wait for them forever.
            gc.collect()
            raise _kept_for_resume(scored, state)
        blocks, keys, shares = scored
        stats = sum((pickle.loads(block["stats"]) for block in blocks), RunStatistics())
        names = [block["block"] for block in blocks]
        rows, ok = commit_parts(state, names, keys, output)
        seconds = time.perf_counter() - clock
        reused = sum(1 for block in blocks if block["reused"])
        outcome = (
            RunOutcome.TOO_MANY_ERRORS if rows and (rows - ok) / rows > job.max_error_rate
            else RunOutcome.DONE
        )  # fmt: skip
        snapshot = stats.snapshot(0, seconds, total=rows)
        summary = job_summary(job, snapshot, identity, run_id, output, started, outcome)
        summary = replace(
            summary, engine="ray", actors=shares, blocks=BlockFigures(len(names), reused)
        )
        summary_path = output.with_name(output.name + SUMMARY_SUFFIX)
        write_json_atomically(summary_path, summary.to_json())
        state.remove()
    return RunReport(
        engine=Engine.RAY,
        outcome=outcome,
        output=output,
        summary_path=summary_path,
        summary=summary,
        rows=rows,
        rows_ok=ok,
        rows_error=rows - ok,
        stats=snapshot,
        ray=RayFigures(shares, len(names), reused, seconds),
    )


def _score_blocks(
    ray: Any,
    job: Job,
    source: Source,
    state: RayState,
    environ: dict[str, str],
    actors: int | None,
    run: str,
) -> tuple[list[dict[str, Any]], pa.Array, int] | BatchRunnerError:
    """Every block through the actors: their rows, the input's keys and the actors used;
    or, returned (not raised, so that nothing refers to Ray's execution), why it failed."""
    kind = kind_of(source)
    context = ray.data.DataContext.get_current()
    if hasattr(context, "raise_original_map_exception"):  # a refused token, as itself
        context.raise_original_map_exception = True
    # Blocks in input order: a re-run cuts the same blocks, and finds their parts.
    context.execution_options.preserve_order = True
    count = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    size = block_items(job, kind)
    if isinstance(source, ImageSource):
        image_keys, tables = _image_blocks(source, size)
        dataset = ray.data.from_arrow(tables)
        batch_size = None  # one call per block, as cut here
        count = min(count, len(tables))  # no actor without a block
    else:
        # Workers have their own cwd.
        paths = [str(p.absolute()) if isinstance(p, Path) else str(p) for p in source.paths]
        dataset = _read(ray, source.format, paths, job)
        batch_size = size
    shares = split_concurrency(job.batch.max_in_flight, count)
    # Ray's actors are alike (one constructor): each gets the smallest share, so the total
    # in flight is never above the job's concurrency (7 over 2 actors: 3 each).
    each = shares[-1]
    log.info(
        "ray run %s via %s (%d actors, %s in flight each, blocks of %s %s)",
        run, job.service.url, len(shares), each, f"{size:,}",
        "files" if kind == IMAGES else "rows",
    )  # fmt: skip
    scored = dataset.map_batches(
        BlockScorer,
        fn_constructor_args=(job, kind, list(source.send_columns), each, environ, str(state.parts)),
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=len(shares)),
        num_cpus=0.5,
    )
    try:
        blocks: list[dict[str, Any]] = scored.take_all()
    except (ray.exceptions.RayError, BatchRunnerError) as exc:
        return _failure(exc)
    keys = image_keys if kind == IMAGES else source_keys(paths, source.format, job)
    return blocks, keys, len(shares)


def _image_blocks(source: ImageSource, size: int) -> tuple[pa.Array, list[pa.Table]]:
    """Every file's key (the local engine's walk), and the files in blocks of ``size``."""
    keys: list[str] = []
    files: list[str] = []
    for batch in source.iter_batches(1):
        assert batch.path is not None
        keys.append(batch.keys[0])
        path = batch.path
        files.append(str(path.absolute()) if isinstance(path, Path) else str(path))
    tables = [
        pa.table({IMAGE_KEY: keys[start : start + size], IMAGE_PATH: files[start : start + size]})
        for start in range(0, len(keys), size)
    ]
    empty = pa.table({IMAGE_KEY: pa.array([], pa.string()), IMAGE_PATH: pa.array([], pa.string())})
    return pa.array(keys, pa.string()), tables or [empty]


def commit_parts(
    state: RayState, names: Sequence[str], keys: pa.Array, output: Path
) -> tuple[int, int]:
    """Put the parts of ``names`` (this run's blocks, in input order) in a folder, check it
    holds one row per input item (``CoverageError``), and rename it into place as
    ``output``. Rows and ``ok`` rows; the state keeps its parts until the caller drops it."""
    work = output.with_name(f".{output.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for index, name in enumerate(names):
        # A link, not a move: a failed check leaves the state whole for another try. A
        # block met twice (the same keys twice over in the input) is there twice.
        _link_or_copy(state.part(name), work / f"part-{index:08d}.parquet")
    try:
        result = check_output(work, keys)
    except CoverageError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    work.rename(output)
    return result


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _kept_for_resume(error: BatchRunnerError, state: RayState) -> BatchRunnerError:
    """``error``, saying that the finished blocks are kept and a re-run resumes."""
    if not isinstance(error, ServiceError):
        return error
    kept = len(state.finished_parts())
    return type(error)(
        f"{error}; {kept:,} finished blocks are kept in {state.parts}: re-run the same "
        "command to resume (they are not sent again)"
    )


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
            # A new error, with no reference to Ray's (see run_on_ray), and without the
            # lines Ray adds to its message.
            message = str(current).strip().splitlines()[0]
            if isinstance(current, RequestError):  # its own constructor: not meant to escape
                return ServiceError(message)
            return type(current)(message)
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
    dataset = ds.dataset(str(folder), format="parquet")
    columns = ["_key", "_status"]
    if dataset.files:
        table = dataset.to_table(columns=columns)
    else:  # an empty input: no blocks, no parts
        table = pa.table({name: pa.array([], pa.string()) for name in columns})
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
