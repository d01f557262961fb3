"""batchrunner: run a model deployed as a REST inference service over a whole dataset.

Imports flow one way, down this list; a module imports only from those above it:

    errors      the BatchRunnerError tree
    storage     s3:// and obs:// locations through pyarrow.fs.S3FileSystem: listing, reading,
                whole-or-absent uploads
    items       plain data passed between stages (Batch, Outcome)
    job         the job file: load, ${ENV} expansion, overrides, validation, fingerprint
    sources     one reader per input kind (tabular; images: folders, globs, manifests)
    protocols   request encoding, response decoding (modelarts: text and file input;
                multipart: one-file form bodies)
    retry       pure retry decisions
    limiter     concurrency bound (fixed or adaptive) and rate limit
    auth        secrets and masking; token providers (env, file) and single-flight renewal
    client      the only module that imports the aiohttp client (the service, the IAM login)
    iam         the IAM token source: login request and answer, token cache, renewal
    credentials the token source and AppCode that [service] chooses; the object store
                that [storage] describes
    report      run statistics and their frozen snapshot, latency histogram, summary
    dispatch    one batch's life on the wire: limiter, codec, client, retries, splitting,
                token renewal
    sink        the run's journal of finished batches; assembly into one Parquet file
    checkpoint  run state for resume: where it lives, whether it is this job's, what it holds
    lock        one run per job at a time (flock)
    incremental the items earlier runs finished (.seen.parquet), the filter that leaves them out
    service     the embedded reference service, iris and colors (the only user of aiohttp.web),
                with its IAM
    runner      the asyncio pipeline
    engines     other engines than the local pipeline: ray (Ray Data, the only module that
                imports ray, lazily; `run --engine ray`), blocks (a Ray run's finished
                blocks, for resume)
    schedule    cron lines: schedules checked, the line built, the crontab edited (pure)
    crontab     the system side of cron: the crontab command, the installed command
    inspection  an output file read back: summary, counts by status, error kinds, fields
    display     how runs and outputs look to a person (text, rich renderables); never prints
    cli         the typer app: the only place that prints or exits
"""

from __future__ import annotations

__version__ = "0.1.0"
