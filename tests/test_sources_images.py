"""Image input: what a path names, the walk's order and skips, globs, manifests, keys."""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

import pytest

from batchrunner.errors import InputError
from batchrunner.job import IMAGES, TABULAR
from batchrunner.sources import input_kind, open_images
from batchrunner.sources.images import ImageSource, glob_match, split_glob


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def keys(source: ImageSource, **options: int) -> list[str]:
    return [batch.keys[0] for batch in source.iter_batches(1, **options)]


def test_walk_order_is_the_order_of_relative_paths(tmp_path: Path) -> None:
    # Names chosen so that sorting whole path strings ("a.png" < "a/z.png", since "." < "/")
    # and sorting path parts disagree; the walk follows the parts, as pathlib sorts paths.
    names = [
        "b.png", "a.png", "a/z.png", "a/b/c.png", "a-b.png", "a0/x.png", "B.png",
        "été.png", "z/y/x/w.png", "Z.png", "a/a.png", "aa.png",
    ]  # fmt: skip
    for name in names:
        touch(tmp_path / name)
    found = keys(open_images(tmp_path))
    assert found == [str(p) for p in sorted(PurePosixPath(n) for n in names)]
    assert found[:4] == ["B.png", "Z.png", "a/a.png", "a/b/c.png"]
    assert set(found) == set(names)


def test_each_batch_is_one_file_with_its_path(tmp_path: Path) -> None:
    touch(tmp_path / "in" / "sub" / "x.jpg")
    (batch,) = open_images(tmp_path / "in").iter_batches(1)
    assert (batch.seq, list(batch.keys), batch.path) == (
        0,
        ["sub/x.jpg"],
        tmp_path / "in/sub/x.jpg",
    )
    assert batch.rows is None


def test_batches_of_more_than_one_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one file per request: size must be 1, got 50"):
        open_images(tmp_path).iter_batches(50)


def test_limit_and_start_seq_keep_the_seqs_of_a_full_run(tmp_path: Path) -> None:
    for name in "abcde":
        touch(tmp_path / f"{name}.png")
    source = open_images(tmp_path)
    assert keys(source, limit=2) == ["a.png", "b.png"]
    assert keys(source, limit=0) == []
    assert [(b.seq, b.keys[0]) for b in source.iter_batches(1, start_seq=3)] == [
        (3, "d.png"),
        (4, "e.png"),
    ]


def test_extensions_choose_files_ignoring_case_and_skips_are_counted(tmp_path: Path) -> None:
    touch(tmp_path / "a.JPG")
    touch(tmp_path / "b.Png")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "raw.cr2")
    touch(tmp_path / ".DS_Store")
    touch(tmp_path / "._a.JPG")  # macOS metadata beside a photo: not an image
    touch(tmp_path / ".git" / "x.png")
    source = open_images(tmp_path)
    assert keys(source) == ["a.JPG", "b.Png"]
    stats = source.statistics()
    assert (stats.files, stats.other_extension, stats.hidden, stats.skipped) == (2, 2, 3, 5)
    assert keys(open_images(tmp_path, extensions=[".cr2"])) == ["raw.cr2"]


def test_skips_are_logged_once_per_source(tmp_path: Path) -> None:
    touch(tmp_path / "a.png")
    touch(tmp_path / "notes.txt")
    source = open_images(tmp_path)
    # A handler of our own: the CLI tests reconfigure the "batchrunner" logger.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("batchrunner.sources.images")
    logger.addHandler(handler)
    try:
        keys(source)
        keys(source)
        keys(source, limit=1)  # a partial walk says nothing
    finally:
        logger.removeHandler(handler)
    messages = [(r.levelname, r.getMessage()) for r in records]
    expected = f"{tmp_path}: 1 file skipped: 1 with other extensions (e.g. notes.txt)"
    assert messages == [("WARNING", expected)]


def test_recursive_false_stays_in_the_folder(tmp_path: Path) -> None:
    touch(tmp_path / "a.png")
    touch(tmp_path / "sub" / "b.png")
    assert keys(open_images(tmp_path, recursive=False)) == ["a.png"]


