"""Input in a bucket against the same input on local disk (issue 15's figures). Run by hand:

    python -m tests.benchmarks.storage                      # 1,000,000 rows, 10,000 images
    python -m tests.benchmarks.storage --rows 100000 --images 1000 --repeat 1   # a quick look

The S3 server is moto's (``moto[server]``, the tests' server), in this process on loopback,
or with ``--server s3rver`` a Node.js S3 server (``npm install s3rver@3``; ``--s3rver`` names
its command, default ``s3rver`` on the PATH), in a process of its own: moto serves a few
hundred small objects a second, below the images' latency limit, so its figure is moto's;
s3rver is fast enough to show batchrunner's own. Everything measured runs in a child
process of its own, timed as a whole (wall time from start to exit, start-up included) with
its peak RSS, ``--repeat`` times: the median and the range are printed side by side.

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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
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
S3RVER_KEY = "S3RVER"  # s3rver's own access key and secret (it checks signatures with them)

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

# the store alone: one object read whole by Arrow, nothing parsed.
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

# the store alone: a prefix listed with boto3's paginator (ListObjects: s3rver fails on V2),
# then its objects fetched at a given concurrency (threads), nothing else done with them: by
# Arrow (a HEAD and a GET each), then by boto3 (one GET each).
LIST_AND_FETCH = """
import sys, time, boto3
from concurrent.futures import ThreadPoolExecutor
import pyarrow.fs as pafs
endpoint, access, secret, bucket, prefix, concurrency = sys.argv[1:7]
client = boto3.session.Session().client("s3", endpoint_url="http://" + endpoint,
    aws_access_key_id=access, aws_secret_access_key=secret, region_name="us-east-1")
