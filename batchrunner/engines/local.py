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
import functools
import logging
import os
import random
import shutil
import signal
from array import array
from collections.abc import Callable, Collection, Iterator
from contextlib import AsyncExitStack
from datetime import datetime
from itertools import chain, islice
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from batchrunner.auth import FixedToken, Scrubber, Secret, TokenProvider
from batchrunner.checkpoint import (
    DIGEST_BYTES,
    Checkpoint,
    DigestLog,
    Scan,
    StatePaths,
    keys_digest,
    open_checkpoint,
)
from batchrunner.client import ServiceClient
from batchrunner.clock import SYSTEM_CLOCK, Cancellable, Clock
from batchrunner.credentials import (
    Credentials,
    read_credentials,
)
from batchrunner.dispatch import Dispatcher
from batchrunner.errors import (
    BatchRunnerError,
    DataError,
    InputError,
    RequestError,
    RunInterrupted,
    ServiceError,
)
from batchrunner.formats import batch_output_format
from batchrunner.incremental import SeenItems, check_reader, name_examples, open_seen
from batchrunner.items import Batch, Outcome
from batchrunner.job import (
    IMAGES,
    TABULAR,
    Engine,
    Job,
    job_identity,
    output_name_glob,
)
from batchrunner.keyhash import content_digest
from batchrunner.keyspill import Duplicates, Spill
from batchrunner.limiter import RateLimiter
from batchrunner.lock import JobLock
from batchrunner.protocols.openai import check_prompt, openai_codec
from batchrunner.report import RunStats, StatsSnapshot
from batchrunner.sink import SUMMARY_METADATA_KEY, Journal, assemble, outcome_table
from batchrunner.sources import Source
from batchrunner.storage import ObjectPath
from batchrunner.tokenmeter import TokenMeter, read_spent, token_meter, write_spent
from batchrunner.wiring import (
    NOT_SENT,
    SUMMARY_SUFFIX,
    RunOutcome,
    RunReport,
    batch_size_for,
    check_service_url,
    codec_for,
    job_store,
    job_summary,
    kind_of,
    locate_output,
    make_limiter,
    new_run_id,
    open_source,
    retry_policy,
    service_client,
)
from batchrunner.writing import check_writable, remove_leftovers
from batchrunner.writing import write_json_atomically as write_summary

log = logging.getLogger("batchrunner")

# How many failed batches are logged one by one before the log only counts them.
LOGGED_FAILURES = 20
# Batches that finished together share a journal message of up to about this many rows.
JOURNAL_MESSAGE_ROWS = 8192
# Rows hashed together when the input is checked before a run (keys, rows done).
CHECK_BATCH_ROWS = 65_536