def test_links_outside_the_folder_are_skipped_unless_followed(tmp_path: Path) -> None:
    outside = touch(tmp_path / "outside" / "secret.png")
    (tmp_path / "outside" / "more").mkdir()
    touch(tmp_path / "outside" / "more" / "m.png")
    folder = tmp_path / "in"
    touch(folder / "a.png")
    (folder / "link.png").symlink_to(outside)
    (folder / "linked-folder").symlink_to(tmp_path / "outside" / "more")
    source = open_images(folder)
    assert keys(source) == ["a.png"]
    assert source.statistics().outside_links == 2
    followed = keys(open_images(folder, follow_links=True))
    assert followed == ["a.png", "link.png", "linked-folder/m.png"]


def test_links_inside_the_folder_are_followed_and_loops_cut(tmp_path: Path) -> None:
    touch(tmp_path / "photos" / "a.png")
    (tmp_path / "same.png").symlink_to(tmp_path / "photos" / "a.png")
    (tmp_path / "photos" / "back").symlink_to(tmp_path)  # a loop
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    source = open_images(tmp_path)
    assert keys(source) == ["photos/a.png", "same.png"]
    stats = source.statistics()
    assert (stats.loops, stats.not_regular) == (1, 1)


def test_pipes_are_not_files(tmp_path: Path) -> None:
    touch(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    source = open_images(tmp_path)
    assert keys(source) == ["a.png"]
    assert source.statistics().not_regular == 1


def test_file_names_that_are_not_utf8_get_readable_keys(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: a lone surrogate in Python
    touch(tmp_path / name)
    (batch,) = open_images(tmp_path).iter_batches(1)
    assert batch.keys[0] == "caf\\xe9.png"
    assert batch.path == tmp_path / name  # the real name, to open it


def test_one_image_file(tmp_path: Path) -> None:
    photo = touch(tmp_path / "photo.JPEG")
    source = open_images(photo)
    assert keys(source) == ["photo.JPEG"]
    assert source.count_rows() == 1
    assert source.paths == [photo]


def test_counts_walk_only_when_asked(tmp_path: Path) -> None:
    for name in ("a.png", "b/c.png", "d.txt"):
        touch(tmp_path / name)
    source = open_images(tmp_path)
    assert source.count_rows() is None
    assert source.scan_count() == 2
    assert source.paths == [tmp_path]
    assert source.send_columns == ()


def test_empty_folder(tmp_path: Path) -> None:
    assert keys(open_images(tmp_path)) == []


def test_missing_path_suggests_a_close_name(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(
        InputError, match=r"no such file or folder: .*fotos \(did you mean .*photos"
    ):
        open_images(tmp_path / "fotos")


def test_missing_path_differing_in_case_suggests_the_name(tmp_path: Path) -> None:
    # The same suggestion as a table's input (errors.did_you_mean): case counts as close.
    (tmp_path / "photos").mkdir()
    if (tmp_path / "PHOTOS").exists():
        pytest.skip("a case-insensitive file system")
    with pytest.raises(InputError, match=r"PHOTOS \(did you mean '.*photos'\?\)"):
        open_images(tmp_path / "PHOTOS")


# --- globs -------------------------------------------------------------------------------------


def test_glob_keys_are_relative_to_the_folder_before_the_first_wildcard(tmp_path: Path) -> None:
    for name in ("a.png", "x/b.png", "x/y/c.png", "x/y/d.jpg", "z/e.png"):
        touch(tmp_path / "in" / name)
    pattern = f"{tmp_path}/in/**/*.png"
    source = open_images(pattern)
    assert keys(source) == ["a.png", "x/b.png", "x/y/c.png", "z/e.png"]
    assert source.root == tmp_path / "in"
    assert source.paths == [tmp_path / "in"]
    assert keys(open_images(f"{tmp_path}/in/x/*")) == ["b.png"]  # folders are not files
    assert keys(open_images(f"{tmp_path}/in/?/*.png")) == ["x/b.png", "z/e.png"]


def test_glob_whose_folder_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"starts in '.*nope', which is not a folder"):
        open_images(f"{tmp_path}/nope/*.png")


@pytest.mark.parametrize(
    ("pattern", "path", "folder", "expected"),
    [
        ("*.png", "a.png", False, True),
        ("*.png", "a/b.png", False, False),
        ("**/*.png", "a.png", False, True),
        ("**/*.png", "a/b/c.png", False, True),
        ("a/**", "a/b/c.png", False, True),
        ("x/*/y.png", "x/q/y.png", False, True),
        ("x/*/y.png", "x/q/r/y.png", False, False),
        ("x/*/y.png", "x/q", True, True),  # a folder the walk must enter
        ("x/*/y.png", "w", True, False),  # one it can skip
        ("x/*/y.png", "x/q/r", True, False),
        ("**/*.png", "deep/er", True, True),
        ("[ab].png", "b.png", False, True),
        ("*.png", "A.PNG", False, False),  # the pattern is case-sensitive; extensions are not
    ],
)
def test_glob_match(pattern: str, path: str, folder: bool, expected: bool) -> None:
    assert glob_match(tuple(pattern.split("/")), path.split("/"), prefix=folder) is expected


def test_split_glob() -> None:
    assert split_glob("photos/2024/**/*.jpg") == (Path("photos/2024"), ("**", "*.jpg"))
    assert split_glob("*.jpg") == (Path("."), ("*.jpg",))
    assert split_glob("/*.jpg") == (Path("/"), ("*.jpg",))


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_lists_paths_relative_to_itself_in_its_own_order(tmp_path: Path) -> None:
    touch(tmp_path / "lists" / "b.png")
    touch(tmp_path / "lists" / "sub" / "a.png")
    absolute = touch(tmp_path / "elsewhere" / "c.bin")
    manifest = tmp_path / "lists" / "todo.lst"
    manifest.write_text(
        f"# photos to score\nb.png\n\n  ./sub//a.png  \n{absolute}\nmissing.png\n",
        encoding="utf-8",
    )
    source = open_images(manifest)
    batches = list(source.iter_batches(1))
    assert [b.keys[0] for b in batches] == ["b.png", "sub/a.png", str(absolute), "missing.png"]
    assert batches[1].path == tmp_path / "lists" / "./sub//a.png"
    assert source.count_rows() == 4  # read once when opened
    assert source.paths == [manifest]


def test_manifest_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.txt"
    manifest.write_bytes(b"a.png\nb\xff.png\n")
    with pytest.raises(InputError, match=r"m\.txt, line 2: not UTF-8 text; save the manifest"):
        open_images(manifest)


# --- which kind of input -------------------------------------------------------------------------


def test_input_kind(tmp_path: Path) -> None:
    touch(tmp_path / "photos" / "a" / "x.jpg")
    touch(tmp_path / "photos" / "notes.md")
    touch(tmp_path / "tables" / "a.csv")
    touch(tmp_path / "tables" / "b.png")
    touch(tmp_path / "zipped" / "a.csv.gz")
    (tmp_path / "empty").mkdir()
    (tmp_path / "images.lst").write_text("# x\nphotos/a/x.jpg\n")
    (tmp_path / "rows.txt").write_text("id,x\n1,2\n")
    touch(tmp_path / "one.webp")
    cases = {
        "photos": IMAGES,
        "tables": TABULAR,  # a.csv comes first
        "zipped": TABULAR,
        "empty": TABULAR,  # nothing says images: the tabular reader explains
        "images.lst": IMAGES,
        "rows.txt": TABULAR,
        "one.webp": IMAGES,
        "photos/**/*.JPG": IMAGES,
        "tables/*.csv": TABULAR,
        "nope": TABULAR,
    }
    found = {name: input_kind(str(tmp_path / name), None) for name in cases}
    assert found == cases
    assert input_kind(str(tmp_path / "empty"), "images") == IMAGES
    assert input_kind(str(tmp_path / "photos"), "csv") == TABULAR
    assert input_kind(str(tmp_path / "photos"), None, extensions=[".heic"]) == TABULAR
