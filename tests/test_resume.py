"""Never lose a row: kill and resume, signals, the lock, changed jobs."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from batchrunner.checkpoint import StatePaths
from batchrunner.lock import JobLock
from tests.conftest import TOKEN, read_output, write_csv, write_job
from tests.servers import Call, ThreadedServer, answer, gateway_error

ROWS = 300
BATCH = 10
BATCHES = ROWS // BATCH
CONCURRENCY = 4


def slow_server(latency: float = 0.02) -> ThreadedServer:
    async def handle(call: Call) -> web.Response:
        await asyncio.sleep(latency)
        return answer(call)

    return ThreadedServer(handle)


def make_job(url: str, name: str = "resume", extra: str = "") -> Path:
    data = write_csv(Path("data.csv"), ["id", "x"], [(f"k{i:04d}", i) for i in range(ROWS)])
    return write_job(
        Path(f"{name}.toml"),
        f'name = "{name}"\n[input]\npath = "{data}"\nid_column = "id"\n'
        f'[service]\nurl = "{url}"\n[batch]\nsize = {BATCH}\nconcurrency = {CONCURRENCY}\n'
        f"{extra}",
    )


def first_rows(calls: list[Call]) -> Counter[int]:
    """How often each batch (named by its first row's x) reached the server."""
    return Counter(call.body["data"]["req_data"][0]["x"] for call in calls)


def spawn(job: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MODELARTS_TOKEN": TOKEN}
    return subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "run", str(job), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_calls(server: ThreadedServer, count: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while len(server.calls) < count:
        if process.poll() is not None:
            raise AssertionError(process.communicate())
        assert time.monotonic() < deadline, "the run sent too few requests"
        time.sleep(0.002)


def comparable(rows: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [(r["_key"], r["_status"], r["x"], r["score"]) for r in rows]


def test_kill_at_random_points_then_resume(invoke) -> None:
    rng = random.Random(20261127)
    with slow_server() as server:
        job = make_job(server.url)
        kills = 0
        for _ in range(10):
            process = spawn(job)
            seen = len(server.calls)
            wait_for_calls(server, seen + rng.randint(1, 2 * CONCURRENCY), process)
            process.kill()
            process.communicate()
            kills += 1
        result = invoke("run", str(job))
        assert result.exit_code == 0, result.stderr
        assert "resuming:" in result.stderr
        resumed = read_output("out/resume.parquet")
        per_batch = first_rows(server.calls)
        server.calls.clear()
        reference = invoke("run", str(job), "--output", "reference.parquet")
        assert reference.exit_code == 0
    assert comparable(resumed) == comparable(read_output("reference.parquet"))
    assert set(per_batch) == {i * BATCH for i in range(BATCHES)}
    resends = sum(per_batch.values()) - BATCHES
    # a kill costs at most the batches started and not yet journaled (at most twice the
    # concurrency: those sending and those waiting to retry); nothing journaled is resent
    assert resends <= kills * 2 * CONCURRENCY
    print(f"\n[resume] {kills} kills, {resends} batches sent again of {BATCHES}")
    assert not StatePaths.beside(Path("out/resume.parquet"), "resume").state.exists()


def test_sigint_finishes_in_flight_then_resumes_without_resending(invoke) -> None:
    with slow_server(latency=0.05) as server:
        job = make_job(server.url)
        process = spawn(job)
        wait_for_calls(server, 6, process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stderr
        assert b"interrupted: " in stderr
        assert b"re-run the same command to resume" in stderr
        assert StatePaths.beside(Path("out/resume.parquet"), "resume").state.exists()
        assert not Path("out/resume.parquet").exists()
        result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    # the requests in flight at the signal finished and were kept: none is sent twice
    assert sorted(first_rows(server.calls).values()) == [1] * BATCHES
    assert [r["_key"] for r in read_output("out/resume.parquet")] == [
        f"k{i:04d}" for i in range(ROWS)
    ]


def test_second_signal_stops_at_once() -> None:
    with slow_server(latency=5) as server:
        job = make_job(server.url)
        process = spawn(job)
        wait_for_calls(server, CONCURRENCY, process)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert b"stopping at once" in stderr
    assert time.monotonic() - started < 4  # well before the 5 s answers or the grace period


def test_second_run_of_a_locked_job_exits_75(invoke) -> None:
    with slow_server() as server:
        job = make_job(server.url)
        lock = StatePaths.beside(Path("out/resume.parquet"), "resume").lock
        with JobLock(lock, "resume"):
            result = invoke("run", str(job))
        assert result.exit_code == 75
        assert f"another run of job 'resume' is going on (pid {os.getpid()}" in result.stderr
        assert server.calls == []
        # released: the next run goes
        assert invoke("run", str(job)).exit_code == 0


def test_lock_of_a_dead_process_does_not_block(invoke) -> None:
    with slow_server(latency=0.05) as server:
        job = make_job(server.url)
        process = spawn(job)
        wait_for_calls(server, 2, process)
        process.kill()
        process.communicate()
        assert invoke("run", str(job)).exit_code == 0


def aborting_server(fail_after: int) -> ThreadedServer:
    """Answers ``fail_after`` requests, then refuses the token until ``healed``."""
    state = {"healed": False}

    async def handle(call: Call) -> web.Response:
        if call.number >= fail_after and not state["healed"]:
            return gateway_error(401, "APIG.0301", "token expires")
        return answer(call)

    server = ThreadedServer(handle)
    server.state = state  # type: ignore[attr-defined]
    return server


def test_resume_after_an_aborted_run_sends_only_what_did_not_finish(invoke) -> None:
    with aborting_server(fail_after=5) as server:
        job = make_job(server.url, extra="[batch]\n" if False else "")
        job.write_text(job.read_text().replace(f"concurrency = {CONCURRENCY}", "concurrency = 1"))
        first = invoke("run", str(job))
        assert first.exit_code == 3
        assert len([r for r in read_output("out/resume.parquet") if r["_status"] == "ok"]) == 50
        server.state["healed"] = True  # type: ignore[attr-defined]
        server.calls.clear()
        second = invoke("run", str(job))
    assert second.exit_code == 0, second.stderr
    assert "resuming: 50 rows in 5 finished batches are kept; 25 failed batches" in second.stderr
    assert len(server.calls) == BATCHES - 5
    rows = read_output("out/resume.parquet")
    assert all(r["_status"] == "ok" for r in rows)
    assert [r["_key"] for r in rows] == [f"k{i:04d}" for i in range(ROWS)]
    # Throughput is what this run sent: the 50 kept rows are not counted as sent now.
    summary = orjson.loads(Path("out/resume.parquet.summary.json").read_bytes())
    assert summary["rows"]["resumed"] == 50
    sent_now = ROWS - 50
    assert summary["rows_per_second"] == pytest.approx(sent_now / summary["elapsed_s"], rel=0.01)


def test_changed_setting_refuses_to_discard_finished_rows(invoke) -> None:
    with aborting_server(fail_after=2) as server:
        job = make_job(server.url)
        assert invoke("run", str(job)).exit_code == 3
        server.state["healed"] = True  # type: ignore[attr-defined]
        server.calls.clear()
        refused = invoke("run", str(job), "--batch-size", "30")
        assert refused.exit_code == 2, refused.stderr
        assert (
            "the job changed since its unfinished run (batch_size: 10 -> 30), which finished "
            "rows that would be discarded: run with the same settings to resume, or with "
            "--no-resume to start fresh" in refused.stderr
        )
        assert not server.calls
        assert "Traceback" not in refused.stderr
        fresh = invoke("run", str(job), "--batch-size", "30", "--no-resume")
    assert fresh.exit_code == 0, fresh.stderr
    assert "starting fresh (--no-resume)" in fresh.stderr
    assert len(server.calls) == ROWS // 30


def test_changed_input_file_starts_fresh_with_a_warning(invoke) -> None:
    with aborting_server(fail_after=2) as server:
        job = make_job(server.url)
        assert invoke("run", str(job)).exit_code == 3
        server.state["healed"] = True  # type: ignore[attr-defined]
        server.calls.clear()
        with Path("data.csv").open("a") as data:
            data.write("k9999,9999\n")
        result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    assert (
        "WARNING starting fresh: the job changed since its unfinished run (the input files "
        "changed" in result.stderr
    )
    assert len(server.calls) == BATCHES + 1


def test_no_resume_starts_fresh(invoke) -> None:
    with aborting_server(fail_after=2) as server:
        job = make_job(server.url)
        assert invoke("run", str(job)).exit_code == 3
        server.state["healed"] = True  # type: ignore[attr-defined]
        server.calls.clear()
        result = invoke("run", str(job), "--no-resume")
    assert result.exit_code == 0, result.stderr
    assert "starting fresh (--no-resume)" in result.stderr
    assert len(server.calls) == BATCHES


def test_state_files_hold_no_token(invoke) -> None:
    with aborting_server(fail_after=3) as server:
        job = make_job(server.url)
        assert invoke("run", str(job)).exit_code == 3
    state = StatePaths.beside(Path("out/resume.parquet"), "resume").state
    files = [path for path in state.rglob("*") if path.is_file()]
    assert len(files) >= 2  # the manifest and a journal part
    for path in files:
        assert TOKEN.encode() not in path.read_bytes()


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_both_signals_interrupt(signal_number: int) -> None:
    with slow_server(latency=0.05) as server:
        job = make_job(server.url)
        process = spawn(job)
        wait_for_calls(server, 2, process)
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr


def edit_keeping_mtime(path: Path, rows: list[tuple[str, int]]) -> None:
    stat = path.stat()
    write_csv(path, ["id", "x"], rows)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def test_resume_sends_again_a_batch_whose_values_changed_with_size_and_mtime_kept(invoke) -> None:
    with aborting_server(fail_after=5) as server:
        job = make_job(server.url)
        job.write_text(job.read_text().replace(f"concurrency = {CONCURRENCY}", "concurrency = 1"))
        assert invoke("run", str(job)).exit_code == 3
        rows = [(f"k{i:04d}", i) for i in range(ROWS)]
        rows[3] = ("k0003", 9)  # an edited value, same width
        rows[11], rows[12] = ("k0011", 12), ("k0012", 11)  # two rows' values swapped
        edit_keeping_mtime(Path("data.csv"), rows)
        server.state["healed"] = True  # type: ignore[attr-defined]
        server.calls.clear()
        resumed = invoke("run", str(job))
    assert resumed.exit_code == 0, resumed.stderr
    assert "2 finished batches (20 rows) hold other values now" in resumed.stderr
    assert first_rows(server.calls)[0] == 1 and first_rows(server.calls)[10] == 1
    by_key = {row["_key"]: row for row in read_output("out/resume.parquet")}
    assert len(by_key) == ROWS
    assert (by_key["k0003"]["x"], by_key["k0011"]["x"], by_key["k0012"]["x"]) == (9, 12, 11)


def test_resume_refuses_duplicate_keys(invoke) -> None:
    with aborting_server(fail_after=5) as server:
        job = make_job(server.url)
        assert invoke("run", str(job)).exit_code == 3
        rows = [(f"k{i:04d}", i) for i in range(ROWS)]
        rows[250] = ("k0007", 250)
        write_csv(Path("data.csv"), ["id", "x"], rows)
        stat = Path("data.csv").stat()
        os.utime("data.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        server.state["healed"] = True  # type: ignore[attr-defined]
        server.calls.clear()
        # the file changed: a fresh start, which reports the duplicate in the summary
        result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    assert "the input's keys are not unique (input.id_column 'id'): 1 keys more than once" in (
        result.stderr
    )
    assert "'k0007' at rows 8 and 251" in result.stderr
    summary = __import__("orjson").loads(Path("out/resume.parquet.summary.json").read_bytes())
    assert summary["duplicate_keys"]["keys"] == 1
