"""Local writes: files written aside and renamed into place, leftovers of killed runs, and
whether an output can be written at all.

Every file batchrunner writes locally is opened by ``open_write`` (unbuffered; tests put a
full disk in its place) and written aside (``aside_name``: ``.<name>.tmp-<pid>``), then
renamed; ``remove_leftovers`` clears what a killed process left aside. A failed write
becomes a ``WriteError`` (exit 74) whose message says what to do.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from batchrunner.errors import SettingError, WriteError

__all__ = [
    "ASIDE_MARK",
    "aside_name",
    "check_writable",
    "copy_descriptor",
    "folder_id",
    "fsync",
    "open_write",
    "reason",
    "remove_leftovers",
    "write_json_atomically",
]


def folder_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def copy_descriptor(descriptor: int, target: Path) -> None:
    with os.fdopen(os.dup(descriptor), "rb") as source, target.open("wb") as copy:
        source.seek(0)
        shutil.copyfileobj(source, copy)
        copy.flush()
        os.fsync(copy.fileno())


def reason(exc: OSError) -> str:
    """An OSError in words: ``No space left on device``, without Python's decorations."""
    if exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def open_write(path: Path) -> pa.NativeFile:
    """A file opened for writing, unbuffered: every file the journal and the assembly write
    is opened here (tests put a full disk in its place)."""
    return pa.OSFile(str(path), "wb")


def write_json_atomically(path: Path, document: Mapping[str, Any]) -> None:
    """Write a JSON document aside and rename it into place."""
    temporary = aside_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
        os.replace(temporary, path)
    except OSError as exc:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {reason(exc)}") from exc


def check_writable(output: Path, *, folder: bool = False) -> None:
    """Raise ``SettingError`` (naming ``output.path``) if ``output`` cannot be written: it is
    a folder (unless the output is one: ``folder``), or the folder it goes in (or the nearest
    one that exists) is not a folder, is read-only or is not writable by this user. Writes
    nothing."""
    if output.is_dir() and not folder:
        raise SettingError(
            f"output.path: {output} is a folder; give the path of a file ending in .parquet "
            f"inside it, e.g. {output / 'results.parquet'}"
        )
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SettingError(f"output.path: {parent} is not a folder, so {output} cannot be written")
    read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    if read_only or not os.access(parent, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        raise SettingError(
            f"output.path: the folder {parent} {why}, so {output} cannot be written there; "
            "choose another output.path (--output) or make the folder writable"
        )


def aside_name(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.<name>.tmp-<pid>``."""
    return path.with_name(f".{path.name}{ASIDE_MARK}{os.getpid()}")


ASIDE_MARK = ".tmp-"


def remove_leftovers(folder: Path, name_glob: str) -> list[Path]:
    """Remove the files killed runs left while writing aside (see ``aside_name``) in
    ``folder``, for the file names matching ``name_glob``; return those removed.

    Only the files of a process that is gone (or of this one, which is not writing them) are
    removed: a live process's may be in the middle of a write. Call it holding the job's lock.
    """
    removed = []
    for path in folder.glob(f".{name_glob}{ASIDE_MARK}*"):
        pid_text = path.name.rpartition(ASIDE_MARK)[2]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid != os.getpid() and _is_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
