"""The system side of cron: the crontab command (a stand-in first on PATH), the installed
command's path, the env file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from batchrunner.crontab import (
    check_env_file,
    locate_executable,
    make_log_folder,
    read_crontab,
    write_crontab,
)
from batchrunner.errors import CrontabError, ScheduleError
from tests.conftest import FakeCrontab


def test_no_table_reads_as_empty(fake_crontab: FakeCrontab) -> None:
    assert read_crontab() == ""
    assert fake_crontab.calls == ["-l"]


def test_write_then_read(fake_crontab: FakeCrontab) -> None:
    table = "MAILTO=\n0 2 * * * /bin/true # café\n"
    write_crontab(table)
    assert fake_crontab.table == table
    assert read_crontab() == table


def test_a_failing_read_is_an_error_not_an_empty_table(fake_crontab: FakeCrontab) -> None:
    # reading it as empty would let the next write wipe the user's table
    fake_crontab.break_it()
    with pytest.raises(CrontabError) as caught:
        read_crontab()
    assert str(caught.value) == (
        "`crontab -l` failed (exit 1): crontab: your UID isn't in the passwd file.; "
        "your crontab was not changed"
    )


def test_a_refused_table(fake_crontab: FakeCrontab) -> None:
    with pytest.raises(CrontabError) as caught:
        write_crontab("0 2 * * * /bin/true")  # no last line break
    assert str(caught.value) == (
        "`crontab -` refused the new table (exit 1): new crontab file is missing newline "
        "before EOF, can't install.; your crontab was not changed"
    )


def test_no_crontab_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(CrontabError) as caught:
        read_crontab()
    assert str(caught.value) == (
        "the crontab command was not found: install cron (e.g. apt-get install cron), "
        "or put the line printed without --install into your scheduler yourself"
    )


def executable_at(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_command_beside_the_interpreter_comes_first(tmp_path: Path) -> None:
    beside = executable_at(tmp_path / "venv" / "bin" / "batchrunner")
    on_path = executable_at(tmp_path / "usr" / "bin" / "batchrunner")
    found = locate_executable(
        executable=str(tmp_path / "venv" / "bin" / "python"),
        argv0=str(on_path),
        which=lambda name: str(on_path),
    )
    assert found == beside


def test_then_the_command_it_was_started_as(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    executable_at(tmp_path / "tools" / "batchrunner")
    found = locate_executable(
        executable=str(tmp_path / "python" / "bin" / "python3"),
        argv0="tools/batchrunner",  # relative: made absolute
        which=lambda name: None,
    )
    assert found == tmp_path / "tools" / "batchrunner"


def test_then_the_one_on_path(tmp_path: Path) -> None:
    on_path = executable_at(tmp_path / "bin" / "batchrunner")
    (tmp_path / "python").mkdir()
    (tmp_path / "python" / "batchrunner").write_text("not executable")
    found = locate_executable(
        executable=str(tmp_path / "python" / "python3"),
        argv0="/usr/lib/python3/pytest",
        which=lambda name: str(on_path),
    )
    assert found == on_path


def test_no_command_anywhere(tmp_path: Path) -> None:
    with pytest.raises(CrontabError) as caught:
        locate_executable(
            executable=str(tmp_path / "python3"), argv0="pytest", which=lambda name: None
        )
    assert str(caught.value).startswith(
        f"cannot find the installed batchrunner command (looked in {tmp_path}, "
    )


def test_in_this_venv_it_is_the_venv_command() -> None:
    assert locate_executable() == Path(sys.executable).parent / "batchrunner"


def env_file(text: str, mode: int) -> Path:
    path = Path(".env").absolute()
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_private_env_file_that_sets_the_token() -> None:
    path = env_file("# the token\nexport MODELARTS_TOKEN=abc\n", 0o600)
    assert check_env_file(path, "MODELARTS_TOKEN") == []
    assert check_env_file(path, None) == []


def test_env_file_others_can_read() -> None:
    path = env_file("MODELARTS_TOKEN=abc\n", 0o644)
    assert check_env_file(path, "MODELARTS_TOKEN") == [
        f"{path} can be read or changed by other users (mode 0644), and it holds secrets: "
        f"chmod 600 {path}"
    ]


def test_env_file_without_the_token() -> None:
    path = env_file("MODELARTS_TOKEN_OLD=abc\n", 0o600)
    assert check_env_file(path, "MODELARTS_TOKEN") == [
        f"{path} does not set MODELARTS_TOKEN, which the job reads its token from: "
        "add a line MODELARTS_TOKEN=..."
    ]


def test_missing_env_file() -> None:
    path = Path("nope.env").absolute()
    with pytest.raises(ScheduleError) as caught:
        check_env_file(path, "MY_TOKEN")
    assert str(caught.value) == (
        f"--env-file {path}: no such file; create it with one NAME=value a line, "
        f"e.g. MY_TOKEN=..., readable by you only (chmod 600 {path})"
    )


def test_env_file_that_is_a_folder() -> None:
    os.mkdir("secrets")
    with pytest.raises(ScheduleError) as caught:
        check_env_file(Path("secrets"), None)
    assert str(caught.value) == (
        "--env-file secrets: not a file; give a file of one NAME=value a line, "
        "e.g. MODELARTS_TOKEN=..."
    )


def test_make_log_folder(tmp_path: Path) -> None:
    make_log_folder(tmp_path / "logs" / "nightly" / "iris.log")
    assert (tmp_path / "logs" / "nightly").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ScheduleError) as caught:
        make_log_folder(tmp_path / "file" / "iris.log")
    assert str(caught.value) == (
        f"--log {tmp_path / 'file' / 'iris.log'}: cannot create its folder: File exists; "
        "give another --log"
    )
