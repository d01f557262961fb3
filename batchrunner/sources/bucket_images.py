"""Image input in a bucket: an ``s3://`` or ``obs://`` prefix, object, glob or manifest.

The same rules as a local folder (see ``images``), on keys: a prefix is walked "folder" by
"folder" (common prefixes), depth first, names sorted, so keys come in the order a local
walk gives; only the listing of the levels being walked is held, never the whole tree.
Objects whose extension is not one of ``extensions`` and hidden names (``.x``) are skipped
and counted; an item's key is its key relative to the prefix (a glob's prefix is the part
before its first wildcard; a manifest's, the manifest's own). A manifest (``.txt``/``.lst``)
lists one entry per line: a key relative to the manifest's prefix, or a whole URI.

Each item carries its ``ObjectPath`` with the size and time the listing gave (the identity
an incremental run hashes); the object is read when its request is built.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Generator, Iterator
from pathlib import PurePosixPath

from batchrunner.errors import InputError
from batchrunner.objectfiles import ObjectFile
from batchrunner.sources.files import glob_match
from batchrunner.storage import ObjectPath, ObjectStore, StorageError, is_uri

__all__ = ["BucketInput", "bucket_items", "find_bucket_input", "read_bucket_manifest"]

FOLDER, FILE, GLOB, MANIFEST = "folder", "file", "glob", "manifest"
_GLOB_CHARS = frozenset("*?[")


class BucketInput:
    """What an image ``input.path`` in a bucket names: its mode, prefix and pattern."""

    def __init__(
        self, mode: str, root: ObjectPath, given: ObjectPath, pattern: tuple[str, ...] = ()
    ) -> None:
        self.mode = mode
        self.root = root
        self.given = given
        self.pattern = pattern


def find_bucket_input(text: str, store: ObjectStore, manifests: tuple[str, ...]) -> BucketInput:
    """Check what the URI names (one listing or HEAD); ``InputError`` if nothing."""
    given = store.locate(text)
    if _GLOB_CHARS & set(given.key):
        parts = given.key.split("/")
        magic = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
        root = given.child("/".join(parts[:magic]) + "/" if magic else "")
        store.check_readable(root)
        pattern = tuple(part for part in parts[magic:] if part)
        return BucketInput(GLOB, root, given, pattern)
    kind = store.kind(given)
    if kind == "file":
        mode = MANIFEST if given.suffix.lower() in manifests else FILE
        return BucketInput(mode, given.parent, given)
    if kind == "folder":
        root = given.child(given.key.rstrip("/") + "/" if given.key.strip("/") else "")
        return BucketInput(FOLDER, root, given)
    raise InputError(
        f"input.path: no such object or prefix: {text}; keys are case-sensitive: check it "
        f"against a listing of {given.parent}"
    )


def bucket_items(
    source: BucketInput,
    *,
    extensions: frozenset[str],
    recursive: bool,
    skip: Callable[[str, str], None],
) -> Generator[tuple[str, ObjectPath], None, None]:
    """(key, object) of every item, in input order; ``skip(reason, key)`` counts a skip."""
    store = source.root.store
    if source.mode == FILE:
        yield source.given.name, source.given
        return
    if source.mode == MANIFEST:
        yield from read_bucket_manifest(source.given)
        return
    for relative, path in _walk(store, source.root, recursive, source.pattern):
        if any(part.startswith(".") for part in relative.split("/")):
            skip("hidden", relative)
            continue
        if os.path.splitext(relative)[1].lower() not in extensions:
            skip("other_extension", relative)
            continue
        yield relative, path


def _walk(
    store: ObjectStore, root: ObjectPath, recursive: bool, pattern: tuple[str, ...]
) -> Iterator[tuple[str, ObjectPath]]:
    stack = [("", iter(store.listing(root)))]
    while stack:
        prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name, is_folder, path = entry
        relative = prefix + name
        if is_folder:
            if pattern and not glob_match(pattern, relative.split("/"), prefix=True):
                continue
            if not pattern and not recursive:
                continue
            stack.append((relative + "/", iter(store.listing(path))))
        elif not pattern or glob_match(pattern, relative.split("/")):
            yield relative, path


def read_bucket_manifest(
    manifest: ObjectPath, *, strict: bool = True
) -> Iterator[tuple[str, ObjectPath]]:
    """(key, object) per entry of a manifest object; entries are keys relative to the
    manifest's prefix, or whole ``s3://``/``obs://`` URIs (their key is the URI)."""
    store = manifest.store
    base = manifest.parent
    try:
        stream = ObjectFile(manifest)
    except OSError as exc:
        raise StorageError(f"input.path: cannot read the manifest: {exc}") from None
    with stream, io.BufferedReader(stream, 1 << 20) as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                entry = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                if not strict:
                    return
                raise InputError(
                    f"{manifest}, line {number}: not UTF-8 text; save the manifest as UTF-8"
                ) from None
            if not entry or entry.startswith("#"):
                continue
            if "\x00" in entry:
                if not strict:
                    return
                raise InputError(f"{manifest}, line {number}: a path cannot hold a NUL byte")
            if is_uri(entry):
                yield entry, store.locate(entry)
                continue
            key = PurePosixPath(entry).as_posix()
            yield key, base.child(base.key + key)
