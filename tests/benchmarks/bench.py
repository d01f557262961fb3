"""How fast batchrunner goes, against the two baselines our users have. Run by hand:

    pip install requests        # for the vendor-docs baseline
    python tests/benchmarks/bench.py [--quick] [--only NAME ...]

Each scenario starts the embedded reference service in its own process (``batchrunner
serve`` with injected latency), then runs, one after the other, each contender as a whole
command in a child process: batchrunner, the careful hand-written asyncio script
(``baseline_asyncio.py``) and the ``requests`` thread pool of the vendor's docs
(``baseline_requests.py``). It prints, per contender: rows/s, requests/s, the ratio to the
limit (concurrency / mean latency, the latency the client saw), the whole command's wall time
(start to output written; with the rows/s it makes, end to end), CPU microseconds per row
(the client's own, the whole command: on a loaded machine, the steadier figure), its peak
RSS, the requests answered 429, and how busy the service's process was over the active
window (near 100% of a core: the service, not the contender, set the pace). ``--other-tree``
runs another checkout (main's) beside.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token"
PYTHON = sys.executable


@dataclass
class Figures:
    contender: str
    rows: int
    requests: int
    wall_s: float
    active_s: float
    mean_latency_s: float
    cpu_s: float
    peak_rss_mb: float
    throttled: int
    concurrency: int
    service_cpu_s: float = float("nan")

    def line(self) -> str:
        rows_per_s = self.rows / self.active_s
        requests_per_s = self.requests / self.active_s
        limit = self.concurrency / self.mean_latency_s if self.mean_latency_s else float("nan")
        return (
            f"  {self.contender:<12} {rows_per_s:>11,.0f} rows/s {requests_per_s:>8,.1f} req/s"
            f"  ratio {requests_per_s / limit:5.2f}  wall {self.wall_s:6.2f} s"
            f" ({self.rows / self.wall_s:>9,.0f} rows/s)"
            f"  cpu/row {1e6 * self.cpu_s / max(self.rows, 1):7.2f} us"
            f"  rss {self.peak_rss_mb:6.0f} MB  429s {self.throttled}"
            f"  service {self.service_cpu_s / self.active_s:4.0%} busy"
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Service:
    """``batchrunner serve`` in a child process."""

    def __init__(self, model: str, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/infers/{model}"
        env = {**os.environ, "BATCHRUNNER_SERVE_TOKEN": TOKEN}
        command = [PYTHON, "-m", "batchrunner", "serve", "--model", model]
        command += ["--port", str(self.port), *options]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if b"press Ctrl-C" in line:
                break

    def cpu_seconds(self) -> float:
        """The service process's CPU time so far (user + system), from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=10)


def measured(
    command: list[str], env: dict[str, str], cwd: Path | None = None
) -> tuple[float, float, float, str, str]:
    """Run a command; its wall time, own CPU seconds and peak RSS (MB), stdout, stderr."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd
    )
    assert process.stdout is not None and process.stderr is not None
    stdout = process.stdout.read()
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    process.stderr.close()
    wall = time.perf_counter() - started
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{command[:5]} failed: {stderr.decode()[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, stdout.decode(), stderr.decode()


_GENERATE = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
rows, path = int(sys.argv[1]), sys.argv[2]
schema = pa.schema([(f"f{i}", pa.float64()) for i in range(5)])
with pq.ParquetWriter(path, schema) as writer:
    for start in range(0, rows, 1_000_000):
        n = min(1_000_000, rows - start)
        values = [float((start + j) % 1000) for j in range(n)]
        writer.write_table(pa.table({f"f{i}": pa.array(values) for i in range(5)}, schema))
"""


_GENERATE_IRIS = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
rows, path = int(sys.argv[1]), sys.argv[2]
names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
schema = pa.schema([("id", pa.int64())] + [(name, pa.float64()) for name in names])
with pq.ParquetWriter(path, schema) as writer:
    for start in range(0, rows, 1_000_000):
        n = min(1_000_000, rows - start)
        columns = {"id": pa.array(range(start, start + n), pa.int64())}
        for i, name in enumerate(names):
            columns[name] = pa.array([1.0 + ((start + j) * (i + 3)) % 60 / 10 for j in range(n)])
        writer.write_table(pa.table(columns, schema))
