"""Nightly runs at scale: the key index's nights and the duplicate-key check, with peak memory.

    python -m tests.benchmarks.keys [ROWS] [--folder DIR] [--repeat N] [--only duplicates]
                                                    (ROWS: 10000000 by default)

Run by hand, not in CI. Generates a Parquet table of ROWS rows (``id``, an integer, and four
floats) in DIR (a temporary folder by default; nothing is committed), then runs each night
in a fresh process, through the library as a run does (``open_seen``, ``check``, ``filter``,
``remember``; every sent row answered ok, no network):

    night 1     nothing remembered: every row is sent
    night 2     nothing new: no row is sent
    night 3     1% of rows new or changed, scattered: exactly those are sent, in full batches
    duplicates  the check alone, over the table with 3 duplicate keys planted

and prints one line per night: seconds, rows/s, peak RSS (the process's maxrss), the index's
size on disk, and what was sent.
"""

from __future__ import annotations

import argparse
import importlib.abc
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 1000
FEATURES = ["a", "b", "c", "d"]


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


def _phase_peak_mb() -> int:
    """The process's peak resident set (MB) since the last call: ``VmHWM``, reset after it
    is read (Linux; elsewhere the peak since the start, ``ru_maxrss``)."""
    try:
        status = Path("/proc/self/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines() if "VmHWM" in line)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024


class _NoPandas(importlib.abc.MetaPathFinder):
    """Makes ``import pandas`` fail, as in an install of batchrunner's own dependencies
    (pyarrow imports pandas when it can, for ``to_numpy`` and any Python value it converts:
    30 MB)."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.partition(".")[0] == "pandas":
            raise ModuleNotFoundError(name)


def night(table: str, folder: str, mode: str, *, without_pandas: bool = False) -> None:
    """One night, in this process (see ``main``); prints a JSON line."""
    if without_pandas:
        sys.meta_path.insert(0, _NoPandas())
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchrunner.errors import InputError
    from batchrunner.incremental import check_reader, open_seen
    from batchrunner.sink import ROW_GROUP_ROWS
    from batchrunner.sources import open_tabular
    from batchrunner.wiring import use_lean_memory_pool

    use_lean_memory_pool()  # as a run does
    started = time.perf_counter()
    source = open_tabular(table, id_column="id")
    index = Path(folder) / "bench.keys"
    seen = open_seen(index, url="bench")
    figures: dict[str, object] = {"night": mode, "pandas": not without_pandas}
    try:
        seen.check(check_reader(source, 65_536, None))
    except InputError as exc:
        seconds = time.perf_counter() - started
        figures["refused"] = str(exc).split(". With")[0]
        figures["seconds"] = round(seconds, 2)
        figures["rows_per_s"] = round((source.count_rows() or 0) / seconds)
        figures["cpu_s"] = round(time.process_time(), 2)
        figures["peak_rss_mb"] = _phase_peak_mb()
        print(orjson.dumps(figures).decode())
        return
    checked = time.perf_counter()
    check_peak = _phase_peak_mb()
    sent = batches = full = 0
    output = Path(folder) / "out.parquet"
    schema = pa.schema([("_key", pa.string()), ("_status", pa.string())])
    # The output as the run's assembly writes it: row groups of ROW_GROUP_ROWS rows.
    pending: list[pa.RecordBatch] = []
    with pq.ParquetWriter(output, schema) as writer:
        for batch in seen.filter(source.iter_batches(BATCH), BATCH):
            sent += len(batch)
            batches += 1
            full += len(batch) == BATCH
            keys = pa.array(batch.keys, pa.string())
            pending.append(pa.record_batch([keys, pa.repeat("ok", len(keys))], schema=schema))
            if len(pending) * BATCH >= ROW_GROUP_ROWS:
                writer.write_table(pa.Table.from_batches(pending, schema))
                pending = []
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema))
    filtered = time.perf_counter()
    filter_peak = _phase_peak_mb()
    seen.remember(output, run_id=mode, url="bench")
    ended = time.perf_counter()
    remember_peak = _phase_peak_mb()
    rows = sent + seen.rows_skipped
    figures |= {
        "rows": rows,
        "sent": sent,
        "skipped": seen.rows_skipped,
        "batches": batches,
        "full_batches": full,
        "check_s": round(checked - started, 2),
        "filter_s": round(filtered - checked, 2),
        "remember_s": round(ended - filtered, 2),
        "seconds": round(ended - started, 2),
        "rows_per_s": round(rows / (ended - started)),
        "cpu_s": round(time.process_time(), 2),
        "peak_rss_mb": max(check_peak, filter_peak, remember_peak),
        "phase_peaks_mb": [check_peak, filter_peak, remember_peak],
        "index_bytes": index.stat().st_size,
        "index_bytes_per_row": round(index.stat().st_size / max(1, rows), 1),
    }
    print(orjson.dumps(figures).decode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", type=int, default=10_000_000)
    parser.add_argument("--folder")
    parser.add_argument("--repeat", type=int, default=1, help="run the nights this many times")
    parser.add_argument("--only", choices=["duplicates"], help="run only the duplicate check")
    parser.add_argument(
        "--without-pandas", action="store_true", help="as without pandas installed (see _NoPandas)"
    )
    parser.add_argument("--night", nargs=3, help=argparse.SUPPRESS)  # table folder mode
    options = parser.parse_args()
    if options.night:
        night(*options.night, without_pandas=options.without_pandas)
        return
    nights = [
        ("first", "night1"),
        ("nothing new", "night1"),
        ("1% new or changed", "night3"),
        ("duplicates", "duplicates"),
    ]
    if options.only == "duplicates":
        nights = nights[3:]
    print(f"{platform.node()}: {os.cpu_count()} CPUs; load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(dir=options.folder) as folder:
        base = Path(folder)
        print(f"generating {options.rows:,} rows in {base} ...", flush=True)
        for _, table in nights:
            if not (base / f"{table}.parquet").exists():
                make_table(
                    base / f"{table}.parquet",
                    options.rows,
                    changed=table == "night3",
                    duplicates=table == "duplicates",
                )
        state = base / "state"
        state.mkdir()
        for _ in range(options.repeat):
            for mode, table in nights:
                if mode in ("first", "duplicates"):
                    (state / "bench.keys").unlink(missing_ok=True)
                command = [sys.executable, "-m", "tests.benchmarks.keys", "--night"]
                if options.without_pandas:
                    command.insert(-1, "--without-pandas")
                table_path = str(base / f"{table}.parquet")
                subprocess.run([*command, table_path, str(state), mode], check=True)


if __name__ == "__main__":
    main()
