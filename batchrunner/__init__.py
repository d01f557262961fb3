"""batchrunner: run a model deployed as a REST inference service over a whole dataset.

Imports flow one way, down this list; a module imports only from those above it:

    errors      the BatchRunnerError tree, the exit codes
    clock       time as a run sees it (now, wall time, sleep, call later): one object,
                passed down, faked by tests
    startup     what the command's process leaves out before its first request (pandas,
                pydantic's plugin discovery)
    listing     boto3's side of a bucket: one level of a prefix, page by page (its
                paginator), in a local folder's order; an object read with one GET
    storage     s3:// and obs:// locations through pyarrow.fs.S3FileSystem: listing, reading,
                whole-or-absent uploads
    objectfiles an object opened for Arrow's table readers, each range read tried again on
                the store's transient errors
    items       plain data passed between stages (Batch, Outcome)
    job         the job file: settings (the pydantic models: common, service, settings),
                loading (TOML, overrides, ${ENV} expansion, validation), identity
                (fingerprint), output (the output path's placeholders)
    sources     one reader per input kind (tabular; images: folders, globs, manifests, the
                walk of an image folder)
    protocols   request encoding, response decoding, one module per wire format
                (modelarts: text and file input; columnar: regular answers straight into
                Arrow columns; multipart: one-file form bodies; json, kserve-v1, oip-v2,
                mlflow; openai: chat and embeddings)
    retry       pure retry decisions
    limiter     concurrency bound (fixed or adaptive) and rate limit
    tokenmeter  language models' tokens: requests and tokens a minute, the servers'
                x-ratelimit headers, a run's token budget
    auth        secrets and masking; token providers (env, file) and single-flight renewal
    client      the only module that imports the aiohttp client (the service, the IAM login)
    iam         the IAM token source: login request and answer, token cache, renewal
    credentials the token source and AppCode that [service] chooses; the object store
                that [storage] describes
    report      each stage's frozen statistics and the snapshot that combines them; latency
                histogram, timeline
    summary     the run summary, typed (RunSummary): built from the final snapshot, to and
                from the JSON of <output>.summary.json
    metrics     a run's figures in Prometheus' text format (textfile collector), written
                atomically
    notify      telling someone a run ended: a command given the summary, an incoming webhook
    gate        the gate every request passes: its token, renewed once for all the
                requests a refusal hits, and the fatal answer that bars the rest
    dispatch    one batch's life on the wire: limiter, codec, client, retries, splitting,
                token renewal
    writing     local writes: aside and renamed, leftovers of killed runs, writability
    formats     the output's file formats: Parquet, CSV, JSON lines (by the path's suffix)
    sink        the run's results: rows (outcomes as Arrow record batches), schemas (merged,
                JSON text where types disagree), the journal of finished batches, assembly
                into one output file in input order
    keyhash     row hashes: keys and what is sent for them, 64 bits, numpy a column at a time
    keyspill    keys spilled to partition files by hash, each sorted on its own: the
                duplicate-key check
    keyindex    the key index of finished items, on disk, checked partition by partition
    checkpoint  run state for resume: where it lives, whether it is this job's, what it holds
    lock        one run per job at a time (flock)
    incremental the items earlier runs finished (a key index), the filter that leaves them out
    service     the embedded reference service, iris and colors (the only user of aiohttp.web),
                with its IAM, and small language models behind OpenAI-compatible routes;
                gateway (counts, JSON errors, middlewares), handlers, app (put together, run)
    expectations what validate asks a server about its model (OIP v2 metadata, KServe v1
                status, MLflow ping) before any request
    wiring      what a run needs whichever the engine: source, codec, client, limiter, the
                plan, the summary, the one result type (RunReport, RunOutcome)
    engines     local (the asyncio pipeline, `run`: runner, a run's life; control, signals,
                grace period, progress; reading and finishing, the stages around dispatch);
                a Ray run: blocks (its finished blocks, in a folder or a bucket, for
                resume), blockscoring (the actor side: a block in, its part out),
                blockcommit (the driver's coverage check and commit), ray (Ray Data, the
                only module that imports ray, lazily; `run --engine ray`); neither engine
                imports the other
    watch       a run watched from outside: its metrics file during and after, its
                notification at the end
    schedule    cron lines: schedules checked, the line built, the crontab edited (pure)
    crontab     the system side of cron: the crontab command, the installed command
    inspection  an output file read back: summary, counts by status, error kinds, fields
    retrying    `batchrunner retry`: an output's error rows sent again, the output rewritten
    api         the library API: load, plan, run on either engine, read back (re-exported here)
    display     how a run looks to a person: progress, the summary table, the plan (text,
                rich renderables); never prints
    outputview  how an output looks to a person (`inspect`): its summary and counts, its
                rows, a field's counts, the charts of its run; never prints
    htmlreport  `inspect --html`: one self-contained HTML page (inline SVG charts) about a run
    cli         the typer app, the only place that prints or exits: common (the app, logs,
                errors said), running (run, retry, validate), serving, scheduling (cron),
                inspecting
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The library API. Imported when first used, so that ``import batchrunner`` (and so the
# command line's start-up) does not pay for the job model, pyarrow and aiohttp up front.
_EXPORTS = {
    "load_job": "batchrunner.job",
    "Job": "batchrunner.job",
    "job_from_settings": "batchrunner.api",
    "plan": "batchrunner.api",
    "run": "batchrunner.api",
    "read_output": "batchrunner.api",
    "Engine": "batchrunner.api",
    "Outcome": "batchrunner.api",
    "RunReport": "batchrunner.api",
    "RunSummary": "batchrunner.summary",
    "Plan": "batchrunner.wiring",
    "Inspection": "batchrunner.inspection",
    "BatchRunnerError": "batchrunner.errors",
    "JobError": "batchrunner.errors",
    "SettingError": "batchrunner.errors",
    "InputError": "batchrunner.errors",
    "StateError": "batchrunner.errors",
    "ServiceError": "batchrunner.errors",
    "AuthError": "batchrunner.errors",
    "CoverageError": "batchrunner.errors",
    "LockedError": "batchrunner.errors",
    "RunInterrupted": "batchrunner.errors",
}

__all__ = [
    "AuthError",
    "BatchRunnerError",
    "CoverageError",
    "Engine",
    "InputError",
    "Inspection",
    "Job",
    "JobError",
    "LockedError",
    "Outcome",
    "Plan",
    "RunInterrupted",
    "RunReport",
    "RunSummary",
    "ServiceError",
    "SettingError",
    "StateError",
    "__version__",
    "job_from_settings",
    "load_job",
    "plan",
    "read_output",
    "run",
]

if TYPE_CHECKING:
    from batchrunner.api import (
        Engine,
        Outcome,
        RunReport,
        job_from_settings,
        plan,
        read_output,
        run,
    )
    from batchrunner.errors import (
        AuthError,
        BatchRunnerError,
        CoverageError,
        InputError,
        JobError,
        LockedError,
        RunInterrupted,
        ServiceError,
        SettingError,
        StateError,
    )
    from batchrunner.inspection import Inspection
    from batchrunner.job import Job, load_job
    from batchrunner.summary import RunSummary
    from batchrunner.wiring import Plan


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchrunner' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
