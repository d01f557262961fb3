"""Schedules, cron lines and table edits: pure functions, tested without cron."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from batchrunner.errors import ScheduleError
from batchrunner.schedule import (
    CronJob,
    cron_line,
    install_line,
    marker,
    parse_schedule,
    remove_lines,
)


@pytest.mark.parametrize(
    ("given", "written"),
    [
        ("0 2 * * *", "0 2 * * *"),
        ("*/15 * * * *", "*/15 * * * *"),
        ("0 9-17/2 * * mon-fri", "0 9-17/2 * * 1-5"),  # names written as numbers
        ("30 4 1,15 JAN,jul SUN", "30 4 1,15 1,7 0"),
        ("  05\t00 * * 7 ", "5 0 * * 7"),  # 7 is Sunday too
        ("0 0 * dec-dec */2", "0 0 * 12-12 */2"),
        ("59 23 31 12 6", "59 23 31 12 6"),
        ("@daily", "0 0 * * *"),  # macros written as fields: not every cron has them
        ("@HOURLY", "0 * * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@annually", "0 0 1 1 *"),
    ],
)
def test_valid_schedules(given: str, written: str) -> None:
    assert str(parse_schedule(given)) == written


FIELDS_HELP = (
    'cron needs 5: minute hour day-of-month month day-of-week, e.g. "0 2 * * *" for 02:00 every day'
)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("0 2 * *", f"schedule '0 2 * *' has 4 fields; {FIELDS_HELP}"),
        ("0 0 2 * * *", f"schedule '0 0 2 * * *' has 6 fields; {FIELDS_HELP}"),
        ("", f"schedule '' has 0 fields; {FIELDS_HELP}"),
        ("daily", f"schedule 'daily' has 1 field; {FIELDS_HELP}"),
        ("60 2 * * *", "minute: 60 is out of range: use 0 to 59"),
        ("0 24 * * *", "hour: 24 is out of range: use 0 to 23"),
        ("0 2 0 * *", "day of month: 0 is out of range: use 1 to 31"),
        ("0 2 * 13 *", "month: 13 is out of range: use 1 to 12"),
        ("0 2 * * 8", "day of week: 8 is out of range: use 0 to 7"),
        ("0 2am * * *", "hour: '2am' is not a number from 0 to 23"),
        (
            "0 2 * * mo",
            "day of week: 'mo' is not a number from 0 to 7 or a name "
            "(sun, mon, tue, wed, thu, fri, sat)",
        ),
        ("mon 2 * * *", "minute: 'mon' is not a number from 0 to 59"),
        ("0 -2 * * *", "hour: '-2' (a part is empty) is not a number from 0 to 23"),
        (
            "0 1,,2 * * *",
            "hour: empty item in '1,,2'; separate values with single commas, e.g. 1,15",
        ),
        (
            "*/0 * * * *",
            "minute: the step in '*/0' must be a whole number of at least 1, e.g. */15",
        ),
        (
            "*/x * * * *",
            "minute: the step in '*/x' must be a whole number of at least 1, e.g. */15",
        ),
        (
            "5/10 * * * *",
            "minute: '5/10' needs '*' or a range before the step (not every cron reads it): "
            "write 5-59/10",
        ),
        (
            "0 22-2 * * *",
            "hour: the range '22-2' runs backwards, and cron does not wrap around: "
            "write it as two ranges, 22-23,0-2",
        ),
        (
            "0 2 * * fri-mon",
            "day of week: the range 'fri-mon' runs backwards, and cron does not wrap around: "
            "write it as two ranges, 5-6,0-1",
        ),
        (
            "@reboot",
            "'@reboot' runs a job when the machine starts, not on a schedule; "
            'give five fields, e.g. "0 2 * * *" for 02:00 every day',
        ),
        (
            "@nightly",
            "unknown schedule '@nightly': give five fields, e.g. \"0 2 * * *\" for 02:00 every "
            "day, or one of @hourly, @daily, @midnight, @weekly, @monthly, @yearly, @annually",
        ),
    ],
)
def test_invalid_schedules(given: str, message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(given)
    assert str(caught.value) == message
    assert caught.value.exit_code == 2


def job(**changes: object) -> CronJob:
    values: dict[str, object] = {
        "name": "iris",
        "job_file": Path("/srv/jobs/iris.toml"),
        "executable": Path("/opt/venv/bin/batchrunner"),
        "workdir": Path("/srv"),
        "log_file": Path("/srv/logs/iris.log"),
        "env_file": Path("/srv/.env"),
    }
    values.update(changes)
    return CronJob(**values)  # type: ignore[arg-type]


def test_cron_line() -> None:
    assert cron_line(parse_schedule("0 2 * * mon-fri"), job()) == (
        "0 2 * * 1-5 { cd /srv && set -a && . /srv/.env && set +a && "
        "exec /opt/venv/bin/batchrunner run /srv/jobs/iris.toml --log-format json --no-progress; "
        "} >>/srv/logs/iris.log 2>&1 # batchrunner:iris:/srv/jobs/iris.toml"
    )


def test_cron_line_without_env_file() -> None:
    line = cron_line(parse_schedule("@hourly"), job(env_file=None))
    assert line == (
        "0 * * * * { cd /srv && exec /opt/venv/bin/batchrunner run /srv/jobs/iris.toml "
        "--log-format json --no-progress; } >>/srv/logs/iris.log 2>&1 "
        "# batchrunner:iris:/srv/jobs/iris.toml"
    )


def test_cron_line_quotes_paths_and_escapes_percent() -> None:
    # cron cuts a command at an unescaped %; the shell splits at spaces
    line = cron_line(
        parse_schedule("0 2 * * *"),
        job(workdir=Path("/srv/my data"), job_file=Path("/srv/my data/50% off.toml")),
    )
    assert "cd '/srv/my data' && " in line
    assert " run '/srv/my data/50\\% off.toml' " in line
    assert line.endswith(" # batchrunner:iris:/srv/my data/50\\% off.toml")
    # what the shell gets once cron has turned \% back into %
    command = line.split(" ", 5)[5].replace("\\%", "%")
    words = shlex.split(command, comments=True)
    assert words[words.index("run") + 1] == "/srv/my data/50% off.toml"
    assert words[words.index("cd") + 1] == "/srv/my data"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"log_file": Path("logs/iris.log")},
            "the log file must be an absolute path in a crontab line, got logs/iris.log",
        ),
        (
            {"workdir": Path("/srv/a\nb")},
            "the working folder '/srv/a\\nb' contains a line break or a backslash, which a "
            "crontab line cannot hold: rename or move it",
        ),
        (
            {"workdir": Path("/" + "x" * 900)},
            "the cron line's command would be 1099 characters, and Vixie cron (Debian's) reads "
            "only 999: use shorter paths (the working folder, --log, --env-file)",
        ),
    ],
)
def test_lines_that_cron_cannot_hold(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        cron_line(parse_schedule("0 2 * * *"), job(**changes))
    assert str(caught.value) == message


# --- the table ------------------------------------------------------------------------------------

JOB_FILE = Path("/srv/jobs/iris.toml")
OTHERS = "MAILTO=ops@example.com\n# backups\n0 3 * * * /usr/local/bin/backup\n"


def line_at(schedule: str) -> str:
    return cron_line(parse_schedule(schedule), job())


def test_install_into_an_empty_table() -> None:
    edit = install_line("", line_at("0 2 * * *"), JOB_FILE)
    assert edit.table == line_at("0 2 * * *") + "\n"
    assert edit.changed
    assert edit.old_lines == ()


def test_install_keeps_other_lines_and_adds_a_missing_last_line_break() -> None:
    edit = install_line(OTHERS.rstrip("\n"), line_at("0 2 * * *"), JOB_FILE)
    assert edit.table == OTHERS + line_at("0 2 * * *") + "\n"


def test_installing_twice_changes_nothing() -> None:
    once = install_line(OTHERS, line_at("0 2 * * *"), JOB_FILE).table
    twice = install_line(once, line_at("0 2 * * *"), JOB_FILE)
    assert not twice.changed
    assert twice.table == once
    assert twice.old_lines == (line_at("0 2 * * *"),)


def test_a_new_schedule_replaces_the_line_where_it_was() -> None:
    table = line_at("0 2 * * *") + "\n" + OTHERS
    edit = install_line(table, line_at("30 1 * * *"), JOB_FILE)
    assert edit.table == line_at("30 1 * * *") + "\n" + OTHERS
    assert edit.old_lines == (line_at("0 2 * * *"),)


def test_install_leaves_one_line_of_duplicates_and_other_jobs_alone() -> None:
    other_job = cron_line(
        parse_schedule("0 4 * * *"),
        job(name="other", job_file=Path("/srv/jobs/other.toml")),
    )
    table = f"{line_at('0 1 * * *')}\n{other_job}\n{line_at('0 3 * * *')}\n"
    edit = install_line(table, line_at("0 2 * * *"), JOB_FILE)
    assert edit.table == f"{line_at('0 2 * * *')}\n{other_job}\n"


def test_the_job_file_is_the_identity_not_the_name() -> None:
    renamed = cron_line(parse_schedule("0 2 * * *"), job(name="iris-v2"))
    edit = install_line(line_at("0 2 * * *") + "\n", renamed, JOB_FILE)
    assert edit.table == renamed + "\n"


def test_a_similar_path_is_another_job() -> None:
    for similar in (Path("/srv/jobs/iris.toml.bak"), Path("/srv/jobs/iris")):
        edit = remove_lines(line_at("0 2 * * *") + "\n", similar)
        assert (edit.changed, edit.old_lines) == (False, ())


def test_remove_keeps_other_lines() -> None:
    table = OTHERS + line_at("0 2 * * *") + "\n"
    edit = remove_lines(table, JOB_FILE)
    assert edit.table == OTHERS
    assert edit.old_lines == (line_at("0 2 * * *"),)
    assert edit.changed


def test_remove_what_is_not_there() -> None:
    edit = remove_lines(OTHERS, JOB_FILE)
    assert not edit.changed
    assert edit.table == OTHERS


def test_an_old_vixie_header_is_not_copied_again() -> None:
    header = (
        "# DO NOT EDIT THIS FILE - edit the master and reinstall.\n"
        "# (/tmp/crontab.XXXX installed on Mon May  1 02:00:00 2024)\n"
        "# (Cron version -- $Id: crontab.c,v 2.13 1994/01/17 03:20:37 vixie Exp $)\n"
    )
    edit = install_line(header + OTHERS, line_at("0 2 * * *"), JOB_FILE)
    assert edit.table == OTHERS + line_at("0 2 * * *") + "\n"


def test_marker() -> None:
    assert marker("iris", Path("/a/b.toml")) == "# batchrunner:iris:/a/b.toml"
