"""The system side of ``batchrunner cron``: the user's crontab, the installed command, the env file.

The table is read and written through the real ``crontab`` command (``crontab -l``,
``crontab -``), never by editing cron's spool files: the command checks the table and tells
the cron daemon, whichever cron the system has. What goes in the table is decided by the
pure functions of ``schedule``.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path

from batchrunner.errors import CrontabError, ScheduleError

COMMAND_NAME = "batchrunner"
TIMEOUT_S = 30.0
_UNCHANGED = "your crontab was not changed"


def read_crontab(crontab: str = "crontab") -> str:
    """The user's crontab table ("" when they have none)."""
    done = _run_crontab([crontab, "-l"], None)
    if done.returncode == 0:
        return done.stdout
    # Vixie cron and cronie say "no crontab for <user>" (exit 1): an empty table. Any other
    # failure stops here, before a write could replace a table we failed to read.
    if "no crontab for" in done.stderr.lower():
        return ""
    raise CrontabError(
        f"`{crontab} -l` failed (exit {done.returncode}): {_first_line(done.stderr)}; {_UNCHANGED}"
    )


def write_crontab(table: str, crontab: str = "crontab") -> None:
    """Replace the user's crontab table with ``table``."""
    done = _run_crontab([crontab, "-"], table)
    if done.returncode != 0:
        raise CrontabError(
            f"`{crontab} -` refused the new table (exit {done.returncode}): "
            f"{_first_line(done.stderr)}; {_UNCHANGED}"
        )


def _run_crontab(arguments: list[str], table: str | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            arguments,
            input=table,
            capture_output=True,
            # Paths in the table are bytes to cron: keep whatever is there, undamaged.
            encoding="utf-8",
            errors="surrogateescape",
            timeout=TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise CrontabError(
            f"the {arguments[0]} command was not found: install cron (e.g. apt-get install "
            "cron), or put the line printed without --install into your scheduler yourself"
        ) from None
    except subprocess.TimeoutExpired:
        raise CrontabError(
            f"`{' '.join(arguments)}` did not finish in {TIMEOUT_S:.0f} s; {_UNCHANGED}"
        ) from None
    except OSError as exc:
        raise CrontabError(f"cannot run {arguments[0]}: {exc.strerror}; {_UNCHANGED}") from None


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "(no message)"


def locate_executable(
    *,
    executable: str | None = None,
    argv0: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> Path:
    """The absolute path of the installed ``batchrunner`` command, for a cron line.

    Cron's PATH is ``/usr/bin:/bin``, so the line names the command in full. First choice:
    the console script beside the running interpreter (a venv's or pipx's ``bin``), which
    runs this very installation; then the user scripts folder (``pip install --user``); then
    the command this process was started as; last, the one found on PATH.
    """
    interpreter = Path(executable if executable is not None else sys.executable)
    started_as = Path(argv0 if argv0 is not None else sys.argv[0])
    candidates = [
        # not resolved: a venv's python is a symlink to the system one
        interpreter.parent / COMMAND_NAME,
        Path(sysconfig.get_path("scripts", sysconfig.get_preferred_scheme("user"))) / COMMAND_NAME,
    ]
    if started_as.name == COMMAND_NAME:
        candidates.append(started_as)
    found = which(COMMAND_NAME)
    if found is not None:
        candidates.append(Path(found))
    for candidate in candidates:
        if _is_executable_file(candidate):
            return candidate.absolute()
    raise CrontabError(
        f"cannot find the installed {COMMAND_NAME} command (looked in {interpreter.parent}, "
        f"the user scripts folder and PATH): install the package with pip so that the "
        f"{COMMAND_NAME} command exists"
    )


def _is_executable_file(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) and bool(mode & 0o111)


def check_env_file(path: Path, secret_envs: Mapping[str, str] | str | None) -> list[str]:
    """Check the file a cron line sources its secrets from; return warnings for people.

    ``secret_envs`` maps each environment variable the job reads a secret from to what it
    holds ("its token", "its IAM password", ...); a plain name is the token's variable.
    Raises ``ScheduleError`` when the file is missing or unreadable (the nightly run would
    fail). Warns when other users can read it (it holds secrets) or change it (the line runs
    it as a shell script), and when it does not set one of ``secret_envs``.
    """
    if isinstance(secret_envs, str):
        secret_envs = {secret_envs: "its token"}
    secret_envs = secret_envs or {}
    example = next(iter(secret_envs), "MODELARTS_TOKEN")
    lines = f"one NAME=value a line, e.g. {example}=..."
    try:
        status = path.stat()
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    except FileNotFoundError:
        raise ScheduleError(
            f"--env-file {path}: no such file; create it with {lines}, "
            f"readable by you only (chmod 600 {path})"
        ) from None
    except OSError as exc:
        raise ScheduleError(f"--env-file {path}: cannot read it: {exc.strerror}") from None
    if text is None:
        raise ScheduleError(f"--env-file {path}: not a file; give a file of {lines}")
    warnings = []
    if status.st_mode & 0o077:
        warnings.append(
            f"{path} can be read or changed by other users (mode "
            f"{stat.S_IMODE(status.st_mode):04o}), and it holds secrets: chmod 600 {path}"
        )
    for name, what in secret_envs.items():
        if not re.search(rf"^\s*(export\s+)?{re.escape(name)}=", text, flags=re.MULTILINE):
            warnings.append(
                f"{path} does not set {name}, which the job reads {what} from: "
                f"add a line {name}=..."
            )
    return warnings


def make_log_folder(log_file: Path) -> None:
    """Create the folder a cron line appends its log to: cron's shell would not."""
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScheduleError(
            f"--log {log_file}: cannot create its folder: {exc.strerror}; give another --log"
        ) from None
