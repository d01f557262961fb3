"""Progress as a person and a log see it: the live display in a terminal (a real pseudo-terminal
and the real console script), periodic log lines elsewhere, text or JSON."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from tests.conftest import REPO, write_csv, write_job
from tests.servers import Call, ThreadedServer, answer

CONSOLE_SCRIPT = Path(sys.executable).parent / "batchrunner"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PTY_DEADLINE_S = 60.0


def run_in_pty(arguments: list[str], columns: int = 160) -> tuple[int, str]:
    """Run the real command with a pseudo-terminal as stdin, stdout and stderr; return its
    exit code and everything it wrote, escape sequences removed."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    environment = {k: v for k, v in os.environ.items() if k not in {"NO_COLOR", "COLUMNS"}}
    environment["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), *arguments],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=environment,
        close_fds=True,
    )
    os.close(terminal)
    written = bytearray()
    deadline = time.monotonic() + PTY_DEADLINE_S
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([controller], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the command closed the terminal (it ended)
                break
            if not chunk:
                break
            written += chunk
        else:
            pytest.fail(f"the command did not end in {PTY_DEADLINE_S:.0f} s")
        code = process.wait(timeout=PTY_DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return code, ANSI_ESCAPE.sub("", written.decode("utf-8", errors="replace"))


def iris_job(folder: Path) -> Path:
    """The iris sample, copied, and a job scoring it with the embedded service."""
    shutil.copy(REPO / "samples" / "iris.csv", folder / "iris.csv")
    return write_job(
        folder / "iris.toml",
        'name = "iris"\n[input]\npath = "iris.csv"\nid_column = "id"\n'
        'columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]\n'
        '[service]\nurl = "embedded:iris"\n',
    )


def test_live_display_in_a_terminal(tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.is_file(), f"the console script is not installed at {CONSOLE_SCRIPT}"
    code, screen = run_in_pty(["run", str(iris_job(tmp_path))])
    assert code == 0, screen
    # the live display's last frame: a bar (the total is known) and the figures
    frame = re.search(r"━+ iris: 150 of 150 rows \(100%\), ([\d,]+) rows/s, (.*)", screen)
    assert frame is not None, screen
    assert int(frame.group(1).replace(",", "")) > 0
    assert frame.group(2).startswith("0 in flight, 0 retries, 0 errors, ETA 0:00")
    # then the summary, as a rich table
    assert "iris: done" in screen
    assert re.search(r"│ rows +│ 150 ok, 0 errors, 0 skipped +│", screen), screen
    assert re.search(r"│ output +│ out/iris.parquet +│", screen), screen
    assert re.search(r"│ latency +│ p50 [\d.]+ ms, p95 [\d.]+ ms, p99 [\d.]+ ms +│", screen), screen


def test_progress_flag_draws_the_live_display_anywhere(invoke, tmp_path: Path) -> None:
    result = invoke("run", str(iris_job(tmp_path)), "--progress")
    assert result.exit_code == 0, result.stderr
    assert "━ iris: 150 of 150 rows (100%)" in ANSI_ESCAPE.sub("", result.stderr)
    assert "╭" not in result.stderr  # the summary goes to stdout (a table there)
    assert result.stdout.startswith("iris: done\n")


@pytest.fixture
def slow_server():
    # 20 ms an answer, one request at a time: a run of 10 requests lasts at least 200 ms,
    # so that ticks every 50 ms must log several lines.
    async def handle(call: Call) -> web.Response:
        await asyncio.sleep(0.02)
        return answer(call)

    with ThreadedServer(handle) as server:
        yield server


def slow_job(server: ThreadedServer) -> Path:
    data = write_csv(Path("data.csv"), ["id", "x"], [(f"r{i}", i) for i in range(10)])
    return write_job(
        Path("slow.toml"),
        f'name = "slow"\n[input]\npath = "{data}"\nid_column = "id"\n'
        f'[service]\nurl = "{server.url}"\n[batch]\nsize = 1\nconcurrency = 1\n',
    )


# "of ~10": the CSV's total is an estimate (from the bytes read) until it is read through; on
# a loaded machine the first progress line can even come before anything is read (no total).
PROGRESS_LINE = re.compile(
    r"^\d\d:\d\d:\d\d INFO progress: (\d+)(?: of ~?10)? rows(?: \((\d+)%\))?, [\d,]+ rows/s, "
    r"[01] in flight, 0 retries, 0 errors(, ETA \d+:\d\d)?$"
)


def test_progress_lines_when_not_a_terminal(invoke, slow_server: ThreadedServer) -> None:
    result = invoke("run", str(slow_job(slow_server)), "--progress-interval", "0.05")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if " progress: " in line]
    assert len(lines) >= 2, result.stderr
    matches = [PROGRESS_LINE.match(line) for line in lines]
    assert all(matches), lines
    done = [int(match.group(1)) for match in matches if match]
    assert done == sorted(done)
    assert "━" not in result.stderr  # no live display


def test_progress_lines_as_json(invoke, slow_server: ThreadedServer) -> None:
    result = invoke(
        "run",
        str(slow_job(slow_server)),
        "--no-progress",
        "--progress-interval",
        "0.05",
        "--log-format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stderr.splitlines()]
    progress = [line for line in lines if line["message"].startswith("progress: ")]
    assert len(progress) >= 2
    for line in progress:
        assert line["level"] == "info"
        assert line["rows_total"] == 10
        assert 0 <= line["rows_done"] <= 10
        assert line["rows_done"] == line["rows_ok"] + line["rows_error"]
        assert line["in_flight"] in {0, 1}
        assert line["retries"] == 0
        assert line["rows_per_second"] >= 0
        assert line["elapsed_s"] > 0
        assert line["eta_s"] is None or line["eta_s"] >= 0
    assert orjson.loads(result.stdout)["rows"]["ok"] == 10  # the summary: stdout


def test_json_lines_even_for_errors(invoke) -> None:
    # cron's log stays one JSON object a line when the run fails, down to the last message
    data = write_csv(
        Path("partial.csv"),
        ["sepal_length", "sepal_width", "petal_length", "petal_width"],
        [(5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, "")],
    )
    job = write_job(
        Path("partial.toml"),
        f'[input]\npath = "{data}"\n[service]\nurl = "embedded:iris"\n[batch]\nsize = 1\n',
    )
    result = invoke("run", str(job), "--no-progress", "--log-format", "json")
    assert result.exit_code == 1
    lines = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert lines[-1]["level"] == "error"
    assert lines[-1]["message"].startswith("error rate 50.00% is above max_error_rate 0.00%")
    summary = orjson.loads(result.stdout)
    assert summary["errors"]["model_error"]["example_key"] == "1"

    missing = invoke("run", "nope.toml", "--log-format", "json")
    assert missing.exit_code == 2
    assert orjson.loads(missing.stderr) | {"time": None} == {
        "time": None,
        "level": "error",
        "logger": "batchrunner",
        "message": "job file not found: nope.toml",
    }


def test_a_csv_s_progress_has_an_estimated_total_and_an_eta(invoke, slow_server) -> None:
    # A CSV's row count is known only once it is read through: until then the total is
    # estimated from the bytes parsed against the file's size (issue 12, item 18).
    rows = 40_000
    data = write_csv(Path("big.csv"), ["id", "x"], [(f"r{i:05d}", i % 10) for i in range(rows)])
    job = write_job(
        Path("big.toml"),
        f'name = "big"\n[input]\npath = "{data}"\nid_column = "id"\nblock_size = 65536\n'
        f'[service]\nurl = "{slow_server.url}"\n[batch]\nsize = 500\nconcurrency = 1\n',
    )
    result = invoke(
        "run", str(job), "--no-progress", "--progress-interval", "0.05", "--log-format", "json"
    )
    assert result.exit_code == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stderr.splitlines()]
    progress = [line for line in lines if line["message"].startswith("progress: ")]
    estimated = [line for line in progress if line["rows_total_estimated"]]
    assert estimated, progress
    for line in estimated:
        assert abs(line["rows_total"] - rows) <= rows * 0.05, line
        assert " of ~" in line["message"]
    assert any(line["eta_s"] is not None for line in estimated)
