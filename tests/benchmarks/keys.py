"""Nightly runs at scale: the key index's nights and the duplicate-key check, whole commands.

    python -m tests.benchmarks.keys [ROWS] [--folder DIR] [--repeat N]
        [--only first nothing-new changed duplicates] [--nice]      (ROWS: 10000000 by default)

Run by hand, not in CI. Generates Parquet tables of ROWS rows (``id``, an integer, and four
floats) in DIR (a temporary folder by default, removed after; nothing is committed; about 40
bytes a row each), starts ``batchrunner serve --model linear`` in its own process, and runs
each night as the whole command a cron line runs (``batchrunner run job.toml``, batches of
1,000, concurrency 8, ``input.incremental = true``), one after the other:

    first       nothing remembered: every row is sent
    nothing-new nothing new: no row is sent (the input read, hashed and checked)
    changed     1% of rows new or changed, scattered: exactly those are sent, in full batches
    duplicates  the table with 3 duplicate keys planted: refused before anything is sent

and prints one JSON line per night: the command's wall time (start-up included), rows read
per second of it, CPU seconds, peak RSS (``wait4``'s maxrss), what was sent and in how many
requests, and the index's size. Without the first night (``--only``), the index the others
need is written through the library, as a first night with every row answered ok would
(``seed``). ``--nice`` runs the service and the commands at the lowest priority.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from tests.benchmarks.bench import TOKEN, Service

BATCH = 1000
FEATURES = ["a", "b", "c", "d"]
NIGHTS = {  # night: its table
    "first": "night1",
    "nothing-new": "night1",
    "changed": "night3",
    "duplicates": "duplicates",
}


def make_table(path: Path, rows: int, *, changed: bool = False, duplicates: bool = False) -> None:
    """``rows`` rows, written a row group at a time (the generator's memory stays small).
    ``changed``: 1% of the rows changed (every 200th) or new (1 in 200 more rows at the end)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    group = 1 << 20
    schema = pa.schema([("id", pa.int64())] + [(name, pa.float64()) for name in FEATURES])
    with pq.ParquetWriter(path, schema) as writer:
        total = rows + (rows // 200 if changed else 0)
        for start in range(0, total, group):
            ids = np.arange(start, min(start + group, total), dtype=np.int64)
            columns = {"id": ids}
            for number, name in enumerate(FEATURES):
                values = np.sin(ids * (number + 1.0))
                if changed:
                    values = np.where((ids % 200 == 7) & (ids < rows), values + 1.0, values)
                columns[name] = values
            if duplicates and start == 0:
                columns["id"] = ids.copy()
                columns["id"][[10, 20, 30]] = [rows - 1, rows - 2, rows - 3]  # 3 keys twice
            writer.write_table(pa.table(columns, schema=schema))


def seed(table: Path, state: Path) -> None:
    """The index a first night over ``table`` leaves when every row is answered ok, written
    through the library (``open_seen``, ``check``, ``filter``, ``remember``), no service."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchrunner.incremental import check_reader, open_seen
    from batchrunner.sources import open_tabular

    source = open_tabular(table, id_column="id")
    seen = open_seen(state / "bench.keys", url="seed")
    seen.check(check_reader(source, 65_536, None))
    output = state / "seed.parquet"
    schema = pa.schema([("_key", pa.string()), ("_status", pa.string())])
    with pq.ParquetWriter(output, schema) as writer:
        for batch in seen.filter(source.iter_batches(65_536), 65_536):
            keys = pa.array(batch.keys, pa.string())
            writer.write_batch(pa.record_batch([keys, pa.repeat("ok", len(keys))], schema=schema))
    seen.remember(output, run_id="seed", url="seed")
    output.unlink()


def exactly_the_changed(output: Path, rows: int) -> bool:
    """Whether ``output`` holds exactly the changed rows (every 200th) and the new ones."""
    import numpy as np
    import pyarrow.parquet as pq

    keys = pq.read_table(output, columns=["_key"]).column(0).cast("int64").to_numpy()
    changed = np.arange(7, rows, 200)
    expected = np.concatenate([changed, np.arange(rows, rows + rows // 200)])
    return bool(np.array_equal(np.sort(keys), expected))


def _task(*arguments: str) -> subprocess.CompletedProcess[bytes]:
    """A task with pyarrow in a process of its own: the benchmark's process stays small, as
    a command's peak RSS (``wait4``) counts what it was forked from."""
    command = [sys.executable, "-m", "tests.benchmarks.keys", "--task", *arguments]
    return subprocess.run(command, check=False)


def job_file(folder: Path, table: Path, url: str) -> Path:
    path = folder / f"{table.stem}.toml"
    path.write_text(
        f'''name = "bench"
[input]
path = "{table}"
id_column = "id"
incremental = true
[service]
url = "{url}"
[output]
path = "{folder}/out/{{run_id}}.parquet"
[batch]
size = {BATCH}
concurrency = 8
'''
    )
    return path


def run_night(night: str, base: Path, rows: int, service: Service) -> dict[str, object]:
    """One night as the whole command; its figures."""
    table = base / f"{NIGHTS[night]}.parquet"
    outputs = base / "out"
    for old in outputs.glob("*.parquet*"):
        old.unlink()
    command = [sys.executable, "-m", "batchrunner", "run", str(job_file(base, table, service.url))]
    command += ["--no-progress", "--log-format", "json"]
    started = time.perf_counter()
    env = {**os.environ, "MODELARTS_TOKEN": TOKEN}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    wall, cpu = time.perf_counter() - started, usage.ru_utime + usage.ru_stime
    rss = usage.ru_maxrss / 1024
    if os.waitstatus_to_exitcode(status) != (2 if night == "duplicates" else 0):
        raise RuntimeError(f"{night}: exit {os.waitstatus_to_exitcode(status)}: {stderr[-3000:]}")
    read = rows + (rows // 200 if night == "changed" else 0)
    figures: dict[str, object] = {
        "night": night,
        "rows": read,
        "seconds": round(wall, 2),
        "rows_per_s": round(read / wall),
        "cpu_s": round(cpu, 2),
        "peak_rss_mb": round(rss),
    }
    if night == "duplicates":
        refused = [line for line in stderr.splitlines() if "not unique" in line]
        figures["refused"] = orjson.loads(refused[-1])["message"].split(". With")[0]
        return figures
    (summary_path,) = outputs.glob("*.summary.json")
    summary = orjson.loads(summary_path.read_bytes())
    sent = summary["rows"]["ok"] + summary["rows"]["error"]
    figures |= {"sent": sent, "skipped": summary["rows"]["skipped"]}
    figures |= {"requests": summary["requests"], "errors": summary["rows"]["error"]}
    if night == "changed":
        (output,) = outputs.glob("*.parquet")
        exact = _task("exact", str(output), str(rows))
        figures["exactly_the_changed_rows"] = exact.returncode == 0
    index = outputs / ".batchrunner" / "bench.keys"
    figures["index_bytes_per_row"] = round(index.stat().st_size / max(1, read), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", type=int, default=10_000_000)
    parser.add_argument("--folder")
    parser.add_argument("--repeat", type=int, default=1, help="run the nights this many times")
    parser.add_argument("--only", nargs="+", choices=list(NIGHTS), help="run only these nights")
    parser.add_argument("--nice", action="store_true", help="at the lowest CPU priority")
    parser.add_argument("--task", nargs="+", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.task:
        name, *arguments = options.task
        if name == "make":
            path, rows, table = arguments
            changed, duplicates = table == "night3", table == "duplicates"
            make_table(Path(path), int(rows), changed=changed, duplicates=duplicates)
        elif name == "seed":
            seed(Path(arguments[0]), Path(arguments[1]))
        else:
            sys.exit(0 if exactly_the_changed(Path(arguments[0]), int(arguments[1])) else 1)
        return
    nights = options.only or list(NIGHTS)
    if options.nice:
        os.nice(19)  # the service and every command inherit it
    print(f"{platform.node()}: {os.cpu_count()} CPUs; load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(dir=options.folder) as folder:
        base = Path(folder)
        (base / "out").mkdir()
        state = base / "out" / ".batchrunner"
        for table in sorted({NIGHTS[night] for night in nights} | {"night1"}):
            started = time.perf_counter()
            _task(
                "make", str(base / f"{table}.parquet"), str(options.rows), table
            ).check_returncode()
            print(
                f"{table}: {options.rows:,} rows in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        service = Service("linear")
        try:
            for _ in range(options.repeat):
                for night in nights:
                    if night in ("first", "duplicates"):
                        (state / "bench.keys").unlink(missing_ok=True)
                    elif not (state / "bench.keys").exists():
                        state.mkdir(parents=True, exist_ok=True)
                        _task("seed", str(base / "night1.parquet"), str(state)).check_returncode()
                    figures = run_night(night, base, options.rows, service)
                    figures["load_average"] = [round(load, 1) for load in os.getloadavg()]
                    print(orjson.dumps(figures).decode(), flush=True)
        finally:
            service.close()


if __name__ == "__main__":
    main()
