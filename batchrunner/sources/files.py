"""Finding the input's files: ``input.path`` as a file, a folder or a glob, and their format.

Any kind of source resolves ``input.path`` with ``find_files``: a file is taken as it is; a
folder is searched recursively and a glob expanded, both sorted, skipping hidden names
(``.git``, Spark's ``_SUCCESS`` and ``_temporary/``) and keeping the files a source accepts.
A missing path is an ``InputError`` that suggests a close name.

The rest is tabular: the extensions that name a format (``FORMATS``), text files compressed
on top (``data.csv.gz``, ``COMPRESSIONS``), and ``input.format``, which overrides them.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from batchrunner.errors import InputError, closest_name
from batchrunner.storage import InputPath, ObjectPath, ObjectStore, StorageError, is_uri

__all__ = [
    "COMPRESSIONS",
    "FORMATS",
    "FORMAT_NAMES",
    "common_format",
    "data_suffix",
    "find_files",
    "format_of",
    "format_setting",
    "glob_match",
    "is_hidden",
    "no_such_path",
]

FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "csv",  # tab-delimited
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
# Text files may be compressed (data.csv.gz): Arrow decompresses them while streaming.
COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")
FORMAT_NAMES = ("csv", "parquet", "jsonl")

_GLOB_CHARS = frozenset("*?[")


# -- any source: files from input.path ---------------------------------------------------


def find_files(
    path: str | InputPath,
    *,
    accept: Callable[[InputPath], bool] | None,
    known: Iterable[str],
    store: ObjectStore | None = None,
) -> list[InputPath]:
    """The files ``input.path`` names, sorted.

    A file is returned as it is, whatever its name. A folder (searched recursively, sorted by
    relative path) or a glob gives the files ``accept`` takes (every one when ``accept`` is
    None), skipping hidden names below the folder or the glob's first wildcard. ``known``
    are the extensions ``accept`` takes, for the message when it takes none. A bucket
    location (``s3://``, ``obs://``) is found the same way through ``store``: an object, a
    prefix (a "folder") or a glob over keys.
    """
    text = str(path)
    found: list[InputPath]
    if isinstance(path, ObjectPath) or is_uri(text):
        found, where = _find_objects(text, store)
        if len(found) == 1 and where == "":
            return found
    else:
        found, where = _find_local(path, text)
        if len(found) == 1 and where == "":
            return found
    files = found if accept is None else [f for f in found if accept(f)]
    if not files:
        message = f"input.path: no input file {where} (known extensions: {', '.join(known)})"
        if found:
            message += (
                f"; {len(found)} file(s) with other extensions, e.g. {found[0].name}: "
                f"set input.format to read them"
            )
        raise InputError(message)
    return files


def _find_objects(text: str, store: ObjectStore | None) -> tuple[list[InputPath], str]:
    """The objects a URI names: ([object], "") for one object, else the sorted matches."""
    if store is None:
        raise StorageError(f"input.path: {text} is in a bucket, but no object store is set up")
    given = store.locate(text)
    found: list[InputPath]
    if _GLOB_CHARS & set(given.key):
        parts = given.key.split("/")
        literal = list(itertools.takewhile(lambda part: not _GLOB_CHARS & set(part), parts))
        root = given.child("/".join(literal) + "/" if literal else "")
        pattern = tuple(part for part in parts[len(literal) :] if part)
        found = [
            path
            for relative, path in store.walk(root)
            if glob_match(pattern, relative.split("/")) and not is_hidden(Path(relative))
        ]
        return found, f"matches {text}"
    kind = store.kind(given)
    if kind == "file":
        return [given], ""
    if kind == "folder":
        prefix = given.child(given.key.rstrip("/") + "/" if given.key else "")
        found = [path for relative, path in store.walk(prefix) if not is_hidden(Path(relative))]
        return found, f"under {text}"
    raise InputError(
        f"input.path: no such object or prefix: {text}; check the key (keys are case-"
        f"sensitive) with a listing of s3://{given.bucket}/{given.parent.key}"
    )


def _find_local(path: str | Path, text: str) -> tuple[list[InputPath], str]:
    given = Path(path)
    local: list[Path]
    if given.is_file():
        return [given], ""
    if given.is_dir():
        local = sorted(
            (f for f in given.rglob("*") if f.is_file() and not is_hidden(f.relative_to(given))),
            key=lambda f: f.relative_to(given).parts,
        )
        where = f"in folder {text}"
    elif _GLOB_CHARS & set(text):
        # What the pattern spells out is taken as given; what its wildcards match is not
        # hidden (else `out/**/*.parquet` reads Spark's half-written `out/_temporary/`).
        literal = Path(*itertools.takewhile(lambda part: not _GLOB_CHARS & set(part), given.parts))
        local = sorted(
            p
            for p in map(Path, glob.glob(text, recursive=True))
            if p.is_file() and not is_hidden(p.relative_to(literal))
        )
        where = f"matches {text}"
    else:
        raise InputError(no_such_path(given))
    return list(local), where


def glob_match(pattern: Sequence[str], parts: Sequence[str], *, prefix: bool = False) -> bool:
    """Whether a relative path (its ``parts``) matches a glob's ``pattern`` parts.

    ``*``, ``?`` and ``[...]`` match within one part, ``**`` matches any number of parts
    (none included), as ``glob.glob(..., recursive=True)`` does. With ``prefix``, ``parts``
    is a folder: whether a file under it could match (so the walk prunes folders that
    cannot).
    """
    if not parts:
        return bool(pattern) if prefix else all(p == "**" for p in pattern)
    if not pattern:
        return False
    head = pattern[0]
    if head == "**":
        return glob_match(pattern[1:], parts, prefix=prefix) or glob_match(
            pattern, parts[1:], prefix=prefix
        )
    return fnmatch.fnmatchcase(parts[0], head) and glob_match(pattern[1:], parts[1:], prefix=prefix)


def is_hidden(relative: Path) -> bool:
    """Spark's _SUCCESS and _temporary/, editors' and VCS' dot files: not input."""
    return any(part.startswith((".", "_")) for part in relative.parts)


def no_such_path(path: Path) -> str:
    """The message for an ``input.path`` that names nothing, with a close name if any."""
    if path.is_symlink():  # a dangling link: say where it leads, not "did you mean" itself
        return f"input.path: {path} is a link to {os.readlink(path)}, which does not exist"
    message = f"input.path: no such file or folder: {path}"
    parent = path.parent
    if parent.is_dir():
        close = closest_name(path.name, [entry.name for entry in parent.iterdir()])
        if close is not None:
            message += f" (did you mean {str(parent / close)!r}?)"
    else:
        message += f" (the folder {parent} does not exist either)"
    return message


# -- tabular formats --------------------------------------------------------------------


def format_setting(format: str | None) -> tuple[str | None, bool]:
    """The format ``input.format`` names, and whether it means tab-separated."""
    if format is None:
        return None, False
    name = format.strip().lower().lstrip(".")
    if name in FORMAT_NAMES:
        return name, False
    if "." + name in FORMATS:
        return FORMATS["." + name], name == "tsv"
    raise InputError(
        f"input.format: unknown format {format!r}; use one of "
        + ", ".join(repr(n) for n in FORMAT_NAMES)
    )


def data_suffix(path: InputPath) -> str:
    """The extension that names the format: ``.csv`` for ``data.csv.gz``."""
    name = path.name.lower()
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            return Path(name[: -len(compression)]).suffix
    return Path(name).suffix


def format_of(path: InputPath) -> str | None:
    """The format the file's extension names, or None (unknown, or compressed Parquet)."""
    fmt = FORMATS.get(data_suffix(path))
    if fmt == "parquet" and path.name.lower().endswith(COMPRESSIONS):
        return None  # Parquet compresses inside the file
    return fmt


def common_format(paths: list[InputPath], given: str | InputPath) -> str:
    """The one format the files' extensions name; an InputError for unknown or mixed ones."""
    formats: dict[str, InputPath] = {}
    for path in paths:
        fmt = format_of(path)
        if fmt is None:
            raise InputError(
                f"input.path: cannot tell the format of {path} from its extension "
                f"{data_suffix(path) or '(none)'!r}; known extensions: {', '.join(FORMATS)} "
                f"(CSV and JSON lines may end in {', '.join(COMPRESSIONS)}), or set "
                f"input.format to one of {', '.join(repr(n) for n in FORMAT_NAMES)}"
            )
        formats.setdefault(fmt, path)
    if len(formats) > 1:
        examples = ", ".join(f"{fmt}: {path}" for fmt, path in formats.items())
        raise InputError(
            f"input.path: {given} holds files of several formats ({examples}); point it "
            f"at one kind, e.g. with a glob like '*.csv'"
        )
    return next(iter(formats))
