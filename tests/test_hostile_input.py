"""Hostile input and a hostile machine (issue 12): empty files, other encodings, bad lines
found mid-run, unwritable outputs, full disks, leftovers of killed runs. Each ends in a clear
message and the exit code the README's table gives, never a traceback."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrunner.errors import InputError
from batchrunner.sources import open_tabular
from tests.conftest import write_csv

IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]

# -- empty files (item 14) -------------------------------------------------------------------


def test_a_zero_byte_csv_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "z.csv"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"z\.csv: the file is empty: a CSV file needs a header"):
        open_tabular(path)


def test_zero_byte_csv_fails_validate_and_run_with_exit_2(invoke) -> None:
    Path("z.csv").write_bytes(b"")
    Path("job.toml").write_text('[input]\npath = "z.csv"\n[service]\nurl = "embedded:iris"\n')
    for command in (["validate", "job.toml"], ["run", "job.toml"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.stderr
        assert "z.csv: the file is empty" in result.stderr
    assert not Path("out").exists()


def test_a_header_only_csv_warns_and_writes_an_empty_output(invoke, caplog) -> None:
    data = write_csv(Path("h.csv"), ["sepal_length", "sepal_width"], [])
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        result = invoke(
            "run", "--input", str(data), "--url", "embedded:iris", "--output", "e.parquet"
        )
    assert result.exit_code == 0, result.stderr
    assert "h.csv has no rows (only a header?): the output is empty" in result.stderr
    assert pq.read_table("e.parquet").num_rows == 0


# -- leftovers of a run killed while writing aside (item 16) ---------------------------------


def _dead_leftover(folder: Path, name: str) -> Path:
    """A file ``.<name>.tmp-<pid>`` as a process killed (-9) in the middle of writing it
    leaves it: the process writes it, then is killed, so its pid is a dead one."""
    folder.mkdir(parents=True, exist_ok=True)
    script = (
        "import os, sys, time\n"
        "path = os.path.join(sys.argv[1], f'.{sys.argv[2]}.tmp-{os.getpid()}')\n"
        "open(path, 'wb').write(b'PAR1 half a file')\n"
        "print(path, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(folder), name], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    path = Path(child.stdout.readline().strip())
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert path.exists()
    return path


def test_the_next_run_removes_what_a_killed_assembly_left(invoke) -> None:
    data = write_csv(Path("d.csv"), IRIS_FEATURES, [(5.1, 3.5, 1.4, 0.2)])
    parquet = _dead_leftover(Path("out"), "d-2026-01-01.parquet")
    summary = _dead_leftover(Path("out"), "d-2026-01-01.parquet.summary.json")
    other_job = _dead_leftover(Path("out"), "other.parquet")
    alive = Path("out") / f".d-x.parquet.tmp-{os.getppid()}"  # a live process's: kept
    alive.write_bytes(b"")
    result = invoke(
        "run", "--input", str(data), "--url", "embedded:iris",
        "--output", "out/{name}-{date}.parquet",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert not parquet.exists() and not summary.exists()
    assert other_job.exists() and alive.exists()
    assert f"removed {parquet}" in result.stderr
