"""Language models: rows/s and tokens/s of openai-chat and openai-embeddings jobs against the
embedded service in its own process (``batchrunner serve --model llm --latency-ms 50``).

    python -m tests.benchmarks.llm [--chat-rows N] [--embed-rows N] [--repeat 3]

The service answers each request after 50 ms; at concurrency 32 no client can do better
than ``concurrency / latency`` = 640 requests a second. Each figure is given as that ratio:
for chat (one row a request) rows/s over 640, for embeddings (``--batch-size`` rows a
request) requests/s over 640. Figures are the run's own (its summary: from the first
request to the last answer, start-up excluded), median of ``--repeat`` runs (range).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
from pathlib import Path

from tests.benchmarks.bench import PYTHON, TOKEN, Service, measured

LATENCY_MS = 50.0
CONCURRENCY = 32
WORDS = [
    "the",
    "app",
    "crashes",
    "when",
    "I",
    "upload",
    "a",
    "photo",
    "how",
    "do",
    "I",
    "export",
    "my",
    "invoices",
    "thanks",
    "great",
]


def tickets(path: Path, rows: int) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        for i in range(rows):
            words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + i % 9)]
            writer.writerow([i, " ".join(words)])
    return path


def job(folder: Path, name: str, data: Path, url: str, protocol: str, size: int) -> Path:
    settings = (
        'prompt = "Label this ticket as bug, question or praise: {text}"\nmax_tokens = 16'
        if protocol == "openai-chat"
        else "dimensions = 256"
    )
    columns = 'columns = ["text"]\n' if protocol == "openai-embeddings" else ""
    path = folder / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\n[input]\npath = "{data}"\nid_column = "id"\n{columns}'
        f'[service]\nurl = "{url}"\nprotocol = "{protocol}"\n'
        f'[service.openai]\nmodel = "bench"\n{settings}\n'
        f"[batch]\nsize = {size}\nconcurrency = {CONCURRENCY}\n"
        f'[output]\npath = "{folder / name}.parquet"\n'
    )
    return path


def run(path: Path, rows: int) -> tuple[float, float, float]:
    """rows/s, tokens/s and requests/s of one run, from its summary."""
    env = {**os.environ, "OPENAI_API_KEY": TOKEN}
    command = [PYTHON, "-m", "batchrunner", "run", str(path), "--no-progress", "--no-resume"]
    _, _, _, _, stderr = measured(command, env)
    summary = json.loads(path.with_suffix(".parquet.summary.json").read_text())
    if summary["rows"]["ok"] != rows:
        raise RuntimeError(f"not every row ok: {summary['rows']}\n{stderr[-2000:]}")
    elapsed = summary["elapsed_s"]
    return rows / elapsed, summary["tokens"]["per_second"], summary["requests"] / elapsed


def median_range(values: list[float], digits: int = 0) -> str:
    return (
        f"{statistics.median(values):,.{digits}f} "
        f"(range {min(values):,.{digits}f}-{max(values):,.{digits}f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chat-rows", type=int, default=6_000)
    parser.add_argument("--embed-rows", type=int, default=40_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    ideal = CONCURRENCY / (LATENCY_MS / 1000.0)
    print(
        f"embedded service at {LATENCY_MS:g} ms, concurrency {CONCURRENCY}: at most "
        f"{ideal:,.0f} requests/s; median of {args.repeat} (range)"
    )
    service = Service("llm", "--latency-ms", str(LATENCY_MS))
    try:
        base = f"http://127.0.0.1:{service.port}/v1"
        for name, protocol, rows, size in (
            ("chat", "openai-chat", args.chat_rows, 1),
            ("embeddings", "openai-embeddings", args.embed_rows, args.batch_size),
        ):
            data = tickets(folder / f"{name}.csv", rows)
            path = job(folder, name, data, base, protocol, size)
            figures = [run(path, rows) for _ in range(args.repeat)]
            ratios = [requests / ideal for _, _, requests in figures]
            print(
                f"  {name:<10} {rows:,} rows, {size} a request: "
                f"{median_range([f[0] for f in figures])} rows/s, "
                f"{median_range([f[1] for f in figures])} tokens/s, "
                f"{median_range(ratios, 2)} of concurrency / latency"
            )
    finally:
        service.close()


if __name__ == "__main__":
    main()
