"""Images per second and peak memory of an image-folder run against the embedded service.

Not part of the test suite (pytest collects only test_*.py). Run it from the repository:

    python -m tests.benchmarks.images                  # 5,000 images, concurrency 16
    python -m tests.benchmarks.images --files 50000    # memory should stay flat

It writes N tiny PNGs (the same encoded bytes in every file, 500 to a folder) into a
temporary folder, runs the job in-process through the real pipeline and HTTP path
(``url = "embedded:colors"``: client and service share this process and its event loop),
and prints the throughput, the CPU time per image (both sides together) and the peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image

from batchrunner.engines.local import Runner
from batchrunner.job import load_job
from batchrunner.wiring import use_lean_memory_pool

FILES_PER_FOLDER = 500


def make_folder(root: Path, files: int, side: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (220, 20, 30)).save(buffer, "PNG")
    content = buffer.getvalue()
    for index in range(files):
        folder = root / f"f{index // FILES_PER_FOLDER:04d}"
        if index % FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True)
        (folder / f"{index:07d}.png").write_bytes(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--side", type=int, default=4, help="image width and height, pixels")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        make_folder(root / "images", options.files, options.side)
        job = load_job(
            None,
            overrides={
                "input.path": str(root / "images"),
                "service.url": "embedded:colors",
                "output.path": str(root / "out.parquet"),
                "batch.concurrency": options.concurrency,
            },
        )
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_before = usage.ru_utime + usage.ru_stime
        started = time.perf_counter()
        use_lean_memory_pool()  # as `batchrunner run` does
        result = asyncio.run(Runner(job).run())
        elapsed = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime - cpu_before
    rows = result.summary["rows"]
    assert rows == {"total": options.files, "ok": options.files, "error": 0, "skipped": 0}, rows
    latency = result.summary["latency_ms"]
    print(
        f"{options.files:,} images ({options.side}x{options.side} PNG), concurrency "
        f"{options.concurrency}: {elapsed:.2f} s, {options.files / elapsed:,.0f} images/s; "
        f"CPU {cpu * 1000 / options.files:.2f} ms/image (client and service); latency p50 "
        f"{latency['p50']} ms, p99 {latency['p99']} ms; peak RSS "
        f"{usage.ru_maxrss / 1024:,.0f} MiB"  # ru_maxrss is in KiB on Linux
    )


if __name__ == "__main__":
    main()