"""


def iris_input(folder: Path, rows: int) -> Path:
    """An id and the four iris features: the iris model answers six fields a row."""
    path = folder / f"iris-{rows}.parquet"
    if not path.exists():
        subprocess.run([PYTHON, "-c", _GENERATE_IRIS, str(rows), str(path)], check=True)
    return path


def table_input(folder: Path, rows: int, name: str) -> Path:
    path = folder / f"{name}.parquet"
    if not path.exists():
        # In a child process: a big parent would inflate the peak RSS that wait4 reports
        # for the children it forks afterwards.
        subprocess.run([PYTHON, "-c", _GENERATE, str(rows), str(path)], check=True)
    return path


# Another checkout of batchrunner (--other-tree) run beside this one, as contender "other".
OTHER_TREE: Path | None = None


def run_batchrunner(
    data: Path, service: Service, size: int, concurrency: int, folder: Path, extra: list[str],
    tree: Path | None = None,
) -> Figures:  # fmt: skip
    output = folder / "out-batchrunner.parquet"
    env = {**os.environ, "MODELARTS_TOKEN": TOKEN}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    command = [
        PYTHON, "-m", "batchrunner", "run", "--input", str(data), "--url", service.url,
        "--output", str(output), "--batch-size", str(size), "--concurrency", str(concurrency),
        "--no-progress", "--no-resume", *extra,
    ]  # fmt: skip
    # ``python -m`` imports from the working folder first: the other tree's, for its run.
    wall, cpu, rss, _, _ = measured(command, env, tree)
    summary = orjson.loads(Path(str(output) + ".summary.json").read_bytes())
    return Figures(
        "batchrunner" if tree is None else "other",
        summary["rows"]["ok"],
        summary["requests"],
        wall,
        summary["elapsed_s"],
        summary["latency_ms"]["mean"] / 1000.0,
        cpu,
        rss,
        summary["throttled"],
        concurrency,
    )


def run_baseline(
    name: str, script: str, data: Path, service: Service, size: int, concurrency: int, folder: Path,
    extra: list[str] | None = None,
) -> Figures:  # fmt: skip
    env = {**os.environ, "MODELARTS_TOKEN": TOKEN}
    output = folder / f"out-{name}.parquet"
    command = [
        PYTHON,
        str(HERE / script),
        str(data),
        service.url,
        str(size),
        str(concurrency),
        str(output),
        *(extra or []),
    ]
    wall, cpu, rss, stdout, _ = measured(command, env)
    figures = orjson.loads(stdout.strip().splitlines()[-1])
    return Figures(
        name,
        figures["rows"],
        figures["requests"],
        wall,
        figures["active_s"],
        figures["mean_latency_s"],
        cpu,
        rss,
        figures["throttled"],
        concurrency,
    )


def have_requests() -> bool:
    try:
        import requests  # noqa: F401
    except ImportError:
        return False
    return True


_IMAGES = """
import sys, io
from pathlib import Path
from PIL import Image
count, folder = int(sys.argv[1]), Path(sys.argv[2])
buffer = io.BytesIO()
Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "PNG")
for index in range(count):
    path = folder / f"d{index // 500}" / f"{index:05d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