started = time.perf_counter()
keys = [item["Key"] for page in client.get_paginator("list_objects").paginate(
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


class S3rver(S3):
    """s3rver (Node.js) in a process of its own, its objects in a temporary folder."""

    def __init__(self, command: str, folder: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        (folder / "s3rver").mkdir()
        self.process = subprocess.Popen(
            [command, "-d", str(folder / "s3rver"), "-a", "127.0.0.1", "-p", str(port),
             "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            self.process.kill()
            raise RuntimeError(f"{command} did not start listening on port {port}")
        self.host, self.port = "127.0.0.1", port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.fs = pafs.S3FileSystem(
            access_key=S3RVER_KEY, secret_key=S3RVER_KEY, endpoint_override=f"127.0.0.1:{port}",
            scheme="http", region="us-east-1", allow_bucket_creation=True,
        )  # fmt: skip

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def started(server: str, command: str, folder: Path) -> Iterator[S3]:
    """The chosen S3 server, running until the generator is closed."""
    if server == "s3rver":
        store = S3rver(command, folder)
        try:
            yield store
        finally:
            store.close()
        return
    servers = moto_server()
    host, port = next(servers)
    try:
        yield S3(host, port)
    finally:
        servers.close()


def keys_of(s3: S3) -> tuple[str, str]:
    return (S3RVER_KEY, S3RVER_KEY) if isinstance(s3, S3rver) else (ACCESS_KEY, SECRET_KEY)


def env_of(s3: S3) -> dict[str, str]:
    access, secret = keys_of(s3)
    return {**ENV, "BENCH_S3_ACCESS_KEY": access, "BENCH_S3_SECRET_KEY": secret}


def name_of(s3: S3) -> str:
    return "s3rver" if isinstance(s3, S3rver) else "moto"


# -- tables --------------------------------------------------------------------------------


def parquet_rows(path: Path, rows: int) -> None:
    schema = pa.schema([("id", pa.string())] + [(f"f{i}", pa.float64()) for i in range(5)])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 250_000):
            count = min(250_000, rows - start)
            values = pa.array([float((start + j) % 1000) for j in range(count)])
            ids = pa.array([str(start + j) for j in range(count)])
            writer.write_table(pa.table([ids, *[values] * 5], schema=schema))


def read_input(folder: Path, source: str, s3: S3, rows: int) -> tuple[float, float]:
    job = folder / "read.toml"
    job.write_text(
        f'name = "bench"\n[input]\npath = "{source}"\nid_column = "id"\n'
        f'[service]\nurl = "embedded:iris"\n[output]\npath = "{folder / "o.parquet"}"\n'
        + storage_section(s3.endpoint)
    )
    wall, _, rss, stdout, stderr = measured([PYTHON, "-c", READ, str(job)], env_of(s3))
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
    disk = repeated(repeat, lambda: read_input(folder, str(local), s3, rows))
    bucket = repeated(repeat, lambda: read_input(folder, "s3://bench/rows.parquet", s3, rows))
    host = s3.endpoint.removeprefix("http://")

    def store_alone() -> tuple[float, float]:
        command = [PYTHON, "-c", READ_OBJECT, host, *keys_of(s3), "bench/rows.parquet"]
        wall, _, rss, _, _ = measured(command, env_of(s3))
        return size / wall / 1e6, rss

    alone = repeated(repeat, store_alone)
    name = name_of(s3)
    ratio = statistics.median(column(disk, 0)) / statistics.median(column(bucket, 0))
    print(f"  local disk  {median_range(column(disk, 0), 'rows/s')}"
          f"  peak RSS {statistics.median(column(disk, 1)):.0f} MB")  # fmt: skip
    print(f"  {name + ' S3':<11} {median_range(column(bucket, 0), 'rows/s')}"
          f"  peak RSS {statistics.median(column(bucket, 1)):.0f} MB"
          f"  disk/bucket {ratio:.2f}x (aim: within 1.3x)")  # fmt: skip
    print(f"  {name + ' alone':<11} {median_range(column(alone, 0), 'MB/s', 1)}"
          f"  (the object read whole by Arrow, nothing parsed)")  # fmt: skip


# -- images --------------------------------------------------------------------------------


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (220, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def image_keys(count: int) -> list[str]:
    return [f"f{i // FILES_PER_FOLDER:04d}/{i:07d}.png" for i in range(count)]


def seed_images(s3: S3, folder: Path, count: int) -> None:
    """The same keys and bytes as files and as objects (into moto's store straight, in this
    process: over HTTP one by one takes minutes; into s3rver by PUTs from 16 threads)."""
    content = png()
    s3.bucket("photos")
    keys = image_keys(count)
    for key in keys:
        path = folder / "images" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    if isinstance(s3, S3rver):
        import boto3
        from botocore.config import Config

        # s3rver predates the SDKs' default checksums: sent as aws-chunked trailers, it would
        # keep them in the object's bytes, so they are asked for only where required.
        client = boto3.session.Session().client(
            "s3", endpoint_url=s3.endpoint, aws_access_key_id=S3RVER_KEY,
            aws_secret_access_key=S3RVER_KEY, region_name="us-east-1",
            config=Config(request_checksum_calculation="when_required"),
        )  # fmt: skip
        with ThreadPoolExecutor(16) as pool:
            put = partial(client.put_object, Bucket="photos", Body=content)
            list(pool.map(lambda key: put(Key=f"images/{key}"), keys))
        return
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
    for key in keys:
        backend.put_object("photos", f"images/{key}", content)


def run_images(
    folder: Path, source: str, s3: S3, url: str, concurrency: int, count: int
) -> tuple[float, float, float, float]:
    job = folder / "images.toml"
    output = folder / "images-out.parquet"
    job.write_text(
        f'name = "bench-images"\n[input]\npath = "{source}"\n'
        f'[service]\nurl = "{url}"\n[batch]\nconcurrency = {concurrency}\n'
        f'[output]\npath = "{output}"\n' + storage_section(s3.endpoint)
    )
    command = [PYTHON, "-m", "batchrunner", "run", str(job), "--no-progress", "--no-resume"]
    wall, _, rss, _, stderr = measured(command, env_of(s3))
    summary = json.loads(Path(f"{output}.summary.json").read_text())
    if summary["rows"]["ok"] != count:
        raise RuntimeError(f"not every image ok: {summary['rows']}\n{stderr[-2000:]}")
    return count / wall, float(summary["rows_per_second"]), rss, summary["latency_ms"]["mean"]


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
                lambda: run_images(folder, source, s3, service.url, concurrency, count),
            )

        disk = measure(local)
        bucket = measure("s3://photos/images/")
    finally:
        service.close()
    host = s3.endpoint.removeprefix("http://")
    command = [PYTHON, "-c", LIST_AND_FETCH, host, *keys_of(s3), "photos", "images/",
               str(concurrency)]  # fmt: skip
    env = env_of(s3)
    alone = repeated(
        repeat, lambda: tuple(map(float, subprocess.check_output(command, env=env).split()))
    )
    store = name_of(s3)
    for name, figures in (("local disk", disk), (f"{store} S3", bucket)):
        whole, own = statistics.median(column(figures, 0)), statistics.median(column(figures, 1))
        print(f"  {name:<10}  {median_range(column(figures, 0), 'images/s')} whole process"
              f" ({whole / limit:.2f} of the limit); the run's own "
              f"{median_range(column(figures, 1), 'images/s')} ({own / limit:.2f})"
              f"  peak RSS {statistics.median(column(figures, 2)):.0f} MB")  # fmt: skip
        # The service's own pace: with the latency the run saw (the colors model decodes
        # each PNG on these same 2 cores), concurrency / latency is the most it could do.
        seen = statistics.median(column(figures, 3))
        share = own / (concurrency / (seen / 1000))
        print(f"  {'':<10}  the service answered in {seen:.1f} ms on average: the run's own "
              f"rate is {share:.2f} of concurrency / that")  # fmt: skip
    print(f"  {store + ' alone':<11} listing {median_range(column(alone, 0), 'keys/s')}; "
          f"fetching at concurrency {concurrency}: Arrow (HEAD+GET) "
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
    parser.add_argument("--server", choices=["moto", "s3rver"], default="moto")
    parser.add_argument("--s3rver", default="s3rver", help="s3rver's command (npm's s3rver@3)")
    args = parser.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1, 5, 15 min), {os.cpu_count()} CPUs; median of {args.repeat} (range)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as temporary:
        folder = Path(temporary)
        servers = started(args.server, args.s3rver, folder)
        s3 = next(servers)
        try:
            if args.only in (None, "tables"):
                tables(s3, folder, args.rows, args.repeat)
            if args.only in (None, "images"):
                images(s3, folder, args.images, args.latency_ms, args.concurrency, args.repeat)
        finally:
            servers.close()
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")


if __name__ == "__main__":
    main()
