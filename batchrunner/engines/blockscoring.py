"""A Ray run's actor side: one block of input in, its part written, its counts out.

``BlockScorer`` is the callable class Ray Data runs in each actor (with its own event loop);
``score_block`` sends a block as the local engine would: the same codec, the same
``Dispatcher`` (retries, poison-row splitting, token renewal), at most the actor's share of
``batch.concurrency`` in flight. An image is fetched by the actor when its request is built:
from its path, or from the bucket (``ActorSecrets.store``) when the block gives a URI.

Nothing here imports Ray: Ray pickles the class and its arguments to its workers.
"""

from __future__ import annotations

import asyncio
import pickle
import random
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from batchrunner.credentials import read_credentials
from batchrunner.dispatch import Dispatcher
from batchrunner.engines.blocks import Parts, block_name
from batchrunner.items import Batch
from batchrunner.job import (
    DEFAULT_OPENAI_KEY_ENV,
    DEFAULT_TOKEN_ENV,
    IMAGES,
    OPENAI_PROTOCOLS,
    InputKind,
    Job,
)
from batchrunner.limiter import ConcurrencyLimiter, RateLimiter
from batchrunner.report import FinishTally, ReadStatistics, RunStatistics
from batchrunner.sink import SEQ, outcome_table
from batchrunner.sources.jsonsafe import json_safe
from batchrunner.storage import InputPath, ObjectStore, is_uri
from batchrunner.wiring import codec_for, retry_policy, service_client

# What an image block carries to its actor: each file's key, and its absolute path or URI.
IMAGE_KEY, IMAGE_PATH = "_key", "_path"
# What an actor hands back for each block: its name, rows, whether an earlier run had
# finished it, and its statistics (a pickled ``RunStatistics``).
BLOCK_SCHEMA = pa.schema(
    [("block", pa.string()), ("rows", pa.int64()), ("reused", pa.bool_()), ("stats", pa.binary())]
)


@dataclass(frozen=True, slots=True, repr=False)
class ActorSecrets:
    """What the actors need to reach the service and the store: the variables the job's
    credentials are read from, and the object store with its keys. Ray pickles them to
    its workers; nothing shows them (a Ray error naming an actor's arguments shows this
    ``repr``)."""

    environ: Mapping[str, str]
    store: ObjectStore | None = None

    def __repr__(self) -> str:
        return "ActorSecrets(<hidden>)"


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
        secrets: ActorSecrets,
        parts: Parts,
    ) -> None:
        self._job = job
        self._kind = kind
        self._send = send
        self._in_flight = in_flight
        self._secrets = secrets
        self._parts = parts
        self._loop = asyncio.new_event_loop()

    def __call__(self, table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return BLOCK_SCHEMA.empty_table()
        record = table.combine_chunks().to_batches()[0]
        keys = block_keys(self._job, self._kind, record)
        name = block_name(keys)
        stats = self._parts.reusable(name)
        reused = stats is not None
        if stats is None:
            scoring = score_block(
                self._job, self._kind, record, keys, self._send, self._in_flight, self._secrets
            )
            rows, stats = self._loop.run_until_complete(scoring)
            self._parts.write(name, rows, stats)
        row = {"block": name, "rows": len(keys), "reused": reused, "stats": pickle.dumps(stats)}
        return pa.Table.from_pylist([row], schema=BLOCK_SCHEMA)


def block_keys(job: Job, kind: InputKind, record: pa.RecordBatch) -> list[str]:
    """Each row's key, as the local engine makes it: the id column as text, or an image's
    path relative to the input folder."""
    column = IMAGE_KEY if kind == IMAGES else job.input.id_column
    assert column is not None
    keys: list[str] = pc.cast(record.column(column), pa.string()).to_pylist()
    return keys


async def score_block(
    job: Job,
    kind: InputKind,
    record: pa.RecordBatch,
    keys: Sequence[str],
    send: list[str],
    in_flight: int,
    secrets: ActorSecrets,
) -> tuple[pa.Table, RunStatistics]:
    """Send a block as the local engine would (``batch.size`` rows a request, or one file,
    at most ``in_flight`` at once): its output rows, one per input row in input order, and
    its statistics."""
    batches = _batches(job, kind, record, keys, send, secrets.store)
    credentials = read_credentials(job.service, environ=secrets.environ)
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
    job: Job,
    kind: InputKind,
    record: pa.RecordBatch,
    keys: Sequence[str],
    send: list[str],
    store: ObjectStore | None,
) -> list[Batch]:
    if kind == IMAGES:
        paths = record.column(IMAGE_PATH).to_pylist()
        return [
            Batch(seq=seq, keys=(key,), path=_image_path(path, store))
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


def _image_path(path: str, store: ObjectStore | None) -> InputPath:
    if store is not None and is_uri(path):
        return store.locate(path)
    return Path(path)


def _without_seq(batch: pa.RecordBatch) -> pa.Table:
    return pa.Table.from_batches([batch]).drop_columns([SEQ])


def _concat(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")
