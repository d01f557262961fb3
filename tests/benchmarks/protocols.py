"""batchrunner in protocol oip-v2 against a real Seldon MLServer and against the embedded
service, and MLServer's own ceiling. Run by hand (issue 14's figures):

    .ci/server-envs.sh "$PWD/.servers" "$(command -v uv)"      # once: MLServer's venv
    BATCHRUNNER_SERVER_ENVS=$PWD/.servers python -m tests.benchmarks.protocols [--rows N]

Each server runs in its own process. For each, batchrunner runs the same job (an iris CSV
of ``--rows`` rows, batches of ``--batch-size``, ``--concurrency`` in flight) as a whole
command, ``--repeat`` times; the figures are rows/s over the whole process (its wall time,
start-up included), CPU seconds and peak RSS. The ceiling is the server alone: one request
body built once and sent ``requests`` times by a plain aiohttp loop at the same
concurrency, no reading, encoding, decoding or writing on the client's side; what the
server answers then is the most any client could get.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from tests import realservers
from tests.benchmarks.bench import TOKEN, Service, measured
from tests.realservers import FEATURES

PYTHON = sys.executable


def job(
    folder: Path, data: Path, url: str, size: int, concurrency: int, token: bool = False
) -> Path:
    path = folder / "job.toml"
    token_line = 'token_env = "MODELARTS_TOKEN"\n' if token else ""
    path.write_text(
        f'name = "bench"\n[input]\npath = "{data}"\nid_column = "id"\n'
        f"columns = {json.dumps(FEATURES)}\n"
        f'[service]\nurl = "{url}"\nprotocol = "oip-v2"\n{token_line}'
        f"[batch]\nsize = {size}\nconcurrency = {concurrency}\n"
        f'[output]\npath = "{folder / "out.parquet"}"\n'
    )
    return path


def run(job_path: Path, env: dict[str, str], rows: int) -> tuple[float, float, float]:
    command = [PYTHON, "-m", "batchrunner", "run", str(job_path), "--no-progress", "--no-resume"]
    wall, cpu, rss, _, stderr = measured(command, env)
    summary = json.loads(Path(job_path.parent / "out.parquet.summary.json").read_text())
    if summary["rows"]["ok"] != rows:
        raise RuntimeError(f"not every row ok: {summary['rows']}\n{stderr[-2000:]}")
    return rows / wall, cpu, rss


async def ceiling(url: str, size: int, concurrency: int, requests: int, token: str | None) -> float:
    """Rows/s the server answers one prebuilt body at ``concurrency``."""
    with realservers.IRIS_CSV.open() as handle:
        iris = list(csv.DictReader(handle))
    data = [float(iris[i % len(iris)][f]) for i in range(size) for f in FEATURES]
    body = json.dumps(
        {"inputs": [{"name": "input-0", "shape": [size, 4], "datatype": "FP64", "data": data}]}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["X-Auth-Token"] = token
    left = requests

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=body, headers=headers) as answer:
                await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"{answer.status}: {(await answer.text())[:300]}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return requests * size / (time.perf_counter() - started)


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):>9,.0f} (range {min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-protocols-"))
    data = realservers.iris_rows(folder / "rows.csv", args.rows)
    requests = max(1, args.rows // args.batch_size)
    plain_env = {k: v for k, v in os.environ.items() if k != "MODELARTS_TOKEN"}
    print(
        f"{args.rows:,} iris rows, oip-v2, batches of {args.batch_size}, "
        f"concurrency {args.concurrency}; rows/s over the whole process, median of "
        f"{args.repeat} (range)"
    )
    server, _ = realservers.mlserver(folder / "mlserver")
    with realservers.running(server):
        url = f"{server.base}/v2/models/iris/infer"
        path = job(folder, data, url, args.batch_size, args.concurrency)
        figures = [run(path, plain_env, args.rows) for _ in range(args.repeat)]
        top = [
            asyncio.run(ceiling(url, args.batch_size, args.concurrency, requests, None))
            for _ in range(args.repeat)
        ]
    print(f"  MLServer   batchrunner {median_range([f[0] for f in figures])} rows/s"
          f"  cpu {statistics.median(f[1] for f in figures):.2f} s"
          f"  rss {statistics.median(f[2] for f in figures):.0f} MB")  # fmt: skip
    print(
        f"  MLServer   ceiling     {median_range(top)} rows/s (one prebuilt body, no client work)"
    )
    service = Service("iris")
    try:
        url = f"http://127.0.0.1:{service.port}/v2/models/iris/infer"
        path = job(folder, data, url, args.batch_size, args.concurrency, token=True)
        env = {**os.environ, "MODELARTS_TOKEN": TOKEN}
        figures = [run(path, env, args.rows) for _ in range(args.repeat)]
        top = [
            asyncio.run(ceiling(url, args.batch_size, args.concurrency, requests, TOKEN))
            for _ in range(args.repeat)
        ]
    finally:
        service.close()
    print(f"  embedded   batchrunner {median_range([f[0] for f in figures])} rows/s"
          f"  cpu {statistics.median(f[1] for f in figures):.2f} s"
          f"  rss {statistics.median(f[2] for f in figures):.0f} MB")  # fmt: skip
    print(
        f"  embedded   ceiling     {median_range(top)} rows/s (one prebuilt body, no client work)"
    )


if __name__ == "__main__":
    main()
