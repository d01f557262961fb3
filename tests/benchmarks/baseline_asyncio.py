"""The careful hand-written script our users would write: asyncio, one aiohttp session, a
semaphore, orjson, pyarrow batches, a simple retry loop. The peer batchrunner must beat.

    python baseline_asyncio.py INPUT.parquet URL BATCH CONCURRENCY OUTPUT.parquet
Token in $MODELARTS_TOKEN. Prints a JSON line of figures.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import aiohttp
import orjson
import pyarrow as pa
import pyarrow.parquet as pq


async def main(path: str, url: str, batch_size: int, concurrency: int, output: str) -> None:
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
            async with semaphore:
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    payload = await response.read()
                latencies.append(time.perf_counter() - started)
            if response.status == 200:
                results[index] = orjson.loads(payload)["data"]["resp_data"]
                return
            if response.status == 429:
                throttled += 1
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            else:
                await asyncio.sleep(0.5 * 2**attempt)
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


if __name__ == "__main__":
    path, url, size, concurrency, output = sys.argv[1:6]
    asyncio.run(main(path, url, int(size), int(concurrency), output))
