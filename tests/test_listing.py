"""A bucket prefix listed page by page, in a local folder's order: the pure re-ordering,
and the listing of a real S3 server (moto) against the same tree on local disk."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchrunner.listing import Entry, local_order
from batchrunner.storage import ObjectStore
from tests.conftest import REPO
from tests.s3 import ACCESS_KEY, S3, SECRET_KEY


def store_order(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda entry: entry.store_key)


def test_folders_come_where_a_local_folder_puts_them() -> None:
    names = ["a.png", "a-1.png", "a", "a b.png", "b.png", "ab.png", "a.b", "a.b.png"]
    folders = {"a", "a.b"}
    entries = [Entry(name, name in folders) for name in names]
    asked: list[str] = []

    def has_folder(name: str) -> bool:
        asked.append(name)
        return name in folders

    ordered = list(local_order(store_order(entries), has_folder))
    assert [entry.name for entry in ordered] == sorted(names)
    assert asked == []  # the listing moved past each folder's place by itself


@pytest.mark.parametrize("seed", range(20))
def test_the_order_is_a_local_sort_whatever_the_names_and_the_hold(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab.-_ 0"
    names = {"".join(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(300)}
    entries = [Entry(name, rng.random() < 0.3) for name in names]
    folders = {entry.name for entry in entries if entry.folder}
    hold = rng.choice([1, 3, 10, 1000])

    def stream() -> list[Entry]:
        return store_order(entries)

    def has_folder(name: str) -> bool:
        return name in folders

    ordered = list(local_order(stream(), has_folder, hold=hold))
    assert [entry.name for entry in ordered] == sorted(names)


def test_a_long_run_of_names_beside_no_folder_is_not_all_held() -> None:
    # photo-00000.png ... sort before "photo/" in the store: a folder "photo" would come
    # first locally, so they wait; past ``hold`` of them, the folder is asked for once.
    names = [f"photo-{i:05d}.png" for i in range(5000)]
    asked: list[str] = []
    read = 0

    def stream():  # type: ignore[no-untyped-def]
        nonlocal read
        for name in names:
            read += 1
            yield Entry(name, False)

    ordered = local_order(stream(), lambda name: asked.append(name) is not None, hold=100)
    first = next(ordered)
    assert first.name == "photo-00000.png"
    assert read <= 102  # not the whole level
    assert [first.name] + [entry.name for entry in ordered] == names
    assert asked == ["photo"]


# -- a real S3 server --------------------------------------------------------------------

TREE = [
    "a.png", "a-1.png", "a/x.png", "a/b/y.png", "a b.png", "b.png", "ab/z.png",
    "a.b/w.png", "a.b.png", "zz.png", "z/deep/er/q.png",
]  # fmt: skip


def make_store(s3: S3) -> ObjectStore:
    return ObjectStore(
        endpoint=s3.endpoint, region="us-east-1", access_key=ACCESS_KEY, secret_key=SECRET_KEY
    )


@pytest.mark.parametrize("paged", [True, False])
def test_a_prefix_is_walked_as_a_local_folder(s3: S3, tmp_path: Path, paged: bool) -> None:
    s3.bucket("tree")
    for key in TREE:
        s3.put(f"tree/in/{key}", b"x")
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    store = make_store(s3)
    store.paged = paged
    walked = [relative for relative, _ in store.walk(store.locate("s3://tree/in/"))]
    local = sorted(
        (f for f in tmp_path.rglob("*") if f.is_file()),
        key=lambda f: f.relative_to(tmp_path).parts,
    )
    assert walked == [f.relative_to(tmp_path).as_posix() for f in local]
    assert (store.lister() is not None) == paged


def test_the_listing_gives_each_object_its_etag(s3: S3) -> None:
    s3.bucket("tags")
    s3.put("tags/p/one.png", b"one")
    s3.put("tags/p/two.png", b"two")
    store = make_store(s3)
    one, two = (path for _, _, path in store.listing(store.locate("s3://tags/p/")))
    assert one.etag and two.etag and one.etag != two.etag
    assert (one.size, two.size) == (3, 3)


MEASURE = textwrap.dedent(
    """
    import sys, tracemalloc
    from batchrunner.storage import ObjectStore
    from batchrunner.sources.bucket_images import bucket_items, find_bucket_input
    endpoint, prefix = sys.argv[1:3]
    store = ObjectStore(endpoint=endpoint, region="us-east-1",
                        access_key=sys.argv[3], secret_key=sys.argv[4])
    store.paged = sys.argv[5] == "paged"
    store.lister()  # boto3's own start-up is not the listing's
    tracemalloc.start()
    source = find_bucket_input(prefix, store, (".txt", ".lst"))
    count = sum(1 for _ in bucket_items(source, extensions=frozenset({".png"}),
                                        recursive=True, skip=lambda reason, key: None))
    print(count, tracemalloc.get_traced_memory()[1])
    """
)


def seed(bucket: str, prefix: str, count: int) -> None:
    """Objects put straight into the in-process server's store (uploading them over HTTP
    one by one takes minutes); they are listed over HTTP like any other."""
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
    for index in range(count):
        backend.put_object(bucket, f"{prefix}photo-{index:05d}.png", b"\x89PNG" + bytes(16))


# The 10,000 against 2,000 (moto lists 1,000 keys a second or so, on a loaded
# machine 1-2 s: 15-30 s in all). Not against 1,000: a prefix of one page peaks lower
# (2.1 MB, against 3.5 MB from two pages on: the names held while the next page is parsed),
# and from there the peak is flat (3.46 MB at 2,000 and 4,000, 3.48 MB at 10,000).
SMALL, LARGE = 2_000, 10_000


def measure(s3: S3, prefix: str, how: str) -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, s3.endpoint, f"s3://many/{prefix}", ACCESS_KEY,
         SECRET_KEY, how],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed, peak = map(int, done.stdout.split())
    return listed, peak


def test_listing_a_large_prefix_holds_no_more_than_a_small_one(s3: S3) -> None:
    s3.bucket("many")
    seed("many", "small/", SMALL)
    seed("many", "large/", LARGE)
    small, large = measure(s3, "small/", "paged"), measure(s3, "large/", "paged")
    assert (small[0], large[0]) == (SMALL, LARGE)
    # Paged, one page (1,000 keys) is held whatever the count.
    # (Gathered whole, the peak grows with the count: 0.57 MB at 2,000, 1.7 MB at 6,000.)
    assert large[1] < small[1] * 1.05, (small, large)
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"].buckets.pop("many")
