"""Hostile input and a hostile machine (issue 12): empty files, other encodings, bad lines
found mid-run, unwritable outputs, full disks, leftovers of killed runs. Each ends in a clear
message and the exit code the README's table gives, never a traceback."""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrunner.errors import InputError
from batchrunner.sources import open_tabular
from tests.conftest import write_csv, write_job
from tests.servers import Call, ThreadedServer, answer

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


# -- outputs that cannot be written, caught before the first request (item 10) ---------------


@pytest.fixture
def service():
    async def handle(call: Call) -> web.Response:
        return answer(call)

    with ThreadedServer(handle) as running:
        yield running


def _job(url: str, output: str) -> Path:
    write_csv(Path("d.csv"), IRIS_FEATURES, [(5.1, 3.5, 1.4, 0.2)])
    text = f'[input]\npath = "d.csv"\n[service]\nurl = "{url}"\n[output]\npath = "{output}"\n'
    return write_job(Path("job.toml"), text)


def _refused_up_front(invoke, service, output: str, message: str) -> None:
    _job(service.url, output)
    for command in (
        ["validate", "job.toml"],
        ["run", "job.toml"],
        ["run", "job.toml", "--dry-run"],
    ):
        result = invoke(*command)
        assert result.exit_code == 2, (command, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    assert service.calls == []


def test_an_output_path_that_is_a_folder_is_refused_up_front(invoke, service) -> None:
    Path("out.parquet").mkdir()
    _refused_up_front(invoke, service, "out.parquet", "output.path: out.parquet is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_up_front(invoke, service) -> None:
    Path("ro").mkdir()
    Path("ro").chmod(0o555)
    _refused_up_front(invoke, service, "ro/sub/o.parquet", "ro is not writable by this user")


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a small tmpfs with the given options (skips the test where this cannot be done:
    not root, no mount command, a container without the right)."""
    mounts: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(point)
        return point

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_an_output_folder_on_a_read_only_mount_is_refused_up_front(
    invoke, service, mounted
) -> None:
    point = mounted("ro,size=64k")
    _refused_up_front(
        invoke, service, f"{point}/o.parquet", f"{point} is on a read-only file system"
    )


def test_an_unknown_embedded_model_is_refused_up_front(invoke) -> None:
    _job("embedded:nosuch", "o.parquet")
    for command in (["validate", "job.toml"], ["run", "job.toml"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.stderr
        assert "service.url: no embedded model 'nosuch'; the embedded models are: iris" in (
            result.stderr
        )


# -- a write that fails mid-run: exit 74, finished work kept, a re-run resumes (item 10) ----

ROWS = 2000


def _big_job(url: str, output: str = "out/big.parquet", size: int = 50) -> Path:
    rows = [(i, 5.0 + i % 7, 3.0, 1.4, 0.2) for i in range(ROWS)]
    write_csv(Path("big.csv"), ["id", *IRIS_FEATURES], rows)
    text = (
        f'name = "big"\n[input]\npath = "big.csv"\nid_column = "id"\n'
        f'[service]\nurl = "{url}"\n[batch]\nsize = {size}\nconcurrency = 2\n'
        f'[output]\npath = "{output}"\n'
    )
    return write_job(Path("job.toml"), text)


class _FullDisk:
    """A disk with ``room`` bytes left: a file written past it fails with ENOSPC."""

    def __init__(self, room: int, applies: Callable[[Path], bool] = lambda path: True) -> None:
        self.room = room
        self.applies = applies

    def open_write(self, path: Path) -> pa.NativeFile:
        disk = self

        class File(io.RawIOBase):
            def __init__(self) -> None:
                self.handle = path.open("wb", buffering=0)

            def writable(self) -> bool:
                return True

            def write(self, data: Any) -> int:
                size = memoryview(data).nbytes
                if disk.applies(path):
                    if size > disk.room:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                    disk.room -= size
                return self.handle.write(data)  # type: ignore[no-any-return]

            def close(self) -> None:
                self.handle.close()
                super().close()

        return pa.PythonFile(File(), mode="w")


def _check_resumed(invoke, service, first_calls: int) -> None:
    """A re-run (the disk has room again) finishes, sending only what was not finished."""
    result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    assert "resuming" in result.stderr
    assert len(service.calls) - first_calls < ROWS // 50
    table = pq.read_table("out/big.parquet")
    assert table.column("_key").to_pylist() == [str(i) for i in range(ROWS)]
    assert set(table.column("_status").to_pylist()) == {"ok"}


def test_a_full_disk_mid_run_exits_74_and_a_rerun_resumes(invoke, service, monkeypatch) -> None:
    _big_job(service.url)
    disk = _FullDisk(room=60_000)
    with monkeypatch.context() as patch:
        patch.setattr("batchrunner.sink.journal.open_write", disk.open_write)
        patch.setattr("batchrunner.sink.assembly.open_write", disk.open_write)
        result = invoke("run", "job.toml")
    assert result.exit_code == 74, result.stderr
    assert "No space left on device" in result.stderr
    assert "re-run the same command to resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert 0 < len(service.calls) < ROWS // 50
    assert not Path("out/big.parquet").exists()
    _check_resumed(invoke, service, len(service.calls))


def test_a_full_disk_during_assembly_exits_74_and_a_rerun_sends_nothing(
    invoke, service, monkeypatch
) -> None:
    _big_job(service.url)
    disk = _FullDisk(room=1000, applies=lambda path: ".tmp-" in path.name)
    with monkeypatch.context() as patch:
        patch.setattr("batchrunner.sink.journal.open_write", disk.open_write)
        patch.setattr("batchrunner.sink.assembly.open_write", disk.open_write)
        result = invoke("run", "job.toml")
    assert result.exit_code == 74, result.stderr
    assert "cannot write the output out/big.parquet: No space left on device" in result.stderr
    assert len(service.calls) == ROWS // 50
    assert list(Path("out").glob(".big.parquet.tmp-*")) == []
    _check_resumed(invoke, service, len(service.calls))
    assert len(service.calls) == ROWS // 50  # nothing was sent again


def test_a_full_tmpfs_mid_run_exits_74_and_a_rerun_resumes(invoke, service, mounted) -> None:
    point = mounted("size=96k")
    _big_job(service.url, output=f"{point}/big.parquet")
    result = invoke("run", "job.toml")
    assert result.exit_code == 74, result.stderr
    assert "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
    first_calls = len(service.calls)
    subprocess.run(["mount", "-o", "remount,size=8m", str(point)], check=True)
    result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    assert len(service.calls) - first_calls < ROWS // 50
    table = pq.read_table(point / "big.parquet")
    assert table.column("_key").to_pylist() == [str(i) for i in range(ROWS)]


def test_a_state_folder_removed_mid_run_loses_nothing(invoke) -> None:
    state = Path(".batchrunner/big.state").absolute()

    async def handle(call: Call) -> web.Response:
        if call.number == 12:
            shutil.rmtree(state)
        return answer(call)

    with ThreadedServer(handle) as server:
        _big_job(server.url, output="big.parquet")
        result = invoke("run", "job.toml")
        assert result.exit_code == 0, result.stderr
        assert "state folder" in result.stderr and "nothing finished is lost" in result.stderr
        assert len(server.calls) == ROWS // 50
    table = pq.read_table("big.parquet")
    assert table.column("_key").to_pylist() == [str(i) for i in range(ROWS)]
    assert set(table.column("_status").to_pylist()) == {"ok"}


# -- text in other encodings (item 4) --------------------------------------------------------


def test_latin_1_text_in_a_utf8_csv_is_an_error_naming_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_bytes("id,name\n1,ok\n2,café\n".encode("latin-1"))
    with pytest.raises(
        InputError,
        match=r"l\.csv, line 3, column 'name': text that is not valid utf-8 .*"
        r"input\.encoding",
    ):
        open_tabular(path)


def test_bad_text_after_the_first_block_is_an_error_naming_line_and_column(
    tmp_path: Path,
) -> None:
    path = tmp_path / "l.csv"
    path.write_bytes(b"id,name\n" + b"1,ok\n" * 500 + "2,café\n".encode("latin-1"))
    source = open_tabular(path, block_bytes=256)
    with pytest.raises(InputError, match=r"l\.csv, line 502, column 'name': text that is not"):
        list(source.iter_batches(100))
    first = tmp_path / "f.csv"
    first.write_bytes(b"name,id\n" + b"ok,1\n" * 500 + "café,2\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"line 502, column 'name'"):
        open_tabular(first, block_bytes=256).scan_count()


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "gbk", "utf-16"])
def test_input_encoding_reads_other_encodings(tmp_path: Path, encoding: str) -> None:
    text = "id,name\n1,café\n2,北京\n" if encoding in ("gbk", "utf-16") else "id,name\n1,café\n"
    if encoding == "gbk":
        text = "id,name\n1,北京\n"
    csv_path = tmp_path / "t.csv"
    csv_path.write_bytes(text.encode(encoding))
    rows = [row for batch in open_tabular(csv_path, encoding=encoding).iter_batches(10)
            for row in batch.rows.to_pylist()]  # fmt: skip
    expected = [line.split(",")[1] for line in text.splitlines()[1:]]
    assert [row["name"] for row in rows] == expected
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_bytes("".join(f'{{"name": "{name}"}}\n' for name in expected).encode(encoding))
    source = open_tabular(jsonl, encoding=encoding)
    assert [r["name"] for b in source.iter_batches(10) for r in b.rows.to_pylist()] == expected
    assert source.scan_count() == len(expected)


def test_latin_1_text_in_utf8_json_lines_is_an_error_not_a_replacement(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    path.write_bytes(b'{"name": "ok"}\n' + '{"name": "café"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match=r"l\.jsonl, line 2: text that is not valid utf-8 "
                       r"\(byte 14: e9\)"):  # fmt: skip
        list(open_tabular(path).iter_batches(10))


def test_an_unknown_encoding_names_the_setting(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", ["a"], [[1]])
    with pytest.raises(InputError, match=r"input\.encoding: unknown encoding 'latin-9x'"):
        open_tabular(path, encoding="latin-9x")


def test_bytes_columns_are_refused_unless_base64_is_asked_for(tmp_path: Path) -> None:
    table = pa.table({"id": [1, 2], "blob": pa.array([b"\x00\xff", b"ab"], pa.binary())})
    path = tmp_path / "b.parquet"
    pq.write_table(table, path)
    with pytest.raises(InputError, match=r"column 'blob' holds bytes .*input\.binary = \"base64\""):
        open_tabular(path)
    source = open_tabular(path, binary="base64")
    assert [r["blob"] for b in source.iter_batches(5) for r in b.rows.to_pylist()] == [
        "AP8=",
        "YWI=",
    ]


def test_run_with_latin_1_input_exits_2_before_any_request(invoke, service) -> None:
    Path("l.csv").write_bytes("id,name\n1,café\n".encode("latin-1"))
    write_job(Path("job.toml"), f'[input]\npath = "l.csv"\n[service]\nurl = "{service.url}"\n')
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert "l.csv, line 2, column 'name': text that is not valid utf-8" in result.stderr
    assert service.calls == []
    result = invoke("run", "job.toml", "--set", "input.encoding=latin-1")
    assert result.exit_code == 0, result.stderr
    assert service.calls[0].body["data"]["req_data"] == [{"id": 1, "name": "café"}]


# -- a line too long for the read block, found mid-run (item 13) ----------------------------

LONG_AT = 20_000  # the 20,001st row holds a value longer than the 4 MiB read block
LONG_ROWS = 24_000


def _long_line_input(kind: str) -> Path:
    note = "x" * (9 << 20)  # spans three 4 MiB blocks
    if kind == "csv":
        path = Path("long.csv")
        with path.open("w") as handle:
            handle.write("id,x,note\n")
            for i in range(LONG_ROWS):
                handle.write(f"{i},{i % 7},{note if i == LONG_AT else 'n'}\n")
    else:
        path = Path("long.jsonl")
        with path.open("w") as handle:
            for i in range(LONG_ROWS):
                value = note if i == LONG_AT else "n"
                handle.write(f'{{"id": "{i}", "x": {i % 7}, "note": "{value}"}}\n')
    return path


@pytest.mark.parametrize("kind, line", [("csv", "20002"), ("jsonl", "20001")])
def test_a_line_too_long_found_mid_run_exits_65_names_it_and_a_rerun_resumes(
    invoke, service, kind: str, line: str
) -> None:
    path = _long_line_input(kind)
    text = (
        f'name = "long"\n[input]\npath = "{path}"\nid_column = "id"\ncolumns = ["x"]\n'
        f'[service]\nurl = "{service.url}"\n[batch]\nsize = 500\nconcurrency = 2\n'
        '[output]\npath = "out/long.parquet"\n'
    )
    write_job(Path("job.toml"), text)
    result = invoke("run", "job.toml")
    assert result.exit_code == 65, result.stderr
    assert "Traceback" not in result.stderr and "straddl" not in result.stderr
    assert (
        f"{path}, row 20001 (line {line}): the line is longer than input.block_size "
        "(4 MiB), the most that is read at once; set input.block_size above the longest "
        "line's size"
    ) in result.stderr
    assert "re-run the same command to resume" in result.stderr
    sent = len(service.calls)
    assert 0 < sent <= LONG_AT // 500
    assert not Path("out/long.parquet").exists()
    # the setting the message names: a re-run resumes, sending only what did not finish
    result = invoke("run", "job.toml", "--set", "input.block_size=16777216")
    assert result.exit_code == 0, result.stderr
    assert "resuming" in result.stderr
    # the requests in flight finished before the run stopped: no batch is sent twice
    assert len(service.calls) == LONG_ROWS // 500
    table = pq.read_table("out/long.parquet", columns=["_key", "_status"])
    assert table.column("_key").to_pylist() == [str(i) for i in range(LONG_ROWS)]
    assert set(table.column("_status").to_pylist()) == {"ok"}


def test_a_line_too_long_in_the_first_block_exits_2_before_any_request(invoke, service) -> None:
    Path("first.csv").write_text("id,note\n0," + "x" * (9 << 20) + "\n1,n\n")
    write_job(Path("job.toml"), f'[input]\npath = "first.csv"\n[service]\nurl = "{service.url}"\n')
    for command in (["validate", "job.toml"], ["run", "job.toml"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.stderr
        assert "first.csv: a line in the first 4 MiB is longer than input.block_size" in (
            result.stderr
        )
    assert service.calls == []


def test_block_size_is_checked() -> None:
    from batchrunner.job import InputSettings

    with pytest.raises(ValueError, match="block_size"):
        InputSettings(path="x.csv", block_size=10)


def test_a_malformed_row_found_mid_run_exits_65_naming_its_line(invoke, service) -> None:
    # past the first read block (64 KiB here): found only when the run reaches it
    rows = [f"{i},{i % 7}" for i in range(LONG_ROWS)]
    rows[LONG_AT] = f"{LONG_AT},1,2"  # a column too many
    Path("bad.csv").write_text("id,x\n" + "\n".join(rows) + "\n")
    text = (
        f'name = "bad"\n[input]\npath = "bad.csv"\nid_column = "id"\nblock_size = 65536\n'
        f'[service]\nurl = "{service.url}"\n[batch]\nsize = 500\nconcurrency = 2\n'
        '[output]\npath = "out/bad.parquet"\n'
    )
    write_job(Path("job.toml"), text)
    result = invoke("run", "job.toml")
    assert result.exit_code == 65, result.stderr
    assert "bad.csv, line 20002: expected 2 columns, got 3" in result.stderr
    assert 0 < len(service.calls) <= LONG_AT // 500


def test_a_ragged_line_with_bad_text_prints_no_pyarrow_traceback() -> None:
    # item 17: Arrow cannot decode such a line for its invalid-row handler and printed
    # "Exception ignored ... Traceback" on stderr before our own message
    Path("r.csv").write_bytes(b"id,name\n1,a\n2,caf\xe9,extra\n3,b\n")
    command = [sys.executable, "-m", "batchrunner", "run", "--input", "r.csv"]
    command += ["--url", "embedded:iris", "--output", "o.parquet", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert "r.csv, line 3: expected 2 columns, got 3" in result.stderr


def test_a_dangling_link_as_input_says_where_it_leads(tmp_path: Path) -> None:
    link = tmp_path / "iris.csv"
    link.symlink_to("../gone/iris.csv")
    with pytest.raises(InputError) as raised:
        open_tabular(link)
    assert str(raised.value) == (
        f"input.path: {link} is a link to ../gone/iris.csv, which does not exist"
    )
