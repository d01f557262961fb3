"""The careful hand-written script our users would write: asyncio, one aiohttp session, a
semaphore, orjson, pyarrow batches, a simple retry loop. The peer batchrunner must beat.

    python baseline_asyncio.py INPUT.parquet URL BATCH CONCURRENCY OUTPUT.parquet [BACKOFF]
Token in $MODELARTS_TOKEN. Prints a JSON line of figures. BACKOFF (default 0.5) is the first
wait in seconds after a failure other than a 429, doubled on each; a 429 waits its Retry-After.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pyarrow as pa
import pyarrow.parquet as pq


async def main(
    path: str, url: str, batch_size: int, concurrency: int, output: str, backoff: float = 0.5
) -> None:
    headers = {"X-Auth-Token": os.environ["MODELARTS_TOKEN"], "Content-Type": "application/json"}
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    throttled = 0
    results: dict[int, list[dict[str, object]]] = {}

    async def send(
        session: aiohttp.ClientSession, index: int, records: list[dict[str, object]]
    ) -> None:
        nonlocal throttled
        body = orjson.dumps({"data": {"req_data": records}})
        for attempt in range(8):
            status, retry_after = 0, None
            async with semaphore:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        payload = await response.read()
                        status = response.status
                        retry_after = response.headers.get("Retry-After")
                except aiohttp.ClientError:
                    pass  # a dropped connection: retried as a failure
                latencies.append(time.perf_counter() - started)
            if status == 200:
                try:
                    results[index] = orjson.loads(payload)["data"]["resp_data"]
                    return
                except orjson.JSONDecodeError:
                    pass
            if status == 429:
                throttled += 1
                await asyncio.sleep(float(retry_after or "1"))
            else:
                await asyncio.sleep(backoff * 2**attempt)
        raise RuntimeError(f"batch {index} failed")

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks: set[asyncio.Task[None]] = set()
        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            names = batch.schema.names
            columns = [column.to_pylist() for column in batch.columns]
            records = [
                dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)
            ]
            while len(tasks) >= 2 * concurrency:
                _, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            tasks.add(asyncio.create_task(send(session, index, records)))
            index += 1
        await asyncio.gather(*tasks)
    active = time.perf_counter() - started
    rows = [row for i in range(index) for row in results.pop(i)]
    pq.write_table(pa.Table.from_pylist(rows), output)
    print(
        orjson.dumps(
            {
                "rows": len(rows),
                "requests": len(latencies),
                "active_s": active,
                "mean_latency_s": sum(latencies) / len(latencies),
                "throttled": throttled,
            }
        ).decode()
    )


async def images(folder: str, url: str, concurrency: int, output: str) -> None:
    """An image folder: one multipart request per file, as the vendor's docs send them."""
    headers = {"X-Auth-Token": os.environ["MODELARTS_TOKEN"]}
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    paths = sorted(str(p) for p in Path(folder).rglob("*.png"))

    async def send(session: aiohttp.ClientSession, path: str) -> dict[str, object]:
        for attempt in range(8):
            form = aiohttp.FormData()
            form.add_field("images", Path(path).read_bytes(), filename=Path(path).name)
            async with semaphore:
                started = time.perf_counter()
                async with session.post(url, data=form, headers=headers) as response:
                    payload = await response.read()
                latencies.append(time.perf_counter() - started)
            if response.status == 200:
                return {"path": path, **orjson.loads(payload)}
            await asyncio.sleep(0.5 * 2**attempt)
        raise RuntimeError(f"{path} failed")

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        rows = await asyncio.gather(*(send(session, path) for path in paths))
    active = time.perf_counter() - started
    pq.write_table(
        pa.Table.from_pylist([{**r, "scores": orjson.dumps(r["scores"]).decode()} for r in rows]),
        output,
    )
    print(
        orjson.dumps(
            {
                "rows": len(rows),
                "requests": len(latencies),
                "active_s": active,
                "mean_latency_s": sum(latencies) / len(latencies),
                "throttled": 0,
            }
        ).decode()
    )


if __name__ == "__main__":
    path, url, size, concurrency, output = sys.argv[1:6]
    backoff = float(sys.argv[6]) if len(sys.argv) > 6 else 0.5
    if Path(path).is_dir():
        asyncio.run(images(path, url, int(concurrency), output))
    else:
        asyncio.run(main(path, url, int(size), int(concurrency), output, backoff))
