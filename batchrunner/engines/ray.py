"""The same job on Ray Data: ``batchrunner run JOB.toml --engine ray``; the driver's side.

Ray reads a table (``read_parquet`` / ``read_csv`` / ``read_json``), from local (or shared)
paths or straight from a bucket (the job's ``[storage]``: Arrow's S3 filesystem, each read
tried again on the store's transient errors). An image folder or prefix is walked here, by
the local engine's own walk (same extensions, links, manifest and keys), and its files'
paths or objects' URIs handed to Ray in blocks. Each block goes through ``BlockScorer``
(see ``blockscoring``) in ``actors`` Ray actors, the job's ``concurrency`` split across
them, so the total in flight never exceeds it.

Each actor writes its finished block as a Parquet part (see ``blocks``: in the run's local
state, or beside an output in a bucket, so that a cluster needs no shared disk) and hands
the driver only the block's name and counts. When every block is done, the driver checks
the parts against the input and commits them (see ``blockcommit``): a folder renamed into
place, or one object uploaded whole; ``<output>.summary.json`` beside it. A run that stops
(a refused token: exit 3; a crash) keeps its finished blocks: a re-run of the same job sends
only the others.

Tables are keyed by ``input.id_column`` (required: row numbers are not stable across Ray
blocks); a real service URL is needed (``embedded:`` runs in one process). This is the only
module that imports ray, and only when a run asks for it.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchrunner.checkpoint import StatePaths
from batchrunner.credentials import read_credentials
from batchrunner.engines.blockcommit import check_parts, commit_folder, commit_object, source_keys
from batchrunner.engines.blocks import RayState, open_ray_state
from batchrunner.engines.blockscoring import (
    IMAGE_KEY,
    IMAGE_PATH,
    ActorSecrets,
    BlockScorer,
    secret_environ,
)
from batchrunner.errors import BatchRunnerError, InputError, RequestError, ServiceError
from batchrunner.job import IMAGES, TABULAR, Engine, InputKind, Job, job_identity
from batchrunner.lock import JobLock
from batchrunner.objectfiles import retrying_filesystem
from batchrunner.report import RunStatistics
from batchrunner.sources import ImageSource, Source
from batchrunner.storage import InputPath, ObjectPath, ObjectStore
from batchrunner.summary import BlockFigures
from batchrunner.wiring import (
    SUMMARY_SUFFIX,
    RayFigures,
    RunOutcome,
    RunReport,
    job_store,
    job_summary,
    kind_of,
    new_run_id,
    open_source,
    writable_output,
)
from batchrunner.writing import write_json_atomically

log = logging.getLogger("batchrunner")

INSTALL_HINT = "--engine ray needs Ray: pip install 'batchrunner[ray]'"


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
    store = job_store(job)
    source = open_source(job, store)  # the same checks of the input as the local engine
    kind = kind_of(source)
    check_ray_job(job, kind)
    read_credentials(job.service)  # a missing secret stops the run here, before Ray starts
    secrets = ActorSecrets(secret_environ(job, os.environ), store)
    started = datetime.now().astimezone()
    run_id = new_run_id(started)
    output = writable_output(job, started, run_id, store, folder=True)  # before Ray starts
    if isinstance(output, Path):
        output = output.absolute()
    paths = StatePaths.for_output(output, job.name, job.run.state_dir)
    state = RayState.of(paths, output, job.name)
    identity = job_identity(job, source.paths, kind=kind)
    with JobLock(paths.lock, job.name):
        state, note = open_ray_state(state, identity, resume=resume)
        if note:
            log.info("%s", note)
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        clock = time.perf_counter()
        scored = _score_blocks(ray, job, source, state, secrets, actors, f"{run_id} -> {output}")
        if isinstance(scored, BatchRunnerError):
            # The failed execution keeps its actors (and their CPUs) while it is referenced,
            # through cycles in its traceback: collect it (its frame is gone), so that they
            # go now; a re-run in the same process would wait for them forever.
            gc.collect()
            raise _kept_for_resume(scored, state)
        blocks, keys, shares = scored
        stats = sum((pickle.loads(block["stats"]) for block in blocks), RunStatistics())
        names = [block["block"] for block in blocks]
        rows, ok = check_parts(state.parts, names, keys)
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
        if isinstance(output, ObjectPath):
            assembled = paths.assembled(output.suffix)
            commit_object(state.parts, names, output, assembled, summary.to_json())
        else:
            commit_folder(state.parts, names, output)
            assert isinstance(summary_path, Path)
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
    secrets: ActorSecrets,
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
        paths, filesystem = _table_paths(source.paths, secrets.store)
        dataset = _read(ray, source.format, paths, job, filesystem)
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
        fn_constructor_args=(job, kind, list(source.send_columns), each, secrets, state.parts),
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=len(shares)),
        num_cpus=0.5,
    )
    try:
        blocks: list[dict[str, Any]] = scored.take_all()
    except (ray.exceptions.RayError, BatchRunnerError) as exc:
        return _failure(exc)
    if kind == IMAGES:
        return blocks, image_keys, len(shares)
    return blocks, source_keys(paths, source.format, job, filesystem), len(shares)


def _table_paths(files: Sequence[InputPath], store: ObjectStore | None) -> tuple[list[str], Any]:
    """Where Ray reads the input's files: absolute local paths (workers have their own
    cwd), or the objects' ``bucket/key`` on the store's filesystem, each read retried."""
    objects = [path for path in files if isinstance(path, ObjectPath)]
    if store is None or not objects:
        return [str(Path(path).absolute()) for path in files], None
    return [path.location for path in objects], retrying_filesystem(store, objects[0].scheme)


def _image_blocks(source: ImageSource, size: int) -> tuple[pa.Array, list[pa.Table]]:
    """Every file's key (the local engine's walk), and the files (absolute paths, or
    objects' URIs) in blocks of ``size``."""
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


def _kept_for_resume(error: BatchRunnerError, state: RayState) -> BatchRunnerError:
    """``error``, saying that the finished blocks are kept and a re-run resumes."""
    if not isinstance(error, ServiceError):
        return error
    kept = len(state.parts.names())
    return type(error)(
        f"{error}; {kept:,} finished blocks are kept in {state.parts}: re-run the same "
        "command to resume (they are not sent again)"
    )


def _read(ray: Any, format: str, paths: list[str], job: Job, filesystem: Any) -> Any:
    if format == "parquet":
        return ray.data.read_parquet(paths, filesystem=filesystem)
    if format == "jsonl":
        return ray.data.read_json(paths, lines=True, filesystem=filesystem)
    import pyarrow.csv as csv

    delimiter = job.input.csv_delimiter or ("\t" if format == "tsv" else ",")
    options = csv.ParseOptions(delimiter=delimiter)
    return ray.data.read_csv(paths, parse_options=options, filesystem=filesystem)


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
        if isinstance(current, BatchRunnerError) and type(current).__module__.startswith(
            "batchrunner."
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