"""


def image_input(folder: Path, count: int) -> Path:
    path = folder / f"images-{count}"
    if not path.exists():
        subprocess.run([PYTHON, "-c", _IMAGES, str(count), str(path)], check=True)
    return path


def scenario(
    title: str, folder: Path, rows: int, size: int, concurrency: int, serve_options: list[str],
    contenders: list[str], extra: list[str] | None = None, limit_concurrency: int | None = None,
    model: str = "linear",
) -> None:  # fmt: skip
    print(f"\n{title}")
    if model == "colors":
        data = image_input(folder, rows)
    elif model == "iris":
        data = iris_input(folder, rows)
    else:
        data = table_input(folder, rows, f"rows-{rows}")
    service = Service(model, *serve_options)
    try:
        for contender in contenders:
            service_cpu = service.cpu_seconds()
            if contender == "batchrunner":
                figures = run_batchrunner(data, service, size, concurrency, folder, extra or [])
            elif contender == "other":
                if OTHER_TREE is None:
                    continue
                figures = run_batchrunner(
                    data, service, size, concurrency, folder, extra or [], OTHER_TREE
                )
            elif contender == "asyncio":
                figures = run_baseline(
                    "asyncio", "baseline_asyncio.py", data, service, size, concurrency, folder
                )
            elif contender == "requests":
                if not have_requests():
                    print("  requests     (not installed: pip install requests)")
                    continue
                figures = run_baseline(
                    "requests", "baseline_requests.py", data, service, size, concurrency, folder
                )
            # The service's CPU over the contender's whole command: near 100% of a core, the
            # service (one process) was the bottleneck, not the contender.
            figures.service_cpu_s = service.cpu_seconds() - service_cpu
            if limit_concurrency is not None:
                figures.concurrency = limit_concurrency  # the ratio is to the service's limit
            print(figures.line(), flush=True)
    finally:
        service.close()


class FirstRequestServer:
    """A service in a thread of this process that notes when its first request arrived
    (``time.perf_counter`` is the system's monotonic clock, the same in a child process)."""

    def __init__(self) -> None:
        import asyncio
        import threading

        from aiohttp import web

        self.first: float | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/infers/linear"
        self._loop = asyncio.new_event_loop()

        async def handle(request: web.Request) -> web.Response:
            if self.first is None:
                self.first = time.perf_counter()
            rows = orjson.loads(await request.read())["data"]["req_data"]
            body = {"data": {"resp_data": [{"score": 0.0} for _ in rows]}}
            return web.Response(body=orjson.dumps(body), content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/infers/linear", handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def startup(folder: Path, repeats: int = 5) -> None:
    """Start-up: from starting the command to its first request reaching the service."""
    data = table_input(folder, 1000, "rows-1000")
    env = {**os.environ, "MODELARTS_TOKEN": TOKEN}
    output = folder / "out-startup.parquet"
    contenders = {
        "batchrunner": [
            PYTHON, "-m", "batchrunner", "run", "--input", str(data), "--output", str(output),
            "--no-progress", "--no-resume", "--url",
        ],
        "asyncio": [PYTHON, str(HERE / "baseline_asyncio.py"), str(data)],
    }  # fmt: skip
    if OTHER_TREE is not None:
        contenders["other"] = contenders["batchrunner"]
    print(f"\nstart-up: from the command's start to its first request (best of {repeats})")
    for name, command in contenders.items():
        times = []
        for _ in range(repeats):
            server = FirstRequestServer()
            try:
                arguments = [*command, server.url]
                if name == "asyncio":
                    arguments += ["100", "8", str(output)]
                own = env if name != "other" else {**env, "PYTHONPATH": str(OTHER_TREE)}
                where = OTHER_TREE if name == "other" else None
                started = time.perf_counter()
                subprocess.run(arguments, env=own, check=True, capture_output=True, cwd=where)
                assert server.first is not None
                times.append(server.first - started)
            finally:
                server.close()
        print(f"  {name:<12} {min(times):.2f} s (median {sorted(times)[len(times) // 2]:.2f} s)")


_HAMMER = """
import asyncio, sys, time, orjson, aiohttp
url, token, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
if url.endswith("/iris"):
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    records = [{"id": j, **{n: 1.0 + j % 60 / 10 for n in names}} for j in range(1000)]
else:
    records = [{f"f{i}": float(j * (i + 1)) for i in range(5)} for j in range(1000)]
body = orjson.dumps({"data": {"req_data": records}})
headers = {"X-Auth-Token": token, "Content-Type": "application/json"}
async def main():
    async with aiohttp.ClientSession() as session:
        async def worker(count):
            for _ in range(count):
                async with session.post(url, data=body, headers=headers) as answer:
                    await answer.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(requests // 8) for _ in range(8)))
        print(requests // 8 * 8 * 1000 / (time.perf_counter() - started))
asyncio.run(main())
"""


def service_ceiling(quick: bool, model: str = "linear") -> None:
    """The embedded service alone: one body sent over and over, no encoding on our side."""
    service = Service(model)
    try:
        requests = 200 if quick else 1000
        result = subprocess.run(
            [PYTHON, "-c", _HAMMER, service.url, TOKEN, str(requests)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        rate = float(result.stdout.strip())
        print(f"\nservice alone ({model} model, batches of 1,000, 8 in flight): {rate:,.0f} rows/s")
    finally:
        service.close()


FAULTS = [
    "--latency-ms", "10", "--capacity", "16", "--retry-after", "1",
    "--error-rate", "0.05", "--drop-rate", "0.02", "--html-rate", "0.01",
]  # fmt: skip


def faulty(folder: Path, quick: bool, repeats: int) -> None:
    """A faulty service (issue 16): the script at a fixed 32 with backoff from 0.1 s, beside
    batchrunner at a fixed 32 and with ``concurrency = "auto"``; each contender in turn,
    ``repeats`` times, a fresh service (and fault seed) per round."""
    rows = 4_000 if quick else 20_000
    print(
        f"\nfaulty service: {rows:,} rows in batches of 50, 10 ms latency, capacity 16 (429 with "
        "Retry-After: 1 above), 5% 503s, 2% dropped connections, 1% HTML 502 pages"
    )
    data = table_input(folder, rows, f"rows-{rows}")
    contenders = {
        "script, 32": lambda service: run_baseline(
            "asyncio", "baseline_asyncio.py", data, service, 50, 32, folder, ["0.1"]
        ),
        "batchrunner, 32": lambda service: run_batchrunner(data, service, 50, 32, folder, []),
        "batchrunner, auto": lambda service: run_batchrunner(
            data, service, 50, 32, folder,
            ["--concurrency", "auto", "--set", "batch.max_concurrency=64"],
        ),
    }  # fmt: skip
    if OTHER_TREE is not None:
        contenders["other, 32"] = lambda service: run_batchrunner(
            data, service, 50, 32, folder, [], OTHER_TREE
        )
        contenders["other, auto"] = lambda service: run_batchrunner(
            data, service, 50, 32, folder,
            ["--concurrency", "auto", "--set", "batch.max_concurrency=64"], OTHER_TREE,
        )  # fmt: skip
    seen: dict[str, list[Figures]] = {name: [] for name in contenders}
    for round_ in range(repeats):
        for name, run in contenders.items():
            service = Service("linear", *FAULTS, "--seed", str(round_))
            try:
                figures = run(service)
            finally:
                service.close()
            seen[name].append(figures)
            lost = rows - figures.rows
            share = figures.throttled / max(figures.requests, 1)
            print(
                f"  {name:<18} {figures.rows / figures.active_s:>9,.0f} rows/s  active "
                f"{figures.active_s:5.2f} s  wall {figures.wall_s:5.2f} s  requests "
                f"{figures.requests:>4}  429s {figures.throttled:>3} ({share:.1%})  lost {lost}",
                flush=True,
            )
    for name, figures_list in seen.items():
        rates = sorted(f.rows / f.active_s for f in figures_list)
        ratios = sorted(r / s for r, s in zip(
            (f.rows / f.active_s for f in figures_list),
            (f.rows / f.active_s for f in seen["script, 32"]), strict=True,
        ))  # fmt: skip
        middle = len(rates) // 2
        print(
            f"  median {name:<18} {rates[middle]:>9,.0f} rows/s ({rates[0]:,.0f}-{rates[-1]:,.0f})"
            f"  x script {ratios[middle]:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
        )


def memory(folder: Path, quick: bool) -> None:
    print("\nmemory: peak RSS of the whole command, zero latency, batches of 1,000, concurrency 8")
    service = Service("linear")
    try:
        for rows in [100_000, 500_000] if quick else [1_000_000, 10_000_000]:
            data = table_input(folder, rows, f"rows-{rows}")
            figures = run_batchrunner(data, service, 1000, 8, folder, [])
            rate = figures.rows / figures.active_s
            print(f"  {rows:>11,} rows: peak RSS {figures.peak_rss_mb:6.0f} MB, {rate:,.0f} rows/s")
    finally:
        service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run in < 30 s")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="scenarios: startup service latency images cpu wide auto faulty memory",
    )
    parser.add_argument("--keep", type=Path, default=None, help="a folder to keep inputs in")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the faulty scenario")
    parser.add_argument(
        "--other-tree",
        type=Path,
        default=None,
        help="another checkout of batchrunner (e.g. main's) run beside this one, as 'other'",
    )
    args = parser.parse_args()
    global OTHER_TREE
    OTHER_TREE = args.other_tree.resolve() if args.other_tree else None
    quick = args.quick
    folder = args.keep or Path(tempfile.mkdtemp(prefix="batchrunner-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    chosen = set(
        args.only
        or ["startup", "service", "latency", "images", "cpu", "wide", "auto", "faulty", "memory"]
    )
    # An installed package has its modules compiled (pip writes the .pyc files); a checkout
    # run with PYTHONDONTWRITEBYTECODE would compile every module at each start, and the
    # one-file script would not pay that: compile once, and let the children use it.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    package = Path(__file__).resolve().parents[2] / "batchrunner"
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(package)], check=True)
    if OTHER_TREE is not None:
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(OTHER_TREE / "batchrunner")])
    python = sys.version.split()[0]
    print(f"batchrunner benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {python}")
    everyone = ["batchrunner", "asyncio", "requests"]
    try:
        if "startup" in chosen:
            startup(folder, 3 if quick else 5)
        if "service" in chosen:
            service_ceiling(quick)
        if "latency" in chosen:
            rows = 20_000 if quick else 100_000
            scenario(
                f"latency-bound: {rows:,} rows in batches of 100, 50 ms service latency, "
                "concurrency 32 (limit 640 req/s)",
                folder, rows, 100, 32, ["--latency-ms", "50"], everyone,
            )  # fmt: skip
        if "images" in chosen:
            count = 500 if quick else 2000
            scenario(
                f"latency-bound images: {count:,} PNG files, one per request, 50 ms service "
                "latency, concurrency 32 (limit 640 req/s)",
                folder, count, 1, 32, ["--latency-ms", "50"], everyone, model="colors",
            )  # fmt: skip
        if "wide" in chosen:
            rows = 200_000 if quick else 1_000_000
            service_ceiling(quick, "iris")
            scenario(
                f"wide answers, CPU-bound: {rows:,} rows (an id and 4 numbers) in batches of "
                "1,000, no latency, concurrency 8; the iris model answers 6 fields a row",
                folder, rows, 1000, 8, [], ["other", "batchrunner", "asyncio"], model="iris",
            )  # fmt: skip
            scenario(
                "  the same, batchrunner keeping only predictresult (output.result_fields)",
                folder, rows, 1000, 8, [], ["other", "batchrunner"], model="iris",
                extra=["--set", 'output.result_fields=["predictresult"]'],
            )  # fmt: skip
        if "cpu" in chosen:
            rows = 200_000 if quick else 1_000_000
            scenario(
                f"CPU-bound: {rows:,} rows x 5 numbers in batches of 1,000, no latency, "
                "concurrency 8",
                folder, rows, 1000, 8, [], everyone,
            )  # fmt: skip
        if "auto" in chosen:
            rows = 20_000 if quick else 100_000
            scenario(
                f"adaptive: {rows:,} rows in batches of 100, 50 ms latency, the service answers "
                "429 (Retry-After: 1) above 16 in flight (limit 320 req/s); batchrunner with "
                'concurrency = "auto" (max 64), the baselines at a fixed 32',
                folder, rows, 100, 32,
                ["--latency-ms", "50", "--capacity", "16", "--retry-after", "1"],
                everyone,
                extra=["--concurrency", "auto", "--set", "batch.max_concurrency=64"],
                limit_concurrency=16,
            )  # fmt: skip
        if "faulty" in chosen:
            faulty(folder, quick, args.repeat)
        if "memory" in chosen:
            memory(folder, quick)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
