"""A local run's life: the job checked, its lock and state, the pipeline run, the output
committed with its summary.

    reading ──> dispatch ──> request tasks ──> finishing ──> assemble
    (thread)    (window)     (limiter, retry)  (journal)     (order, proof, rename)

Stages run in one ``asyncio.TaskGroup`` joined by bounded queues, so memory stays flat
whatever the input's size. The dispatch never starts a batch more than ``window`` batches
ahead of the oldest unfinished one, which bounds both the tasks alive and how far out of
order the journal can be. Each stage counts what it does (``statistics()``);
``Runner.snapshot`` combines them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import shutil
from collections.abc import Callable, Collection
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from batchrunner.auth import FixedToken, Scrubber, Secret, TokenProvider
from batchrunner.checkpoint import DigestLog, StatePaths, open_checkpoint
from batchrunner.client import ServiceClient
from batchrunner.clock import SYSTEM_CLOCK, Clock
from batchrunner.credentials import Credentials, read_credentials
from batchrunner.dispatch import Dispatcher
from batchrunner.engines.local.control import Stopping, report_progress
from batchrunner.engines.local.finishing import Finishing
from batchrunner.engines.local.reading import CHECK_BATCH_ROWS, Reading
from batchrunner.errors import BatchRunnerError, RequestError, RunInterrupted, ServiceError
from batchrunner.formats import batch_output_format
from batchrunner.incremental import SeenItems, check_reader, open_seen
from batchrunner.items import Batch, Outcome
from batchrunner.job import IMAGES, TABULAR, Engine, Job, job_identity, output_name_glob
from batchrunner.limiter import RateLimiter
from batchrunner.lock import JobLock
from batchrunner.protocols.openai import check_prompt, openai_codec
from batchrunner.report import (
    DispatchStatistics,
    FinishStatistics,
    ReadStatistics,
    RunStatistics,
    StatsSnapshot,
)
from batchrunner.sink import SUMMARY_METADATA_KEY, assemble
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
    make_limiter,
    new_run_id,
    open_source,
    retry_policy,
    service_client,
    writable_output,
)
from batchrunner.writing import remove_leftovers
from batchrunner.writing import write_json_atomically as write_summary

log = logging.getLogger("batchrunner")


class Runner:
    """One run of a job. ``await Runner(job).run()``; see ``run_job``.

    ``clock`` is the run's time (see ``clock``): backoffs and retry waits, the unreachable
    timer, the progress reporter, the grace period, the rate limiter and token renewal all
    run on it; ``rng`` draws the backoffs' jitter. Tests inject their own of both, so that
    time-dependent behaviour is deterministic.

    Its stages (``reading``, ``dispatcher``, ``finishing``) exist once the run has opened
    its input and state; ``statistics()`` gives each one's figures, ``snapshot()`` them
    combined.
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
        self._clock = clock
        self._scrubber = Scrubber()  # every secret the run holds (see Credentials.secrets)
        self._policy = retry_policy(job)
        self._limiter = make_limiter(job)
        self._stopping = Stopping(
            clock,
            job.batch.grace_period,
            lambda: self._limiter.statistics().in_flight,
            handle_signals=handle_signals,
        )
        # Batches started and not yet finished (sending, or waiting to retry): bounded, so
        # that memory stays flat; twice the concurrency keeps the pipe full during backoffs.
        self._outstanding = asyncio.Semaphore(2 * job.batch.max_in_flight)
        self._started_clock = 0.0
        self._meter: TokenMeter | None = None  # language models: tokens, their limits
        self._only_keys = only_keys  # `batchrunner retry`: send only these items
        self.reading: Reading | None = None
        self.dispatcher: Dispatcher | None = None
        self.finishing: Finishing | None = None

    # --- the run ------------------------------------------------------------------------------

    async def run(self) -> RunReport:
        job = self.job
        check_service_url(job.service)
        store = job_store(job)
        source = open_source(job, store)
        kind = kind_of(source)
        batch_size = batch_size_for(job, kind)
        if kind == TABULAR and job.service.openai is not None and job.service.openai.prompt:
            check_prompt(job.service.openai.prompt, list(source.send_columns))
            openai_codec(job)  # a JSON schema that is not one stops the job here (exit 2)
        credentials = (
            None if job.service.embedded_model else read_credentials(job.service, clock=self._clock)
        )
        if credentials is not None:
            self._scrubber = credentials.scrubber()
        started = datetime.now().astimezone()
        run_id = new_run_id(started)
        output = writable_output(job, started, run_id, store)  # before any request
        summary_path = output.with_name(output.name + SUMMARY_SUFFIX)
        paths = StatePaths.for_output(output, job.name, job.run.state_dir)
        identity = job_identity(job, source.paths, kind=kind)
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
            seen: SeenItems | None = None
            if job.input.incremental:
                seen = open_seen(paths.keys, url=job.service.url, legacy=paths.seen)
                # Before anything is sent: duplicate keys stop the run here (exit 2).
                check_size = batch_size if kind == IMAGES else CHECK_BATCH_ROWS
                read = check_reader(source, check_size, self.limit)
                await asyncio.to_thread(seen.check, read)
            reading = Reading(
                job,
                source,
                kind,
                batch_size,
                limit=self.limit,
                only_keys=self._only_keys,
                seen=seen,
                stopping=self._stopping.event,
            )
            resume_identity = identity if seen is None else seen.resume_identity(identity)
            checkpoint = open_checkpoint(
                paths,
                resume_identity,
                resume=self.resume,
                scan=functools.partial(reading.scan_for_resume, paths.state),
            )
            reading.start(checkpoint, paths.state)
            if checkpoint.note:
                log.info("%s", checkpoint.note)
            if seen is not None and isinstance(output, Path):
                seen.check_output(output, resuming=checkpoint.resumed_rows > 0)
            # Language models: the tokens earlier runs of this unfinished run spent count
            # against max_total_tokens too.
            spent = read_spent(paths.state) if checkpoint.resumed_rows else None
            self._meter = token_meter(
                job, clock=self._clock.now, sleep=self._clock.sleep, spent=spent
            )
            self._started_clock = self._clock.now()
            self.finishing = Finishing(
                checkpoint.journal,
                DigestLog(paths.digests),
                reading.finished,
                reading.digest,
                lambda: self._clock.now() - self._started_clock,
                result_fields=job.output.result_fields,
                resumed=checkpoint.resumed,
            )
            self.reading = reading
            log.info(
                "run %s: %s -> %s via %s (batch %d, concurrency %s)",
                run_id, job.input.path, output, job.service.url,
                batch_size, job.batch.concurrency,
            )  # fmt: skip
            abort_reason = await self._run_pipeline(credentials, paths)
            duplicates = reading.duplicates()
            final = self.snapshot()
            if seen is not None and not final.rows_done and final.rows_skipped:
                log.info("nothing new: %s items already done", f"{final.rows_skipped:,}")
            if not final.rows_read and not final.rows_skipped and abort_reason is None:
                log.warning("%s has no rows (only a header?): the output is empty", job.input.path)
            outcome = self._judge(final, abort_reason)
            summary = job_summary(job, final, identity, run_id, output, started, outcome)
            if duplicates:
                summary = replace(summary, duplicate_keys=duplicates.to_json())
            document = summary.to_json()
            # An output in a bucket is assembled in the state folder, then uploaded whole.
            written = output if isinstance(output, Path) else paths.assembled(output.suffix)
            assemble(
                paths.state,
                written,
                reading.rows_per_batch,
                metadata={SUMMARY_METADATA_KEY: orjson.dumps(document)},
                format=batch_output_format(job, written),
            )
            if isinstance(output, ObjectPath) and isinstance(summary_path, ObjectPath):
                output.store.upload(written, output)
                output.store.put_bytes(
                    orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n", summary_path
                )
            else:
                assert isinstance(summary_path, Path)
                write_summary(summary_path, document)
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

    async def _run_pipeline(self, credentials: Credentials | None, paths: StatePaths) -> str | None:
        """Run the pipeline to its end; the reason if a fatal answer aborted it."""
        assert self.reading is not None and self.finishing is not None
        finishing = self.finishing
        abort_reason: str | None = None
        self._stopping.install()
        try:
            async with AsyncExitStack() as stack:
                client, tokens = await self._open_client(stack, credentials)
                try:
                    await self._pipeline(self.reading, client, tokens, finishing)
                except ServiceError as exc:
                    abort_reason = str(exc)
                    log.error("run aborted: %s", abort_reason)
                if abort_reason is None and self._meter is not None and self._meter.exhausted:
                    # The token budget: the requests in flight are done; the rest waits.
                    abort_reason = str(self._meter.exhausted)
                    self._stopping.event.clear()
            if abort_reason is not None:
                self._record_not_sent(self.reading, finishing, abort_reason)
        except asyncio.CancelledError:
            if not self._stopping.signals:
                raise
            finishing.journal.close()
            raise RunInterrupted(self._interrupted_message(paths)) from None
        finally:
            try:
                finishing.journal.close()  # may fail (a full disk): the rest is closed anyway
            finally:
                finishing.close()
                self._stopping.remove()
        if self._stopping.event.is_set():
            raise RunInterrupted(self._interrupted_message(paths))
        if self.reading.data_error is not None:
            raise self.reading.data_error
        return abort_reason

    def _interrupted_message(self, paths: StatePaths) -> str:
        done = self.snapshot().rows_done
        return (
            f"interrupted: {done:,} finished rows are kept in {paths.state}; "
            "re-run the same command to resume"
        )

    def stop(self) -> None:
        """Stop feeding new batches; requests in flight finish (see ``grace_period``)."""
        self._stopping.stop()

    def _judge(self, final: StatsSnapshot, abort_reason: str | None) -> RunOutcome:
        if abort_reason is not None:
            return RunOutcome.ABORTED
        total = final.rows_done
        if total and final.rows_error / total > self.job.max_error_rate:
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
        reading: Reading,
        client: ServiceClient,
        tokens: TokenProvider | None,
        finishing: Finishing,
    ) -> None:
        concurrency = self.job.batch.max_in_flight
        batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2 * concurrency)
        outcomes: asyncio.Queue[list[Outcome] | None] = asyncio.Queue(maxsize=2 * concurrency)
        self.dispatcher = dispatcher = Dispatcher(
            client,
            codec_for(self.job, reading.kind),
            self._limiter,
            self._policy,
            tokens=tokens,
            max_request_bytes=self.job.batch.max_request_bytes,
            rate=(
                RateLimiter(rate, clock=self._clock.now, sleep=self._clock.sleep)
                if (rate := self.job.batch.rate_limit)
                else None
            ),
            stopping=self._stopping.event,
            sleep=self._clock.sleep,
            rng=self._rng,
            scrubber=self._scrubber,
            unreachable_after=self.job.service.unreachable_after,
            clock=self._clock.now,
            meter=self._meter,
        )
        try:
            async with asyncio.TaskGroup() as group:
                reporter = None
                if self._on_progress is not None:
                    reporter = group.create_task(
                        report_progress(
                            self._clock, self._progress_interval, self.snapshot, self._on_progress
                        )
                    )
                group.create_task(reading.read(batches))
                group.create_task(self._dispatch(batches, outcomes, dispatcher))
                await group.create_task(finishing.write(outcomes))
                if reporter is not None:
                    reporter.cancel()
        except BaseExceptionGroup as group:
            # Surface our own error (e.g. the token refused) as itself, not inside a group.
            matched, _ = group.split(BatchRunnerError)
            if matched is None:
                raise
            raise _first_leaf(matched) from None

    async def _dispatch(
        self,
        batches: asyncio.Queue[Batch | None],
        outcomes: asyncio.Queue[list[Outcome] | None],
        dispatcher: Dispatcher,
    ) -> None:
        async with asyncio.TaskGroup() as group:
            while (batch := await batches.get()) is not None:
                await self._outstanding.acquire()
                if self._stopping.event.is_set():
                    self._outstanding.release()
                    continue  # left for the next run
                self._stopping.track(group.create_task(self._complete(batch, dispatcher, outcomes)))
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

    def _record_not_sent(self, reading: Reading, finishing: Finishing, reason: str) -> None:
        # After a fatal answer the output still covers every input row: those that were
        # not finished are error rows saying why (a later run sends them).
        message = f"not sent: the run was aborted ({reason})"
        for batch in reading.batches():
            if batch.seq >= len(reading.rows_per_batch):
                reading.count(batch)
            if len(batch) and not reading.is_finished(batch.seq):
                finishing.append([[Outcome(batch, None, error=message, error_kind=NOT_SENT)]])
        reading.check_nothing_finished_beyond_input()

    # --- what it has done ---------------------------------------------------------------------

    def statistics(self) -> RunStatistics:
        """Each stage's figures so far (zeros for a stage not started yet)."""
        reading, dispatcher, finishing = self.reading, self.dispatcher, self.finishing
        return RunStatistics(
            reading.statistics() if reading is not None else ReadStatistics(),
            dispatcher.statistics() if dispatcher is not None else DispatchStatistics(),
            finishing.statistics() if finishing is not None else FinishStatistics(),
        )

    def snapshot(self) -> StatsSnapshot:
        """The stages' figures combined, with the total when known and what is in flight."""
        total, estimated = (None, False) if self.reading is None else self.reading.total()
        limiter = self._limiter.statistics()
        return self.statistics().snapshot(
            limiter.in_flight,
            self._clock.now() - self._started_clock,
            total=total,
            concurrency_limit=limiter.limit,
            total_estimated=estimated,
        )


def _first_leaf(group: BaseExceptionGroup[BatchRunnerError]) -> BatchRunnerError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def run_job(job: Job, **options: Any) -> RunReport:
    """Run ``job`` to the end on a fresh event loop (see ``Runner`` for the options)."""
    return asyncio.run(Runner(job, **options).run())
