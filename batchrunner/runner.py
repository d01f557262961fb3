"""The pipeline: read, batch, send with bounded concurrency and retries, journal, commit.

    source ──> dispatcher ──> request tasks ──> writer ──> assemble
    (thread)   (window)       (limiter, retry)  (journal)  (order, proof, rename)

Stages run in one ``asyncio.TaskGroup`` joined by bounded queues, so memory stays flat
whatever the input's size. The dispatcher never starts a batch more than ``window`` batches
ahead of the oldest unfinished one, which bounds both the tasks alive and how far out of
order the journal can be.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import shutil
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

from batchrunner.auth import FixedToken, Secret, TokenProvider, mask_headers
from batchrunner.client import APP_CODE_HEADER, TOKEN_HEADER, ServiceClient
from batchrunner.credentials import Credentials, describe_auth, read_credentials
from batchrunner.dispatch import Dispatcher, Sleep
from batchrunner.errors import BatchRunnerError, RequestError, ServiceError
from batchrunner.items import Batch, Outcome
from batchrunner.job import Job, fingerprint, resolve_output_path
from batchrunner.limiter import ConcurrencyLimiter
from batchrunner.protocols import Codec
from batchrunner.protocols.modelarts import TextCodec
from batchrunner.report import RunStats, StatsSnapshot, build_summary
from batchrunner.retry import RetryPolicy
from batchrunner.sink import SUMMARY_METADATA_KEY, Journal, assemble, outcome_table
from batchrunner.sink import write_json_atomically as write_summary
from batchrunner.sources import Source, open_tabular

log = logging.getLogger("batchrunner")

OUTCOME_DONE = "done"
OUTCOME_TOO_MANY_ERRORS = "too_many_errors"
OUTCOME_ABORTED = "aborted"
NOT_SENT = "not_sent"
# How many failed batches are logged one by one before the log only counts them.
LOGGED_FAILURES = 20


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a finished run reports: where its output is, and how it went."""

    outcome: str
    output: Path
    summary_path: Path
    summary: dict[str, Any]
    abort_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run would do: shown by ``validate`` and ``run --dry-run``; nothing is sent."""

    job: Job
    files: list[Path]
    format: str
    send_columns: list[str]
    rows: int | None
    batches: int | None
    output: Path
    url: str
    auth: str
    headers: dict[str, str]
    first_request: bytes | None


def open_source(job: Job) -> Source:
    """Open and check the job's input (raises ``InputError`` before anything is sent)."""
    return open_tabular(
        job.input.path,
        format=job.input.format,
        id_column=job.input.id_column,
        columns=job.input.columns,
        keep_input=job.output.keep_input,
        csv_delimiter=job.input.csv_delimiter,
    )