class Runner:
    """One run of a job. ``await Runner(job).run()``; see ``run_job``.

    ``clock`` is the run's time (see ``clock``): backoffs and retry waits, the unreachable
    timer, the progress reporter, the grace period, the rate limiter and token renewal all
    run on it; ``rng`` draws the backoffs' jitter. Tests inject their own of both, so that
    time-dependent behaviour is deterministic.
    """

    def __init__(
        self,
        job: Job,
        *,
        limit: int | None = None,
        resume: bool = True,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        on_progress: Callable[[StatsSnapshot], None] | None = None,
        progress_interval: float = 10.0,
        handle_signals: bool = True,
        only_keys: Collection[str] | None = None,
    ) -> None:
        self.job = job
        self.limit = limit
        self.resume = resume
        self._rng = rng or random.Random()
        self._on_progress = on_progress
        self._progress_interval = progress_interval
        self._handle_signals = handle_signals
        self._clock = clock
        self._scrubber = Scrubber()  # every secret the run holds (see Credentials.secrets)
        self._grace_timer: Cancellable | None = None
        self.stats = RunStats()
        self._policy = retry_policy(job)
        self._limiter = make_limiter(job)
        # Batches started and not yet finished (sending, or waiting to retry): bounded, so
        # that memory stays flat; twice the concurrency keeps the pipe full during backoffs.
        self._outstanding = asyncio.Semaphore(2 * job.batch.max_in_flight)
        self._rows_per_batch: array[int] = array("q")
        self._finished = bytearray()  # one flag per batch seq: its rows are journaled
        self._checkpoint: Checkpoint | None = None  # what the run resumed from
        self._failures_logged = 0
        self._field_types: dict[str, pa.DataType] = {}  # result fields' types, as seen so far
        self._started_clock = 0.0
        self._stopping = asyncio.Event()
        self._meter: TokenMeter | None = None  # language models: tokens, their limits
        self._data_error: DataError | None = None  # the input turned bad mid-run
        self._signals = 0
        self._requests: set[asyncio.Task[None]] = set()
        self._main_task: asyncio.Task[Any] | None = None
        self._source: Source | None = None  # the input being read (its total, when known)
        self._read_everything = False
        self._kind = TABULAR  # known once the source is open
        self._batch_size = job.batch.size
        self._seen: SeenItems | None = None  # input.incremental: the items already done
        self._batch_digests = bytearray()  # DIGEST_BYTES per seq: what is sent for it
        self._digest_log = DigestLog(Path(os.devnull))  # the state's, once it is open
        self._keys: Spill | None = None  # the keys read, for the duplicate-key check
        self._only_keys = only_keys  # `batchrunner retry`: send only these items

    # --- the run ------------------------------------------------------------------------------

    async def run(self) -> RunReport:
        job = self.job
        check_service_url(job.service)
        store = job_store(job)
        source = open_source(job, store)
        self._kind = kind_of(source)
        self._batch_size = batch_size_for(job, self._kind)
        if self._kind == TABULAR and job.service.openai is not None and job.service.openai.prompt:
            check_prompt(job.service.openai.prompt, list(source.send_columns))
            openai_codec(job)  # a JSON schema that is not one stops the job here (exit 2)
        credentials = (
            None if job.service.embedded_model else read_credentials(job.service, clock=self._clock)
        )
        if credentials is not None:
            self._scrubber = credentials.scrubber()
        started = datetime.now().astimezone()
        run_id = new_run_id(started)
        output = locate_output(job, started, run_id, store)
        if isinstance(output, ObjectPath):  # before any request: a refused key stops here
            output.store.check_writable(output)
        else:
            check_writable(output)
        summary_path = output.with_name(output.name + SUMMARY_SUFFIX)
        paths = StatePaths.for_output(output, job.name, job.run.state_dir)
        identity = job_identity(job, source.paths, kind=self._kind)
        with JobLock(paths.lock, job.name):
            output_glob = output_name_glob(job)
            for name_glob in (output_glob, output_glob + SUMMARY_SUFFIX):
                if not isinstance(output, Path):
                    break  # in a bucket, what is written aside is an upload: never left
                for leftover in remove_leftovers(output.parent, name_glob):
                    log.info("removed %s, left by a run killed while writing it", leftover)
            if credentials is not None and credentials.tokens is not None:
                # The first token (an IAM login, if the cache has none) before the run's
                # state is opened or anything is written: a refused login stops the run
                # here, with exit 3 and no output.
                await self._first_token(credentials.tokens)
            if job.input.incremental:
                self._seen = open_seen(paths.keys, url=job.service.url, legacy=paths.seen)
                # Before anything is sent: duplicate keys stop the run here (exit 2).
                check_size = self._batch_size if self._kind == IMAGES else CHECK_BATCH_ROWS
                read = check_reader(source, check_size, self.limit)
                await asyncio.to_thread(self._seen.check, read)
            seen = self._seen
            resume_identity = identity if seen is None else seen.resume_identity(identity)
            checkpoint = open_checkpoint(
                paths,
                resume_identity,
                resume=self.resume,
                stats=self.stats,
                scan=functools.partial(self._scan_for_resume, source, paths),
            )
            self._digest_log = DigestLog(paths.digests)
            if self._kind == TABULAR and job.input.id_column and seen is None:
                self._keys = Spill(paths.state / "keys")
            if checkpoint.note:
                log.info("%s", checkpoint.note)
            if seen is not None and isinstance(output, Path):
                seen.check_output(output, resuming=checkpoint.resumed_rows > 0)
            self._finished = checkpoint.finished
            self._checkpoint = checkpoint
            # Language models: the tokens earlier runs of this unfinished run spent count
            # against max_total_tokens too.
            spent = read_spent(paths.state) if checkpoint.resumed_rows else None
            self._meter = token_meter(
                job, clock=self._clock.now, sleep=self._clock.sleep, spent=spent
            )
            self._source = source
            self._started_clock = self._clock.now()
            log.info(
                "run %s: %s -> %s via %s (batch %d, concurrency %s)",
                run_id, job.input.path, output, job.service.url,
                self._batch_size, job.batch.concurrency,
            )  # fmt: skip
            abort_reason = await self._run_pipeline(source, credentials, checkpoint.journal, paths)
            duplicates = self._duplicates(source)
            final = self.snapshot()
            if seen is not None and not final.rows_done and final.rows_skipped:
                log.info("nothing new: %s items already done", f"{final.rows_skipped:,}")
            if not final.rows_read and not final.rows_skipped and abort_reason is None:
                log.warning("%s has no rows (only a header?): the output is empty", job.input.path)
            outcome = self._judge(abort_reason)
            summary = job_summary(job, final, identity, run_id, output, started, outcome)
            if duplicates:
                summary["duplicate_keys"] = duplicates.to_json()
            # An output in a bucket is assembled in the state folder, then uploaded whole.
            written = output if isinstance(output, Path) else paths.assembled(output.suffix)
            assemble(
                paths.state,
                written,
                self._rows_per_batch,
                metadata={SUMMARY_METADATA_KEY: orjson.dumps(summary)},
                format=batch_output_format(job, written),
            )
            if isinstance(output, ObjectPath) and isinstance(summary_path, ObjectPath):
                output.store.upload(written, output)
                output.store.put_bytes(
                    orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n", summary_path
                )
            else:
                assert isinstance(summary_path, Path)
                write_summary(summary_path, summary)
            if abort_reason is None:
                shutil.rmtree(paths.state, ignore_errors=True)
                if seen is not None:  # after the state: a crash between costs resends only
                    seen.remember(
                        written, run_id=run_id, url=job.service.url, trial=self.limit is not None
                    )
            else:
                # Kept: re-running after the cause is fixed sends only what did not finish.
                log.info("run state kept in %s: re-run the same command to resume", paths.state)
                if self._meter is not None:
                    write_spent(paths.state, self._meter.spent)
            if written != output:
                written.unlink(missing_ok=True)  # uploaded: the bucket holds the output
        log.info("run %s %s: output %s", run_id, outcome, output)
        return RunReport(
            engine=Engine.LOCAL,
            outcome=outcome,
            output=output,
            summary_path=summary_path,
            summary=summary,
            rows=final.rows_ok + final.rows_error,
            rows_ok=final.rows_ok,
            rows_error=final.rows_error,
            stats=final,
            abort_reason=abort_reason,
        )

    async def _run_pipeline(
        self,
        source: Source,
        credentials: Credentials | None,
        journal: Journal,
        paths: StatePaths,
    ) -> str | None:
        """Run the pipeline to its end; the reason if a fatal answer aborted it."""
        abort_reason: str | None = None
        self._main_task = asyncio.current_task()
        self._install_signal_handlers()
        try:
            async with AsyncExitStack() as stack:
                client, tokens = await self._open_client(stack, credentials)
                try:
                    await self._pipeline(source, client, tokens, journal)
                except ServiceError as exc:
                    abort_reason = str(exc)
                    log.error("run aborted: %s", abort_reason)
                if abort_reason is None and self._meter is not None and self._meter.exhausted:
                    # The token budget: the requests in flight are done; the rest waits.
                    abort_reason = str(self._meter.exhausted)
                    self._stopping.clear()
            if abort_reason is not None:
                self._record_not_sent(source, journal, abort_reason)
        except asyncio.CancelledError:
            if not self._signals:
                raise
            journal.close()
            raise RunInterrupted(self._interrupted_message(paths)) from None
        finally:
            try:
                journal.close()  # may fail (a full disk): the rest is closed all the same
            finally:
                self._digest_log.close()
                self._remove_signal_handlers()
                if self._grace_timer is not None:
                    self._grace_timer.cancel()
        if self._stopping.is_set():
            raise RunInterrupted(self._interrupted_message(paths))
        if self._data_error is not None:
            raise self._data_error
        return abort_reason

    def _interrupted_message(self, paths: StatePaths) -> str:
        done = self.stats.rows_ok + self.stats.rows_error
        return (
            f"interrupted: {done:,} finished rows are kept in {paths.state}; "
            "re-run the same command to resume"
        )

    # --- signals ------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if not self._handle_signals:
            return
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(number, self._on_signal, number)
            except (RuntimeError, ValueError):  # not the main thread: the caller handles them
                self._handle_signals = False
                return

    def _remove_signal_handlers(self) -> None:
        if not self._handle_signals:
            return
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)

    def _on_signal(self, number: int) -> None:
        self._signals += 1
        name = signal.Signals(number).name
        if self._signals > 1:
            log.warning("%s again: stopping at once", name)
            if self._main_task is not None:
                self._main_task.cancel()
            return
        grace = self.job.batch.grace_period
        log.warning(
            "%s: no new requests; %d in flight get %.0f s to finish (signal again to stop now)",
            name, self._limiter.statistics().in_flight, grace,
        )  # fmt: skip
        # Batches waiting to retry (however long a Retry-After asked) or for a slot are not
        # in flight: they stop at once, and with nothing in flight so does the run.
        self.stop()
        self._grace_timer = self._clock.call_later(grace, self._drop_requests)

    def stop(self) -> None:
        """Stop feeding new batches; requests in flight finish (see ``grace_period``)."""
        self._stopping.set()

    def _drop_requests(self) -> None:
        for task in self._requests:
            task.cancel()

    def _judge(self, abort_reason: str | None) -> RunOutcome:
        if abort_reason is not None:
            return RunOutcome.ABORTED
        total = self.stats.rows_ok + self.stats.rows_error
        if total and self.stats.rows_error / total > self.job.max_error_rate:
            return RunOutcome.TOO_MANY_ERRORS
        return RunOutcome.DONE

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
                await self._clock.sleep(delay)

    async def _open_client(
        self, stack: AsyncExitStack, credentials: Credentials | None
    ) -> tuple[ServiceClient, TokenProvider | None]:
        service = self.job.service
        url = service.url
        tokens = credentials.tokens if credentials is not None else None
        app_code = credentials.app_code if credentials is not None else None
        model = service.embedded_model
        if model is not None:
            from batchrunner.service import ServiceOptions, fault_middleware, start_service

            faults = []
            if service.embedded is not None:
                faults.append(fault_middleware(service.embedded))
            options = ServiceOptions(model=model, protocol=service.protocol)
            running = await start_service(options, extra_middlewares=faults)
            stack.push_async_callback(running.close)
            url, tokens = running.url, FixedToken(Secret(running.token))
        client = service_client(service, url, app_code, self.job.batch.max_in_flight)
        await stack.enter_async_context(client)
        return client, tokens

    async def _pipeline(
        self,
        source: Source,
        client: ServiceClient,
        tokens: TokenProvider | None,
        journal: Journal,
    ) -> None:
        concurrency = self.job.batch.max_in_flight
        batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2 * concurrency)
        outcomes: asyncio.Queue[list[Outcome] | None] = asyncio.Queue(maxsize=2 * concurrency)
        dispatcher = Dispatcher(
            client,
            codec_for(self.job, self._kind),
            self._limiter,
            self._policy,
            self.stats,
            tokens=tokens,
            max_request_bytes=self.job.batch.max_request_bytes,
            rate=(
                RateLimiter(rate, clock=self._clock.now, sleep=self._clock.sleep)
                if (rate := self.job.batch.rate_limit)
                else None
            ),
            stopping=self._stopping,
            sleep=self._clock.sleep,
            rng=self._rng,
            scrubber=self._scrubber,
            unreachable_after=self.job.service.unreachable_after,
            clock=self._clock.now,
            meter=self._meter,
        )
        try:
            async with asyncio.TaskGroup() as group:
                reporter = group.create_task(self._report()) if self._on_progress else None
                group.create_task(self._read(source, batches))
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

    def _batches(self, source: Source, *, dry: bool = False) -> Iterator[Batch]:
        batches = source.iter_batches(self._batch_size, limit=self.limit)
        if self._only_keys is not None:
            batches = _only(batches, self._only_keys)
        # input.incremental: rows done by earlier runs leave here, before a batch is counted,
        # journaled or sent; the rest are packed into full batches.
        if self._seen is not None:
            batches = self._seen.filter(batches, self.stats, self._batch_size, dry=dry)
        return batches if dry else self._fingerprinted(batches)

    def _fingerprinted(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        # In the reader's thread, the first time each batch goes through: the digest of what
        # is sent for it (journaled with it, for a resume to check), and its keys (for the
        # duplicate-key check at the end).
        for batch in batches:
            if batch.seq == len(self._batch_digests) // DIGEST_BYTES:
                keys, digest = content_digest(batch)
                self._batch_digests.extend(digest)
                if self._keys is not None:
                    self._keys.add(keys, keys)
            yield batch

    def _scan_for_resume(self, source: Source, paths: StatePaths) -> Scan:
        """The input as it is now, batch by batch, read before a resume (see ``Scan``); a key
        found twice stops the run (``InputError``): results are matched to rows by key."""
        keys_digests, contents = bytearray(), bytearray()
        spill = None
        if self._kind == TABULAR and self.job.input.id_column and self._seen is None:
            spill = Spill(paths.state / "keys")
        for batch in self._batches(source, dry=True):
            keys, digest = content_digest(batch)
            keys_digests.extend(keys_digest(batch.keys))
            contents.extend(digest)
            if spill is not None:
                spill.add(keys, keys)
        if spill is not None:
            duplicates = spill.duplicates()
            spill.remove()
            if duplicates:
                name_examples(duplicates, source.iter_batches(CHECK_BATCH_ROWS, limit=self.limit))
                raise InputError(
                    f"the input's keys are not unique: {duplicates.describe()}. A resumed run "
                    "matches finished results to rows by key: make input.id_column unique, "
                    "or re-run with --no-resume to start fresh"
                )
        return Scan(bytes(keys_digests), bytes(contents))

    def _duplicates(self, source: Source) -> Duplicates | None:
        """Keys the run read more than once (input.id_column): logged, and in the summary."""
        if self._keys is None:
            return None
        try:
            if self.stats.rows_read < self._keys.rows:  # stopped early: not the whole input
                return None
            duplicates = self._keys.duplicates()
        finally:
            self._keys.remove()
        if not duplicates:
            return None
        name_examples(duplicates, source.iter_batches(CHECK_BATCH_ROWS, limit=self.limit))
        log.warning(
            "the input's keys are not unique (input.id_column %r): %s; their results cannot be "
            "told apart by _key",
            self.job.input.id_column, duplicates.describe(),
        )  # fmt: skip
        return duplicates

    async def _read(self, source: Source, batches: asyncio.Queue[Batch | None]) -> None:
        iterator = self._batches(source)
        # Reading and converting happens in a worker thread, a few batches per hop, so the
        # event loop keeps sending while pyarrow parses (it releases the GIL) or the walk
        # lists folders.
        per_hop = max(1, 4096 // self._batch_size)
        while not self._stopping.is_set():
            try:
                chunk = await asyncio.to_thread(_take, iterator, per_hop)
            except InputError as error:
                if not self.stats.batches_read:
                    raise  # found before anything could be sent: the job is invalid (exit 2)
                # Requests went out: read no further, let those in flight finish and be
                # journaled, then stop (see _run_pipeline), so that a re-run resumes.
                self._data_error = DataError(
                    f"{error}. The run stopped once the requests in flight had finished; "
                    "its finished rows are kept: fix the input (or the setting named) and "
                    "re-run the same command to resume"
                )
                break
            for batch in chunk:
                self._count_read(batch)
            exhausted = len(chunk) < per_hop
            if exhausted:
                self._check_nothing_finished_beyond_input()
            self._read_everything = exhausted  # from now on the total is known exactly
            for batch in chunk:
                if len(batch) and not self._is_finished(batch.seq):  # not by an earlier run
                    await batches.put(batch)
            if exhausted:
                break
        await batches.put(None)

    def _count_read(self, batch: Batch) -> None:
        assert batch.seq == len(self._rows_per_batch), "batches must come in input order"
        if self._checkpoint is not None and self._is_finished(batch.seq):
            # Read for the first time, so finished by the unfinished run: is it the same?
            self._checkpoint.check_keys(batch.seq, batch.keys)
        self._rows_per_batch.append(len(batch))
        self.stats.batches_read += 1
        self.stats.rows_read += len(batch)

    def _check_nothing_finished_beyond_input(self) -> None:
        # The whole input is read: the unfinished run cannot have finished more (a --limit
        # stops early on purpose, and the output then covers only what it read).
        if self._checkpoint is not None and self.limit is None:
            self._checkpoint.check_length(len(self._rows_per_batch))

    def _is_finished(self, seq: int) -> bool:
        return seq < len(self._finished) and self._finished[seq] == 1

    async def _dispatch(
        self,
        batches: asyncio.Queue[Batch | None],
        outcomes: asyncio.Queue[list[Outcome] | None],
        dispatcher: Dispatcher,
    ) -> None:
        async with asyncio.TaskGroup() as group:
            while (batch := await batches.get()) is not None:
                await self._outstanding.acquire()
                if self._stopping.is_set():
                    self._outstanding.release()
                    continue  # left for the next run
                task = group.create_task(self._complete(batch, dispatcher, outcomes))
                self._requests.add(task)
                task.add_done_callback(self._requests.discard)
        await outcomes.put(None)

    async def _complete(
        self,
        batch: Batch,
        dispatcher: Dispatcher,
        outcomes: asyncio.Queue[list[Outcome] | None],
    ) -> None:
        try:
            finished = await dispatcher.send(batch)
        finally:
            self._outstanding.release()
        if finished:
            await outcomes.put(finished)

    async def _write(self, outcomes: asyncio.Queue[list[Outcome] | None], journal: Journal) -> None:
        # What finished together goes in one journal message: one table to build and one
        # write for many small batches (an image each) rather than one per batch.
        ended = False
        while not ended and (finished := await outcomes.get()) is not None:
            together = [finished]
            rows = sum(len(outcome.batch) for outcome in finished)
            while rows < JOURNAL_MESSAGE_ROWS and not outcomes.empty():
                more = outcomes.get_nowait()
                if more is None:
                    ended = True
                    break
                together.append(more)
                rows += sum(len(outcome.batch) for outcome in more)
            self._journal(together, journal)

    def _journal(self, together: list[list[Outcome]], journal: Journal) -> None:
        """Journal the outcomes of one or more batches (``together``: each batch's, in row
        order), then count them."""
        kept = self._kept_names(together[0][0].batch)
        # What was sent for each batch, before the batch is journaled: a resume checks it.
        self._digest_log.append(
            (seq, bytes(self._batch_digests[seq * DIGEST_BYTES : (seq + 1) * DIGEST_BYTES]))
            for seq in (finished[0].batch.seq for finished in together)
        )
        journal.append(
            outcome_table(
                list(chain.from_iterable(together)),
                kept,
                self._field_types,
                self.job.output.result_fields,
            )
        )
        for finished in together:
            seq = finished[0].batch.seq
            if seq >= len(self._finished):
                self._finished.extend(bytes(seq + 1 - len(self._finished)))
            self._finished[seq] = 1
            for outcome in finished:
                self._count(outcome)

    def _count(self, outcome: Outcome) -> None:
        kind = self.stats.count_outcome(outcome, self._clock.now() - self._started_clock)
        if kind is None or kind == NOT_SENT:
            return
        self._failures_logged += 1
        if self._failures_logged <= LOGGED_FAILURES:
            _log_failure(outcome)
        elif self._failures_logged == LOGGED_FAILURES + 1:
            log.warning("more batches failed; the summary counts them all")

    @staticmethod
    def _kept_names(batch: Batch) -> list[str]:
        return batch.kept.schema.names if batch.kept is not None else []

    def _record_not_sent(self, source: Source, journal: Journal, reason: str) -> None:
        # After a fatal answer the output still covers every input row: those that were
        # not finished are error rows saying why (a later run sends them).
        message = f"not sent: the run was aborted ({reason})"
        for batch in self._batches(source):
            if batch.seq >= len(self._rows_per_batch):
                self._count_read(batch)
            if len(batch) and not self._is_finished(batch.seq):
                self._journal([[Outcome(batch, None, error=message, error_kind=NOT_SENT)]], journal)
        self._check_nothing_finished_beyond_input()

    async def _report(self) -> None:
        assert self._on_progress is not None
        while True:
            await self._clock.sleep(self._progress_interval)
            self._on_progress(self.snapshot())

    def snapshot(self) -> StatsSnapshot:
        total, estimated = None, False
        if self._read_everything:
            total = self.stats.rows_read
        elif self._source is not None:
            total = _expected_rows(self._source, self.limit)
            if total is None:
                # CSV, JSON lines: extrapolated from the bytes read, until read through.
                total = self._source.estimated_rows()
                if total is not None:
                    estimated = True
                    total = max(total, self.stats.rows_read + self.stats.rows_skipped)
                    total = total if self.limit is None else min(total, self.limit)
            if total is not None:
                total -= self.stats.rows_skipped  # input.incremental: done by earlier runs
        limiter = self._limiter.statistics()
        return self.stats.snapshot(
            limiter.in_flight,
            self._clock.now() - self._started_clock,
            total=total,
            concurrency_limit=limiter.limit,
            total_estimated=estimated,
        )


def _expected_rows(source: Source, limit: int | None) -> int | None:
    # Only what is cheap (Parquet metadata): counting a CSV would read it twice.
    rows = source.count_rows()
    if rows is None:
        return None
    return rows if limit is None else min(rows, limit)


def _log_failure(outcome: Outcome) -> None:
    batch = outcome.batch
    if outcome.attempts == 0:  # refused before sending: a file too large or unreadable
        log.warning("key %s was not sent: %s", batch.keys[0], outcome.error)
        return
    log.warning(
        "batch %d (%d rows from key %s) failed after %d attempts: %s",
        batch.seq, len(batch), batch.keys[0], outcome.attempts, outcome.error,
    )  # fmt: skip


def _first_leaf(group: BaseExceptionGroup[BatchRunnerError]) -> BatchRunnerError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _only(batches: Iterator[Batch], keys: Collection[str]) -> Iterator[Batch]:
    """``batches`` with only the items whose key is in ``keys`` (a batch may come out empty:
    nothing to send)."""
    for batch in batches:
        wanted = [index for index, key in enumerate(batch.keys) if key in keys]
        yield batch if len(wanted) == len(batch) else batch.take(wanted)


def _take(iterator: Iterator[Batch], count: int) -> list[Batch]:
    return list(islice(iterator, count))


def run_job(job: Job, **options: Any) -> RunReport:
    """Run ``job`` to the end on a fresh event loop (see ``Runner`` for the options)."""
    return asyncio.run(Runner(job, **options).run())
