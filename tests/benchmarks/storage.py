"""Input in a bucket against the same input on local disk (issue 15's figures). Run by hand:

    python -m tests.benchmarks.storage                      # 1,000,000 rows, 10,000 images
    python -m tests.benchmarks.storage --rows 100000 --images 1000 --repeat 1   # a quick look

The S3 server is moto's (``moto[server]``, the tests' server), in this process on loopback;
everything measured runs in a child process of its own, timed as a whole (wall time from
start to exit, start-up included) with its peak RSS, ``--repeat`` times: the median and
the range are printed side by side.

- Tables: a Parquet file of ``--rows`` rows (an id and five float columns) is read through
  batchrunner's own source (``open_source``, batches as a run makes them) from disk and from
  the bucket: rows/s. Beside it, moto alone: the same object read whole by Arrow, nothing
  parsed (the most the server gives).
- Images: ``--images`` small PNGs, 500 to a folder, as files and as objects (the same keys
  and bytes), sent by ``batchrunner run`` to ``batchrunner serve --model colors
  --latency-ms 50`` (its own process) at ``--concurrency``: images/s over the whole process
  and the run's own rate (its summary's ``rows_per_second``), and each as a share of the
  latency limit ``concurrency / latency``. Beside it, moto alone: the prefix listed
  (keys/s), and the objects fetched at the same concurrency with no service (objects/s).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tests.benchmarks.bench import TOKEN, Service, measured
from tests.s3 import ACCESS_KEY, S3, SECRET_KEY, moto_server

PYTHON = sys.executable
FILES_PER_FOLDER = 500
ENV = {
    **os.environ,
    "BENCH_S3_ACCESS_KEY": ACCESS_KEY,
    "BENCH_S3_SECRET_KEY": SECRET_KEY,
    "MODELARTS_TOKEN": TOKEN,
}

# Reads the job's input as a run does, counting rows (a child process: measured whole).
READ = """
import sys
from batchrunner.job import load_job
from batchrunner.wiring import batch_size_for, job_store, kind_of, open_source
job = load_job(sys.argv[1])
source = open_source(job, job_store(job))
size = batch_size_for(job, kind_of(source))
print(sum(len(batch) for batch in source.iter_batches(size)))
"""

# moto alone: one object read whole by Arrow, nothing parsed.
READ_OBJECT = """
import sys, pyarrow.fs as pafs
fs = pafs.S3FileSystem(access_key=sys.argv[2], secret_key=sys.argv[3], region="us-east-1",
                       endpoint_override=sys.argv[1], scheme="http")
with fs.open_input_stream(sys.argv[4]) as stream:
    total = 0
    while chunk := stream.read(8 << 20):
        total += len(chunk)
print(total)
"""

# moto alone: a prefix listed with boto3's paginator, then its objects fetched at a given
# concurrency (threads), nothing else done with them: by Arrow (a HEAD and a GET each), then
# by boto3 (one GET each).
LIST_AND_FETCH = """
import sys, time, boto3
from concurrent.futures import ThreadPoolExecutor
import pyarrow.fs as pafs
endpoint, access, secret, bucket, prefix, concurrency = sys.argv[1:7]
client = boto3.session.Session().client("s3", endpoint_url="http://" + endpoint,
    aws_access_key_id=access, aws_secret_access_key=secret, region_name="us-east-1")
started = time.perf_counter()
keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(
    Bucket=bucket, Prefix=prefix) for item in page.get("Contents", ())]
listed = time.perf_counter() - started
fs = pafs.S3FileSystem(access_key=access, secret_key=secret, region="us-east-1",
                       endpoint_override=endpoint, scheme="http")
def fetch(key):
    with fs.open_input_file(bucket + "/" + key) as file:
        return len(file.read())
def get(key):  # one GET, as batchrunner fetches an image when boto3 is installed
    return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())
rates = []
for way in (fetch, get):
    started = time.perf_counter()
    with ThreadPoolExecutor(int(concurrency)) as pool:
        fetched = sum(1 for _ in pool.map(way, keys))
    rates.append(fetched / (time.perf_counter() - started))