def plan_job(job: Job, *, limit: int | None = None, count: bool = True) -> Plan:
    """Check the job, its token source and its input, and describe the run; send nothing."""
    source = open_source(job)
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
    batches = None if rows is None else -(-rows // job.batch.size)
    first = next(source.iter_batches(job.batch.size, limit=limit), None)
    body = None
    headers = {}
    if sends_token:
        headers[TOKEN_HEADER] = "<token>"
    if sends_app_code:
        headers[APP_CODE_HEADER] = "<AppCode>"
    if first is not None:
        request = codec_for(job).encode(first, str(uuid.uuid4()))
        body = request.body
        headers["Content-Type"] = request.content_type
    now = datetime.now()
    return Plan(
        job=job,
        files=list(source.paths),
        format=source.format,
        send_columns=list(source.send_columns),
        rows=rows,
        batches=batches,
        output=resolve_output_path(job, now, new_run_id(now)),
        url=job.service.url,
        auth=describe_auth(job.service),
        headers=mask_headers(headers),
        first_request=body,
    )


def codec_for(job: Job) -> Codec:
    """The codec of the job's protocol and input kind."""
    return TextCodec()


def new_run_id(started: datetime) -> str:
    return f"{started:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


@dataclass
class _Window:
    """Which batches are unfinished; lets the dispatcher stay within ``size`` of the oldest."""

    size: int
    lowest_unfinished: int = 0
    finished_ahead: set[int] = field(default_factory=set)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_for_room(self, seq: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: seq < self.lowest_unfinished + self.size)

    async def finish(self, seq: int) -> None:
        async with self.changed:
            self.finished_ahead.add(seq)
            while self.lowest_unfinished in self.finished_ahead:
                self.finished_ahead.remove(self.lowest_unfinished)
                self.lowest_unfinished += 1
            self.changed.notify_all()


class Runner:
    """One run of a job. ``await Runner(job).run()``; see ``run_job``."""

    def __init__(
        self,
        job: Job,
        *,
        limit: int | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        on_progress: Callable[[StatsSnapshot], None] | None = None,
        progress_interval: float = 10.0,
    ) -> None:
        self.job = job
        self.limit = limit
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._on_progress = on_progress
        self._progress_interval = progress_interval
        self.stats = RunStats()
        self._policy = RetryPolicy(
            job.retry.max_attempts, job.retry.backoff_initial, job.retry.backoff_max
        )
        self._limiter = ConcurrencyLimiter(job.batch.concurrency)
        self._window = _Window(size=max(64, 4 * job.batch.concurrency))
        self._rows_per_batch: array[int] = array("q")
        self._finished = bytearray()  # one flag per batch seq: its rows are journaled
        self._failures_logged = 0
        self._started_clock = 0.0

    # --- the run ------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        job = self.job
        source = open_source(job)
        credentials = None if job.service.embedded_model else read_credentials(job.service)
        if credentials is not None and credentials.tokens is not None:
            # The first token (an IAM login, if the cache has none) before anything is
            # written: a refused login stops the run here, with exit 3 and no output.
            await self._first_token(credentials.tokens)
        started = datetime.now().astimezone()
        run_id = new_run_id(started)
        output = resolve_output_path(job, started, run_id)
        state_dir = output.with_name(output.name + ".state")
        summary_path = output.with_name(output.name + ".summary.json")
        job_fingerprint = fingerprint(job, source.paths)
        if state_dir.exists():
            shutil.rmtree(state_dir)  # resuming from it is not supported yet: start fresh
        journal = Journal(state_dir)
        self._started_clock = time.perf_counter()
        abort_reason: str | None = None
        url = job.service.url
        log.info(
            "run %s: %s -> %s via %s (batch %d, concurrency %d)",
            run_id, job.input.path, output, url, job.batch.size, job.batch.concurrency,
        )  # fmt: skip
        try:
            async with AsyncExitStack() as stack:
                client, tokens = await self._open_client(stack, credentials)
                try:
                    await self._pipeline(source, client, tokens, journal)
                except ServiceError as exc:
                    abort_reason = str(exc)
                    log.error("run aborted: %s", abort_reason)
            if abort_reason is not None:
                self._record_not_sent(source, journal, abort_reason)
        finally:
            journal.close()
        elapsed = time.perf_counter() - self._started_clock
        outcome = self._judge(abort_reason)
        summary = build_summary(
            self.stats,
            job_name=job.name,
            fingerprint=job_fingerprint,
            run_id=run_id,
            input_path=job.input.path,
            output_path=str(output),
            url=job.service.url,
            started=started.isoformat(timespec="seconds"),
            finished=datetime.now().astimezone().isoformat(timespec="seconds"),
            elapsed_s=elapsed,
            outcome=outcome,
            max_error_rate=job.max_error_rate,
        )
        assemble(
            state_dir,
            output,
            self._rows_per_batch,
            metadata={SUMMARY_METADATA_KEY: orjson.dumps(summary)},
        )
        write_summary(summary_path, summary)
        shutil.rmtree(state_dir, ignore_errors=True)
        log.info("run %s %s: output %s", run_id, outcome, output)
        return RunResult(outcome, output, summary_path, summary, abort_reason)

    def _judge(self, abort_reason: str | None) -> str:
        if abort_reason is not None:
            return OUTCOME_ABORTED
        total = self.stats.rows_ok + self.stats.rows_error
        if total and self.stats.rows_error / total > self.job.max_error_rate:
            return OUTCOME_TOO_MANY_ERRORS
        return OUTCOME_DONE

    async def _first_token(self, tokens: TokenProvider) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await tokens.current()
                return
            except RequestError as error:  # IAM unreachable or busy: try again, patiently
                delay = self._policy.delay(attempt, error, self._rng)
                if delay is None:
                    raise ServiceError(f"no token to send: {error.message}") from None
                log.warning("%s; trying again in %.1f s", error.message, delay)
                await self._sleep(delay)

    async def _open_client(
        self, stack: AsyncExitStack, credentials: Credentials | None
    ) -> tuple[ServiceClient, TokenProvider | None]:
        service = self.job.service
        url = service.url
        tokens = credentials.tokens if credentials is not None else None
        app_code = credentials.app_code if credentials is not None else None
        model = service.embedded_model
        if model is not None:
            from batchrunner.service import ServiceOptions, start_service

            running = await start_service(ServiceOptions(model=model))
            stack.push_async_callback(running.close)
            url, tokens = running.url, FixedToken(Secret(running.token))
        client = ServiceClient(
            url,
            None,  # each request carries the token ``tokens`` gives it
            app_code=app_code,
            timeout=service.timeout,
            connect_timeout=service.connect_timeout,
            verify_tls=service.verify_tls,
            ca_bundle=service.ca_bundle,
            max_connections=self.job.batch.concurrency,
        )
        await stack.enter_async_context(client)
        return client, tokens

    async def _pipeline(
        self,
        source: Source,
        client: ServiceClient,
        tokens: TokenProvider | None,
        journal: Journal,
    ) -> None:
        concurrency = self.job.batch.concurrency
        batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2 * concurrency)
        outcomes: asyncio.Queue[list[Outcome] | None] = asyncio.Queue(maxsize=2 * concurrency)
        try:
            async with asyncio.TaskGroup() as group:
                reporter = group.create_task(self._report()) if self._on_progress else None
                group.create_task(self._read(source, batches))
                dispatcher = Dispatcher(
                    client,
                    codec_for(self.job),
                    self._limiter,
                    self._policy,
                    self.stats,
                    tokens=tokens,
                    sleep=self._sleep,
                    rng=self._rng,
                )
                group.create_task(self._dispatch(batches, outcomes, dispatcher))
                await group.create_task(self._write(outcomes, journal))
                if reporter is not None:
                    reporter.cancel()
        except BaseExceptionGroup as group:
            # Surface our own error (e.g. the token refused) as itself, not inside a group.
            matched, _ = group.split(BatchRunnerError)
            if matched is None:
                raise
            raise _first_leaf(matched) from None

    async def _read(self, source: Source, batches: asyncio.Queue[Batch | None]) -> None:
        iterator = source.iter_batches(self.job.batch.size, limit=self.limit)
        # Reading and converting happens in a worker thread, a few batches per hop, so the
        # event loop keeps sending while pyarrow parses (it releases the GIL).
        per_hop = max(1, 4096 // self.job.batch.size)
        while True:
            chunk = await asyncio.to_thread(_take, iterator, per_hop)
            for batch in chunk:
                self._rows_per_batch.append(len(batch))
                self._finished.append(0)
                self.stats.batches_read += 1
                self.stats.rows_read += len(batch)
                await batches.put(batch)
            if len(chunk) < per_hop:
                break
        await batches.put(None)

    async def _dispatch(
        self,
        batches: asyncio.Queue[Batch | None],
        outcomes: asyncio.Queue[list[Outcome] | None],
        dispatcher: Dispatcher,
    ) -> None:
        async with asyncio.TaskGroup() as requests:
            while (batch := await batches.get()) is not None:
                await self._window.wait_for_room(batch.seq)
                requests.create_task(self._complete(batch, dispatcher, outcomes))
        await outcomes.put(None)

    async def _complete(
        self,
        batch: Batch,
        dispatcher: Dispatcher,
        outcomes: asyncio.Queue[list[Outcome] | None],
    ) -> None:
        await outcomes.put(await dispatcher.send(batch))

    async def _write(self, outcomes: asyncio.Queue[list[Outcome] | None], journal: Journal) -> None:
        while (finished := await outcomes.get()) is not None:
            self._journal(finished, journal)
            await self._window.finish(finished[0].batch.seq)

    def _journal(self, finished: list[Outcome], journal: Journal) -> None:
        seq = finished[0].batch.seq
        kept = self._kept_names(finished[0].batch)
        journal.append(outcome_table(finished, kept))
        self._finished[seq] = 1
        for outcome in finished:
            rows = len(outcome.batch)
            if outcome.ok:
                self.stats.rows_ok += rows
                continue
            self.stats.rows_error += rows
            kind = outcome.error_kind or "error"
            message = outcome.error or ""
            self.stats.record_error_rows(kind, rows, outcome.batch.keys[0], message)
            if kind == NOT_SENT:
                continue
            self._failures_logged += 1
            if self._failures_logged <= LOGGED_FAILURES:
                log.warning(
                    "batch %d (%d rows from key %s) failed after %d attempts: %s",
                    seq, rows, outcome.batch.keys[0], outcome.attempts, message,
                )  # fmt: skip
            elif self._failures_logged == LOGGED_FAILURES + 1:
                log.warning("more batches failed; the summary counts them all")

    @staticmethod
    def _kept_names(batch: Batch) -> list[str]:
        return batch.kept.schema.names if batch.kept is not None else []

    def _record_not_sent(self, source: Source, journal: Journal, reason: str) -> None:
        # After a fatal answer the output still covers every input row: those that were
        # not finished are error rows saying why (a later run sends them).
        message = f"not sent: the run was aborted ({reason})"
        for batch in source.iter_batches(self.job.batch.size, limit=self.limit):
            if batch.seq < len(self._finished) and self._finished[batch.seq]:
                continue
            if batch.seq >= len(self._rows_per_batch):
                self._rows_per_batch.append(len(batch))
                self._finished.append(0)
                self.stats.rows_read += len(batch)
            outcome = Outcome(batch, None, error=message, error_kind=NOT_SENT)
            self._journal([outcome], journal)

    async def _report(self) -> None:
        assert self._on_progress is not None
        while True:
            await asyncio.sleep(self._progress_interval)
            self._on_progress(self.snapshot())

    def snapshot(self) -> StatsSnapshot:
        return self.stats.snapshot(
            self._limiter.statistics().in_flight, time.perf_counter() - self._started_clock
        )


def _first_leaf(group: BaseExceptionGroup[BatchRunnerError]) -> BatchRunnerError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _take(iterator: Iterator[Batch], count: int) -> list[Batch]:
    return list(islice(iterator, count))


def run_job(job: Job, **options: Any) -> RunResult:
    """Run ``job`` to the end on a fresh event loop (see ``Runner`` for the options)."""
    return asyncio.run(Runner(job, **options).run())
