"""The pattern of the vendor's own docs: ``requests`` in a thread pool.

    python baseline_requests.py INPUT.parquet URL BATCH CONCURRENCY OUTPUT.parquet
Token in $MODELARTS_TOKEN. Prints a JSON line of figures.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import requests

local = threading.local()


def main(path: str, url: str, batch_size: int, concurrency: int, output: str) -> None:
    headers = {"X-Auth-Token": os.environ["MODELARTS_TOKEN"], "Content-Type": "application/json"}
    latencies: list[float] = []
    throttled = [0]

    def send(records: list[dict[str, object]]) -> list[dict[str, object]]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        for attempt in range(8):
            started = time.perf_counter()
            response = local.session.post(
                url, data=json.dumps({"data": {"req_data": records}}), headers=headers, verify=False
            )
            latencies.append(time.perf_counter() - started)
            if response.status_code == 200:
                return response.json()["data"]["resp_data"]
            if response.status_code == 429:
                throttled[0] += 1
                time.sleep(float(response.headers.get("Retry-After", "1")))
            else:
                time.sleep(0.5 * 2**attempt)
        raise RuntimeError("batch failed")

    started = time.perf_counter()
    batches = (
        batch.to_pylist() for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size)
    )
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, batches))
    active = time.perf_counter() - started
    rows = [row for batch in results for row in batch]
    pq.write_table(pa.Table.from_pylist(rows), output)
    print(
        json.dumps(
            {
                "rows": len(rows),
                "requests": len(latencies),
                "active_s": active,
                "mean_latency_s": sum(latencies) / len(latencies),
                "throttled": throttled[0],
            }
        )
    )


if __name__ == "__main__":
    path, url, size, concurrency, output = sys.argv[1:6]
    main(path, url, int(size), int(concurrency), output)