print(len(keys) / listed, *rates)
"""


def median_range(values: list[float], unit: str, digits: int = 0) -> str:
    middle = statistics.median(values)
    return (
        f"{middle:>10,.{digits}f} {unit} (range {min(values):,.{digits}f}-"
        f"{max(values):,.{digits}f})"
    )


def repeated(times: int, measure: Callable[[], tuple[float, ...]]) -> list[tuple[float, ...]]:
    return [measure() for _ in range(times)]


def column(figures: list[tuple[float, ...]], index: int) -> list[float]:
    return [figure[index] for figure in figures]


def storage_section(endpoint: str) -> str:
    return (
        f'[storage]\nendpoint = "{endpoint}"\nregion = "us-east-1"\naddressing = "path"\n'
        'access_key_env = "BENCH_S3_ACCESS_KEY"\nsecret_key_env = "BENCH_S3_SECRET_KEY"\n'
    )


# -- tables --------------------------------------------------------------------------------


def parquet_rows(path: Path, rows: int) -> None:
    schema = pa.schema([("id", pa.string())] + [(f"f{i}", pa.float64()) for i in range(5)])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 250_000):
            count = min(250_000, rows - start)
            values = pa.array([float((start + j) % 1000) for j in range(count)])
            ids = pa.array([str(start + j) for j in range(count)])
            writer.write_table(pa.table([ids, *[values] * 5], schema=schema))


def read_input(folder: Path, source: str, endpoint: str, rows: int) -> tuple[float, float]:
    job = folder / "read.toml"
    job.write_text(
        f'name = "bench"\n[input]\npath = "{source}"\nid_column = "id"\n'
        f'[service]\nurl = "embedded:iris"\n[output]\npath = "{folder / "o.parquet"}"\n'
        + storage_section(endpoint)
    )
    wall, _, rss, stdout, stderr = measured([PYTHON, "-c", READ, str(job)], ENV)
    if stdout.strip() != str(rows):
        raise RuntimeError(f"read {stdout.strip()!r} rows, not {rows}: {stderr[-2000:]}")
    return rows / wall, rss


def tables(s3: S3, folder: Path, rows: int, repeat: int) -> None:
    local = folder / "rows.parquet"
    parquet_rows(local, rows)
    s3.bucket("bench")
    with local.open("rb") as file, s3.fs.open_output_stream("bench/rows.parquet") as sink:
        while chunk := file.read(8 << 20):
            sink.write(chunk)
    size = local.stat().st_size
    print(f"\nTables: {rows:,} rows of Parquet ({size / 1e6:.1f} MB), read by batchrunner's source")
    disk = repeated(repeat, lambda: read_input(folder, str(local), s3.endpoint, rows))
    bucket = repeated(
        repeat, lambda: read_input(folder, "s3://bench/rows.parquet", s3.endpoint, rows)
    )
    host = s3.endpoint.removeprefix("http://")

    def moto_alone() -> tuple[float, float]:
        command = [PYTHON, "-c", READ_OBJECT, host, ACCESS_KEY, SECRET_KEY, "bench/rows.parquet"]
        wall, _, rss, _, _ = measured(command, ENV)
        return size / wall / 1e6, rss

    alone = repeated(repeat, moto_alone)
    ratio = statistics.median(column(disk, 0)) / statistics.median(column(bucket, 0))
    print(f"  local disk  {median_range(column(disk, 0), 'rows/s')}"
          f"  peak RSS {statistics.median(column(disk, 1)):.0f} MB")  # fmt: skip
    print(f"  moto S3     {median_range(column(bucket, 0), 'rows/s')}"
          f"  peak RSS {statistics.median(column(bucket, 1)):.0f} MB"
          f"  disk/bucket {ratio:.2f}x (aim: within 1.3x)")  # fmt: skip
    print(f"  moto alone  {median_range(column(alone, 0), 'MB/s', 1)}"
          f"  (the object read whole by Arrow, nothing parsed)")  # fmt: skip


# -- images --------------------------------------------------------------------------------


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (220, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def image_keys(count: int) -> list[str]:
    return [f"f{i // FILES_PER_FOLDER:04d}/{i:07d}.png" for i in range(count)]


def seed_images(s3: S3, folder: Path, count: int) -> None:
    """The same keys and bytes as files and as objects (put straight into moto's store in
    this process: over HTTP one by one takes minutes)."""
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    content = png()
    backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
    s3.bucket("photos")
    for key in image_keys(count):
        path = folder / "images" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        backend.put_object("photos", f"images/{key}", content)


def run_images(
    folder: Path, source: str, endpoint: str, url: str, concurrency: int, count: int
) -> tuple[float, float, float]:
    job = folder / "images.toml"
    output = folder / "images-out.parquet"
    job.write_text(
        f'name = "bench-images"\n[input]\npath = "{source}"\n'
        f'[service]\nurl = "{url}"\n[batch]\nconcurrency = {concurrency}\n'
        f'[output]\npath = "{output}"\n' + storage_section(endpoint)
    )
    command = [PYTHON, "-m", "batchrunner", "run", str(job), "--no-progress", "--no-resume"]
    wall, _, rss, _, stderr = measured(command, ENV)
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    if summary["rows"]["ok"] != count:
        raise RuntimeError(f"not every image ok: {summary['rows']}\n{stderr[-2000:]}")
    return count / wall, float(summary["rows_per_second"]), rss


def images(
    s3: S3, folder: Path, count: int, latency_ms: float, concurrency: int, repeat: int
) -> None:
    seed_images(s3, folder, count)
    limit = concurrency / (latency_ms / 1000)
    print(
        f"\nImages: {count:,} PNGs of {len(png())} bytes, batchrunner serve --model colors "
        f"--latency-ms {latency_ms:g}, concurrency {concurrency}: the latency limit is "
        f"{limit:,.0f} images/s"
    )
    service = Service("colors", "--latency-ms", str(latency_ms))
    try:
        local = str(folder / "images")

        def measure(source: str) -> list[tuple[float, ...]]:
            return repeated(
                repeat,
                lambda: run_images(folder, source, s3.endpoint, service.url, concurrency, count),
            )

        disk = measure(local)
        bucket = measure("s3://photos/images/")
    finally:
        service.close()
    host = s3.endpoint.removeprefix("http://")
    command = [PYTHON, "-c", LIST_AND_FETCH, host, ACCESS_KEY, SECRET_KEY, "photos", "images/",
               str(concurrency)]  # fmt: skip
    alone = repeated(
        repeat, lambda: tuple(map(float, subprocess.check_output(command, env=ENV).split()))
    )
    for name, figures in (("local disk", disk), ("moto S3", bucket)):
        whole, own = statistics.median(column(figures, 0)), statistics.median(column(figures, 1))
        print(f"  {name:<10}  {median_range(column(figures, 0), 'images/s')} whole process"
              f" ({whole / limit:.2f} of the limit); the run's own "
              f"{median_range(column(figures, 1), 'images/s')} ({own / limit:.2f})"
              f"  peak RSS {statistics.median(column(figures, 2)):.0f} MB")  # fmt: skip
    print(f"  moto alone  listing {median_range(column(alone, 0), 'keys/s')}; fetching at "
          f"concurrency {concurrency}: Arrow (HEAD+GET) "
          f"{median_range(column(alone, 1), 'objects/s')}, boto3 (GET) "
          f"{median_range(column(alone, 2), 'objects/s')}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["tables", "images"], default=None)
    args = parser.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1, 5, 15 min), {os.cpu_count()} CPUs; median of {args.repeat} (range)")  # fmt: skip
    servers = moto_server()
    host, port = next(servers)
    s3 = S3(host, port)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-storage-") as temporary:
            folder = Path(temporary)
            if args.only in (None, "tables"):
                tables(s3, folder, args.rows, args.repeat)
            if args.only in (None, "images"):
                images(s3, folder, args.images, args.latency_ms, args.concurrency, args.repeat)
    finally:
        servers.close()
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")


if __name__ == "__main__":
    main()
