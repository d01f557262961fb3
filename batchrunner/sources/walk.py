"""The walk of an image folder (or a glob's folder): the files that are items, in order.

- the order: files sorted by relative path as ``pathlib`` sorts paths (part by part, so
  ``a/z.png`` comes before ``a.png``, as for tabular folders). It streams: each folder is
  listed (and its names sorted) when the walk reaches it, never the whole tree up front;
- which files are items: those whose extension (any case) is one of ``extensions`` (and,
  in a glob's walk, that the glob matches). Hidden names (``.DS_Store``, macOS's
  ``._photo.jpg``, ``.git/``), files that are not regular (pipes, devices, broken links)
  and symbolic links leading outside the input folder (unless ``follow_links``) are
  skipped. A link inside the folder is followed like what it points to; a linked folder
  that leads back into the walk is not walked twice. Every skip is counted
  (``WalkStatistics``);
- each item's key: its path relative to the folder, with ``/`` separators.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

from batchrunner.sources.files import glob_match

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WalkStatistics:
    """What the last walk found: the items, and the files it skipped, by reason."""

    files: int = 0
    other_extension: int = 0  # not one of input.extensions
    hidden: int = 0  # names starting with "."
    outside_links: int = 0  # links leading outside the input folder (follow_links = false)
    not_regular: int = 0  # pipes, sockets, devices, broken links
    loops: int = 0  # linked folders leading back into the walk
    unreadable_folders: int = 0

    @property
    def skipped(self) -> int:
        return (
            self.other_extension
            + self.hidden
            + self.outside_links
            + self.not_regular
            + self.loops
            + self.unreadable_folders
        )


_REASONS = {
    "other_extension": "with other extensions",
    "hidden": "hidden",
    "outside_links": "links leading outside the folder (set input.follow_links = true)",
    "not_regular": "not regular files",
    "loops": "linked folders leading back into the walk",
    "unreadable_folders": "folders that could not be listed",
}


@dataclass
class _Tally:
    """The counts of one walk as it goes, with the first example of each skip."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_REASONS, 0))
    examples: dict[str, str] = field(default_factory=dict)
    files: int = 0

    def skip(self, reason: str, key: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, key)

    def snapshot(self) -> WalkStatistics:
        return WalkStatistics(files=self.files, **self.counts)

    def describe(self) -> str:
        parts = [
            f"{count:,} {_REASONS[reason]} (e.g. {self.examples[reason]})"
            for reason, count in self.counts.items()
            if count
        ]
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One name of a listed folder that the walk will visit."""

    name: str
    is_folder: bool
    real: str  # the real path of a folder (links resolved), for the loop check


@dataclass(frozen=True, slots=True)
class FolderWalk:
    """How a folder is walked: from ``root``, the files with one of ``extensions``; into
    subfolders if ``recursive``; following links that lead outside ``root`` if
    ``follow_links``. With a ``pattern`` (a glob's parts after its folder), only what the
    glob matches, into the subfolders it can match, whatever ``recursive`` says."""

    root: Path
    extensions: frozenset[str]
    recursive: bool = True
    follow_links: bool = False
    pattern: tuple[str, ...] | None = None

    def walk(self, tally: _Tally) -> Generator[tuple[str, Path], None, None]:
        """Depth first, each folder's names sorted: files in order of their relative path."""
        root = str(self.root)
        root_real = os.path.realpath(root)
        # One frame per folder being walked: (its path, its key with a trailing "/", its
        # real path, the names still to visit). Only the folders on the current path are
        # held, each with its own listing.
        stack = [(root, "", root_real, iter(self._list(root, "", root_real, root_real, tally)))]
        on_path = {root_real}
        while stack:
            folder, prefix, real, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                on_path.discard(real)
                continue
            path = os.path.join(folder, entry.name)
            key = prefix + _key_text(entry.name)
            if not entry.is_folder:
                yield key, Path(path)
            elif entry.real in on_path:
                tally.skip("loops", key + "/")
            else:
                listing = self._list(path, key + "/", entry.real, root_real, tally)
                stack.append((path, key + "/", entry.real, iter(listing)))
                on_path.add(entry.real)

    def _list(
        self, folder: str, prefix: str, folder_real: str, root_real: str, tally: _Tally
    ) -> list[_Entry]:
        """The names of ``folder`` that the walk visits, sorted; skips are counted."""
        entries: list[_Entry] = []
        try:
            with os.scandir(folder) as scan:
                for item in scan:
                    entry = self._consider(item, prefix, folder_real, root_real, tally)
                    if entry is not None:
                        entries.append(entry)
        except OSError as exc:
            # A folder that cannot be listed (no permission, removed meanwhile): its files
            # are unknown, so they cannot be error rows; say so loudly and go on.
            tally.skip("unreadable_folders", prefix or ".")
            logger.warning("%s: cannot list this folder (%s); its files are skipped", folder, exc)
            return []
        entries.sort(key=lambda entry: entry.name)
        return entries

    def _consider(
        self, item: os.DirEntry[str], prefix: str, folder_real: str, root_real: str, tally: _Tally
    ) -> _Entry | None:
        name = item.name
        key = prefix + _key_text(name)
        if name.startswith("."):
            tally.skip("hidden", key)
            return None
        try:
            if item.is_symlink():
                real = os.path.realpath(item.path)
                if not self.follow_links and not _inside(real, root_real):
                    tally.skip("outside_links", key)
                    return None
                is_folder, is_file = item.is_dir(), item.is_file()
            else:
                real = os.path.join(folder_real, name)
                is_folder = item.is_dir(follow_symlinks=False)
                is_file = item.is_file(follow_symlinks=False)
        except OSError:
            tally.skip("not_regular", key)
            return None
        if is_folder:
            if self.pattern is None and not self.recursive:
                return None
            if self.pattern is not None and not glob_match(self.pattern, _parts(key), prefix=True):
                return None
            return _Entry(name, True, real)
        if not is_file:
            tally.skip("not_regular", key)
            return None
        if self.pattern is not None and not glob_match(self.pattern, _parts(key)):
            return None  # not asked for: not a skip
        if os.path.splitext(name)[1].lower() not in self.extensions:
            tally.skip("other_extension", key)
            return None
        return _Entry(name, False, real)


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _parts(key: str) -> list[str]:
    return key.split("/")


def _key_text(name: str) -> str:
    """A file name as key text: itself, or with bytes that are not UTF-8 shown as ``\\xNN``.

    Such names reach Python with lone surrogates, which no Arrow string can hold.
    """
    if name.isascii():
        return name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", errors="backslashreplace")
    return name
