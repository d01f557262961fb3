"""`batchrunner cron`: the printed line, installing and removing it through a stand-in crontab,
and the line itself run the way cron runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, FakeCrontab, write_job

COMMAND = Path(sys.executable).parent / "batchrunner"
OTHERS = "MAILTO=ops@example.com\n# backups\n0 3 * * * /usr/local/bin/backup\n"


@pytest.fixture
def job(tmp_path: Path) -> Path:
    # The output folder comes from the environment, with a default: the test of the real line
    # shows that the env file was read.
    shutil.copy(REPO / "samples" / "iris.csv", tmp_path / "iris.csv")
    (tmp_path / "jobs").mkdir()
    return write_job(
        tmp_path / "jobs" / "iris.toml",
        'name = "iris"\n[input]\npath = "iris.csv"\nid_column = "id"\n'
        'columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]\n'
        '[service]\nurl = "embedded:iris"\n'
        '[output]\npath = "${OUT_DIR:-out}/{name}.parquet"\n',
    )


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.env"
    path.write_text("OUT_DIR=nightly\nMODELARTS_TOKEN=from-the-env-file\n")
    path.chmod(0o600)
    return path


def expected_line(tmp_path: Path, schedule: str, env: bool = True) -> str:
    env_steps = f"set -a && . {tmp_path}/secrets.env && set +a && " if env else ""
    return (
        f"{schedule} {{ cd {tmp_path} && {env_steps}"
        f"exec {COMMAND} run {tmp_path}/jobs/iris.toml --log-format json --no-progress; }} "
        f">>{tmp_path}/logs/iris.log 2>&1 # batchrunner:iris:{tmp_path}/jobs/iris.toml"
    )


def test_prints_the_line(invoke, job: Path, env_file: Path, tmp_path: Path, fake_crontab) -> None:
    result = invoke("cron", "jobs/iris.toml", "--schedule", "0 2 * * mon-fri", "--env-file",
                    "secrets.env")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected_line(tmp_path, "0 2 * * 1-5") + "\n"
    assert result.stderr == "add it with `crontab -e`, or run this again with --install\n"
    assert (tmp_path / "logs").is_dir()  # the line's redirection needs the folder
    assert fake_crontab.calls == []  # printing touches no table


def test_install_twice_leaves_one_line_and_other_lines_alone(
    invoke, job: Path, env_file: Path, tmp_path: Path, fake_crontab: FakeCrontab
) -> None:
    fake_crontab.table = OTHERS
    args = ("cron", str(job), "--schedule", "0 2 * * *", "--env-file", str(env_file), "--install")
    first = invoke(*args)
    assert first.exit_code == 0, first.stderr
    assert fake_crontab.table == OTHERS + expected_line(tmp_path, "0 2 * * *") + "\n"
    assert first.stdout == expected_line(tmp_path, "0 2 * * *") + "\n"
    assert first.stderr == (
        "added to your crontab\n"
        f"each run appends its log to {tmp_path}/logs/iris.log; look at a run's output with "
        "`batchrunner inspect <output>.parquet`\n"
    )

    second = invoke(*args)
    assert second.exit_code == 0, second.stderr
    assert fake_crontab.table == OTHERS + expected_line(tmp_path, "0 2 * * *") + "\n"
    assert "this line is already in your crontab: nothing changed\n" in second.stderr
    assert fake_crontab.calls == ["-l", "-", "-l"]  # the second install wrote nothing


def test_a_new_schedule_replaces_the_old_line(
    invoke, job: Path, env_file: Path, tmp_path: Path, fake_crontab: FakeCrontab
) -> None:
    old = expected_line(tmp_path, "0 2 * * *")
    fake_crontab.table = old + "\n" + OTHERS
    result = invoke("cron", str(job), "--schedule", "@hourly", "--env-file", str(env_file),
                    "--install")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert fake_crontab.table == expected_line(tmp_path, "0 * * * *") + "\n" + OTHERS
    assert f"replaced in your crontab: {old}\n" in result.stderr


def test_remove(invoke, job: Path, tmp_path: Path, fake_crontab: FakeCrontab) -> None:
    line = expected_line(tmp_path, "0 2 * * *")
    fake_crontab.table = OTHERS + line + "\n"
    job.unlink()  # a deleted job's line can still be removed
    result = invoke("cron", "jobs/iris.toml", "--remove")
    assert result.exit_code == 0, result.stderr
    assert fake_crontab.table == OTHERS
    assert result.stderr == f"removed from your crontab: {line}\n"

    again = invoke("cron", "jobs/iris.toml", "--remove")
    assert again.exit_code == 0
    assert again.stderr == (
        f"no line in your crontab runs {tmp_path}/jobs/iris.toml: nothing to remove\n"
    )
    assert fake_crontab.calls == ["-l", "-", "-l"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--schedule", "0 25 * * *"],
            "error: hour: 25 is out of range: use 0 to 23\n",
        ),
        (
            [],
            'error: --schedule is missing: say when to run, e.g. --schedule "0 2 * * *" '
            "for 02:00 every day\n",
        ),
        (
            ["--install", "--remove"],
            "error: --install and --remove do not go together: choose one\n",
        ),
    ],
)
def test_invalid_use_exits_2_and_leaves_the_table(
    invoke, job: Path, fake_crontab: FakeCrontab, args: list[str], message: str
) -> None:
    fake_crontab.table = OTHERS
    result = invoke("cron", str(job), "--install", *args)
    assert result.exit_code == 2
    assert result.stderr == message
    assert fake_crontab.table == OTHERS


def test_missing_env_file(invoke, job: Path, tmp_path: Path, fake_crontab) -> None:
    result = invoke("cron", str(job), "--schedule", "@daily", "--env-file", "typo.env",
                    "--install")  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: --env-file {tmp_path}/typo.env: no such file; create it with one NAME=value "
        f"a line, e.g. MODELARTS_TOKEN=..., readable by you only (chmod 600 {tmp_path}/typo.env)\n"
    )
    assert fake_crontab.calls == []


def test_invalid_job(invoke, tmp_path: Path, fake_crontab) -> None:
    result = invoke("cron", "missing.toml", "--schedule", "@daily")
    assert result.exit_code == 2
    assert result.stderr == "error: job file not found: missing.toml\n"


def test_warns_about_a_token_cron_will_not_have(invoke, tmp_path: Path, fake_crontab) -> None:
    job = write_job(
        tmp_path / "remote.toml",
        '[input]\npath = "in.csv"\n[service]\nurl = "https://gw.example.com/v1/infers/1"\n',
    )
    result = invoke("cron", str(job), "--schedule", "@daily")
    assert result.exit_code == 0
    assert result.stderr.startswith(
        "warning: the job reads its token from $MODELARTS_TOKEN, which cron does not set: put "
        "MODELARTS_TOKEN=... in a file only you can read, and give it with --env-file\n"
    )

    shared = tmp_path / "shared.env"
    shared.write_text("OTHER=1\n")
    shared.chmod(0o640)
    result = invoke("cron", str(job), "--schedule", "@daily", "--env-file", str(shared))
    assert result.exit_code == 0
    assert result.stderr.startswith(
        f"warning: {shared} can be read or changed by other users (mode 0640), and it holds "
        f"secrets: chmod 600 {shared}\n"
        f"warning: {shared} does not set MODELARTS_TOKEN, which the job reads its token from: "
        "add a line MODELARTS_TOKEN=...\n"
    )


def test_warns_about_the_iam_password_and_appcode_cron_will_not_have(
    invoke, tmp_path: Path, fake_crontab
) -> None:
    job = write_job(
        tmp_path / "iam.toml",
        '[input]\npath = "in.csv"\n[service]\nurl = "https://gw.example.com/v1/infers/1"\n'
        '[service.iam]\nurl = "https://iam.example.com/v3/auth/tokens"\nuser = "alice"\n'
        'domain = "acme"\nproject = "eu"\npassword_env = "IAM_PASSWORD"\n'
        '[service.app]\nappcode_env = "APP_CODE"\n',
    )
    result = invoke("cron", str(job), "--schedule", "@daily")
    assert result.exit_code == 0
    assert result.stderr.startswith(
        "warning: the job reads its IAM password from $IAM_PASSWORD, which cron does not set: "
        "put IAM_PASSWORD=... in a file only you can read, and give it with --env-file\n"
        "warning: the job reads its AppCode from $APP_CODE, which cron does not set: "
        "put APP_CODE=... in a file only you can read, and give it with --env-file\n"
    )
    assert "MODELARTS_TOKEN" not in result.stderr  # the token comes from IAM

    env = tmp_path / "nightly.env"
    env.write_text("IAM_PASSWORD=x\n")
    env.chmod(0o600)
    result = invoke("cron", str(job), "--schedule", "@daily", "--env-file", str(env))
    assert result.exit_code == 0
    assert result.stderr.startswith(
        f"warning: {env} does not set APP_CODE, which the job reads its AppCode from: "
        "add a line APP_CODE=...\n"
    )


def test_a_broken_crontab_command_exits_1(invoke, job: Path, fake_crontab: FakeCrontab) -> None:
    fake_crontab.break_it()
    result = invoke("cron", str(job), "--schedule", "@daily", "--install")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: `crontab -l` failed (exit 1): crontab: your UID isn't in the passwd file.; "
        "your crontab was not changed\n"
    )


def test_the_line_runs_the_job_from_a_bare_environment(
    invoke, job: Path, env_file: Path, tmp_path: Path, fake_crontab
) -> None:
    result = invoke("cron", str(job), "--schedule", "0 2 * * *", "--env-file", str(env_file))
    assert result.exit_code == 0, result.stderr
    command = result.stdout.strip().split(" ", 5)[5]  # what cron gives /bin/sh
    # cron's environment: no token, no venv, a short PATH, another folder
    bare = {"HOME": str(tmp_path), "LOGNAME": "nobody", "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh"}
    log = tmp_path / "logs" / "iris.log"
    log.write_text('{"message": "last night"}\n')
    subprocess.run(["/bin/sh", "-c", command], env=bare, cwd="/", timeout=120, check=True)

    # the env file was read (OUT_DIR), the job ran in its folder, the log was appended to
    output = tmp_path / "nightly" / "iris.parquet"
    assert pq.read_metadata(output).num_rows == 150
    lines = [orjson.loads(line) for line in log.read_text().splitlines()]
    assert lines[0] == {"message": "last night"}
    # the last line: the summary (stdout), after the log lines (stderr)
    assert lines[-1]["rows"]["ok"] == 150
    assert lines[-1]["output"] == "nightly/iris.parquet"
    assert "from-the-env-file" not in log.read_text()
