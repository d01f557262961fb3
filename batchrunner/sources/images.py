"""Image input: the files of a folder, a glob or a manifest, one ``Batch`` per file.

This module owns everything between ``input.path`` and the ``Batch``es of an image job:

- what the path names: a folder (walked, into subfolders unless ``recursive = false``),
  one image file, a glob (``photos/**/*.jpg``), or a manifest: a ``.txt`` or ``.lst`` file
  listing one path per line, relative to the manifest's own folder;
- the order: a walk yields files sorted by relative path (see ``walk``, which walks a
  folder or a glob's folder, streaming). A manifest keeps its own order;
- which files are items: in a walk or glob, those whose extension (any case) is one of
  ``extensions``; hidden names, files that are not regular and links leading outside the
  input folder (unless ``follow_links``) are skipped (see ``walk``). Every skip is counted
  (``statistics()``) and logged once. A manifest, or a single file, is taken as it is: the
  user named those files;
- each item's key: its path relative to the input folder (a glob's folder is the part
  before its first wildcard; a manifest's is the manifest's own), with ``/`` separators.

Files are not opened here: a file is read when its request is built (``protocols``), so
memory does not grow with the number of files, and a file that is too large, unreadable or
gone by then becomes an error row of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from batchrunner.errors import InputError
from batchrunner.items import Batch
from batchrunner.sources.bucket_images import (
    MANIFEST as _BUCKET_MANIFEST,
)
from batchrunner.sources.bucket_images import (
    BucketInput,
    bucket_items,
    find_bucket_input,
    read_bucket_manifest,
)
from batchrunner.sources.files import glob_match, no_such_path
from batchrunner.sources.walk import FolderWalk, WalkStatistics, _key_text, _Tally
from batchrunner.storage import InputPath, ObjectStore, is_uri

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "ImageSource",
    "WalkStatistics",
    "glob_match",
    "looks_like_images",
    "open_images",
]

logger = logging.getLogger(__name__)

#: The default ``input.extensions``: what image classifiers commonly take.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: A file with one of these extensions, given as ``input.path``, lists the files to send.
MANIFEST_EXTENSIONS = (".txt", ".lst")

_GLOB_CHARS = frozenset("*?[")
_FOLDER, _FILE, _GLOB, _MANIFEST = "folder", "file", "glob", "manifest"


class ImageSource:
    """An image folder, glob, manifest or file, checked and ready to stream as ``Batch``es.

    Made by ``open_images``. Each ``iter_batches`` walks afresh, holding no folder open
    between batches, so a source can be iterated again (to count, or to resume).
    """

    format = "images"

    def __init__(
        self,
        *,
        mode: str,
        root: Path,
        given: Path,
        extensions: frozenset[str],
        recursive: bool,
        follow_links: bool,
        pattern: tuple[str, ...] = (),
        manifest_entries: int | None = None,
        bucket: BucketInput | None = None,
    ) -> None:
        self._bucket = bucket
        self._mode = mode
        self._root = root
        self._given = given
        self._extensions = extensions
        self._recursive = recursive
        self._follow_links = follow_links
        self._pattern = pattern
        self._manifest_entries = manifest_entries
        self._last = _Tally()
        self._logged = False

    def __repr__(self) -> str:
        if self._bucket is not None:
            bucket = self._bucket
            return f"ImageSource({bucket.mode}={str(bucket.given)!r}, root={str(bucket.root)!r})"
        return f"ImageSource({self._mode}={str(self._given)!r}, root={str(self._root)!r})"

    @property
    def root(self) -> InputPath:
        """The folder (or bucket prefix) keys are relative to."""
        return self._root if self._bucket is None else self._bucket.root

    @property
    def paths(self) -> Sequence[InputPath]:
        # The folder (a glob's folder, the manifest, the file), not every file in it:
        # statting a million files to fingerprint the job would cost a walk up front.
        if self._bucket is not None:
            bucket = self._bucket
            return [bucket.root if bucket.mode in (_FOLDER, _GLOB) else bucket.given]
        return [self._root if self._mode == _GLOB else self._given]

    @property
    def send_columns(self) -> Sequence[str]:
        return ()  # the file itself is sent, not fields of it

    def count_rows(self) -> int | None:
        """1 for a file, the entries of a manifest; None for a folder or glob (walk first)."""
        if self._mode == _FILE:
            return 1
        return self._manifest_entries

    def estimated_rows(self) -> int | None:
        """None: a listing's count is known (``count_rows``) or cheap to scan."""
        return None

    def scan_count(self) -> int:
        """The number of files, walking the whole folder if need be (nothing is read)."""
        known = self.count_rows()
        if known is not None:
            return known
        return sum(1 for _ in self._items())

    def statistics(self) -> WalkStatistics:
        """What the most recent (or current) walk has found and skipped so far."""
        return self._last.snapshot()

    def iter_batches(
        self, size: int, *, limit: int | None = None, start_seq: int = 0
    ) -> Iterator[Batch]:
        """Yield one ``Batch`` per file, in input order; ``size`` must be 1.

        ``limit`` keeps only the first ``limit`` files; files before ``start_seq`` are
        walked past, so that seqs are those of a full run.
        """
        if size != 1:
            raise ValueError(f"image input sends one file per request: size must be 1, got {size}")
        if start_seq < 0:
            raise ValueError(f"start_seq must be >= 0, got {start_seq}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return self._batches(limit, start_seq)

    def _batches(self, limit: int | None, start_seq: int) -> Generator[Batch, None, None]:
        if limit == 0:
            return
        items = self._items()
        try:
            for seq, (key, path) in enumerate(items):
                if seq >= start_seq:
                    yield Batch(seq=seq, keys=(key,), path=path)
                if limit is not None and seq + 1 >= limit:
                    return
        finally:
            items.close()

    # -- the items -------------------------------------------------------------------------

    def _items(self) -> Generator[tuple[str, InputPath], None, None]:
        """(key, path) of every item, in input order."""
        tally = _Tally()
        self._last = tally
        if self._bucket is not None:
            items = bucket_items(
                self._bucket,
                extensions=self._extensions,
                recursive=self._recursive,
                skip=tally.skip,
            )
            for key, path in items:
                tally.files += 1
                yield key, path
            self._log_skips(tally)
            return
        if self._mode == _FILE:
            tally.files = 1
            yield _key_text(self._given.name), self._given
            return
        if self._mode == _MANIFEST:
            for key, listed in _read_manifest(self._given):
                tally.files += 1
                yield key, listed
            return
        walk = FolderWalk(
            self._root,
            self._extensions,
            recursive=self._recursive,
            follow_links=self._follow_links,
            pattern=self._pattern if self._mode == _GLOB else None,
        )
        for key, local in walk.walk(tally):
            tally.files += 1
            yield key, local
        self._log_skips(tally)

    def _log_skips(self, tally: _Tally) -> None:
        # Only a whole walk is worth a word: a partial one (--limit) has not seen them all.
        skipped = tally.snapshot().skipped
        if skipped and not self._logged:
            self._logged = True
            noun = "file" if skipped == 1 else "files"
            logger.warning(
                "%s: %s %s skipped: %s", self._given, f"{skipped:,}", noun, tally.describe()
            )


# --- opening ----------------------------------------------------------------------------------


def open_images(
    path: str | Path,
    *,
    extensions: Iterable[str] | None = None,
    recursive: bool = True,
    follow_links: bool = False,
    store: ObjectStore | None = None,
) -> ImageSource:
    """Check what ``path`` names (folder, image file, glob or manifest) and describe it.

    ``extensions`` (default ``IMAGE_EXTENSIONS``; matched ignoring case) choose the files
    of a folder or glob; ``recursive`` walks subfolders of a folder; ``follow_links`` also
    follows links that lead outside the input folder. Nothing is walked yet, but a manifest
    is read through once, so that a bad one stops the run before any request. Raises
    ``InputError`` naming ``input.path`` when the path names nothing usable.
    """
    chosen = _extension_set(extensions)
    if is_uri(str(path)) and store is not None:
        bucket = find_bucket_input(str(path), store, MANIFEST_EXTENSIONS)
        listed = None
        if bucket.mode == _BUCKET_MANIFEST:
            listed = sum(1 for _ in read_bucket_manifest(bucket.given))
        return ImageSource(
            mode=bucket.mode,
            root=Path("."),
            given=Path("."),
            extensions=chosen,
            recursive=recursive,
            follow_links=follow_links,
            manifest_entries=listed,
            bucket=bucket,
        )
    given = Path(path)
    mode, root, entries = _FOLDER, given, None
    pattern: tuple[str, ...] = ()
    if given.is_dir():
        _check_listable(given)
    elif given.is_file():
        root = given.parent
        if given.suffix.lower() in MANIFEST_EXTENSIONS:
            mode, entries = _MANIFEST, sum(1 for _ in _read_manifest(given))
        else:
            mode = _FILE
    elif _GLOB_CHARS & set(str(path)):
        mode = _GLOB
        root, pattern = split_glob(str(path))
        if not root.is_dir():
            raise InputError(
                f"input.path: the glob {str(path)!r} starts in {str(root)!r}, which is not a folder"
            )
        _check_listable(root)
    else:
        raise InputError(no_such_path(given))
    return ImageSource(
        mode=mode,
        root=root,
        given=given,
        extensions=chosen,
        recursive=recursive,
        follow_links=follow_links,
        pattern=pattern,
        manifest_entries=entries,
    )


def looks_like_images(
    path: str | Path,
    extensions: Iterable[str] | None = None,
    *,
    table_suffixes: Iterable[str] = (),
    store: ObjectStore | None = None,
) -> bool:
    """Whether ``input.path`` names image input, when ``input.format`` does not say.

    Yes for an image file (by extension), a glob whose last part names an image extension
    (``*.jpg``), a manifest whose first entry is an image, and a folder in which the walk
    meets an image before a file with one of ``table_suffixes``. Anything else is left to
    the tabular reader, whose errors explain it.
    """
    chosen = _extension_set(extensions)
    if is_uri(str(path)) and store is not None:
        return _bucket_looks_like_images(str(path), store, chosen, table_suffixes)
    given = Path(path)
    if given.is_file():
        suffix = given.suffix.lower()
        if suffix in MANIFEST_EXTENSIONS:
            first = next(_read_manifest(given, strict=False), None)
            return first is not None and first[1].suffix.lower() in chosen
        return suffix in chosen
    if given.is_dir():
        # The walk of a run, stopped at the first file that is an image or a table.
        probe = FolderWalk(given, chosen | frozenset(s.lower() for s in table_suffixes))
        walk = probe.walk(_Tally())
        try:
            first_file = next(walk, None)
        finally:
            walk.close()
        return first_file is not None and first_file[1].suffix.lower() in chosen
    text = str(path)
    if _GLOB_CHARS & set(text):
        last = text.replace(os.sep, "/").rsplit("/", 1)[-1]
        return os.path.splitext(last)[1].lower() in chosen
    return False


def _bucket_looks_like_images(
    text: str, store: ObjectStore, chosen: frozenset[str], table_suffixes: Iterable[str]
) -> bool:
    last = text.rstrip("/").rsplit("/", 1)[-1]
    if _GLOB_CHARS & set(text):
        return os.path.splitext(last)[1].lower() in chosen
    bucket = find_bucket_input(text, store, MANIFEST_EXTENSIONS)
    if bucket.mode == _FILE:
        return bucket.given.suffix.lower() in chosen
    if bucket.mode == _MANIFEST:
        first = next(read_bucket_manifest(bucket.given, strict=False), None)
        return first is not None and first[1].suffix.lower() in chosen
    wanted = chosen | frozenset(s.lower() for s in table_suffixes)
    walk = bucket_items(bucket, extensions=wanted, recursive=True, skip=lambda _r, _k: None)
    try:
        first_file = next(walk, None)
    finally:
        walk.close()
    return first_file is not None and first_file[1].suffix.lower() in chosen


def _extension_set(extensions: Iterable[str] | None) -> frozenset[str]:
    return frozenset(e.lower() for e in (IMAGE_EXTENSIONS if extensions is None else extensions))


def _check_listable(folder: Path) -> None:
    try:
        with os.scandir(folder):
            pass
    except OSError as exc:
        raise InputError(f"input.path: cannot list the folder {folder}: {exc.strerror}") from None


# --- manifests --------------------------------------------------------------------------------


def _read_manifest(manifest: Path, *, strict: bool = True) -> Iterator[tuple[str, Path]]:
    """(key, path) per entry: one path per line, relative to the manifest's folder.

    Blank lines and lines starting with ``#`` are skipped; spaces around a path are not part
    of it. The key is the path as listed, normalized (``./a//b.png`` is ``a/b.png``). With
    ``strict``, a line that is not UTF-8 or holds a NUL is an ``InputError``; without, the
    reading just stops there.
    """
    base = manifest.parent
    try:
        with manifest.open("rb") as lines:
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
                yield PurePosixPath(entry).as_posix(), base / entry
    except OSError as exc:
        raise InputError(f"input.path: cannot read the manifest {manifest}: {exc}") from None


# --- globs ------------------------------------------------------------------------------------


def split_glob(text: str) -> tuple[Path, tuple[str, ...]]:
    """The folder before a glob's first wildcard, and the pattern's parts after it."""
    parts = text.replace(os.sep, "/").split("/")
    magic = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), None)
    if magic is None:
        raise ValueError(f"not a glob: {text!r}")
    fixed = parts[:magic]
    root = "/".join(fixed) if fixed != [""] else "/"
    return Path(root or "."), tuple(part for part in parts[magic:] if part)
