"""One level of a bucket prefix, listed page by page and put in a local folder's order.

A store lists keys in byte order, a "folder" (common prefix) as its name and a ``/``. A
local folder walk sorts names, a folder by its bare name, so folder ``a`` comes before
``a-1.png`` and ``a.png``, which the store puts before ``a/`` (``-`` and ``.`` sort before
``/``). ``local_order`` turns the store's stream into the local order while reading it:
an entry is held only while a folder that sorts before it may still come, that is a
folder named like the start of its name up to a character below ``/``. Such holds are
released as soon as the listing moves past that folder's place; when more than ``hold``
entries wait (a long run of ``photo-0001.png`` ... beside no ``photo/``), the folder is
asked for with one small listing, so memory stays within ``hold`` entries whatever the
count.

``paged_entries`` is the store's stream: ListObjectsV2 pages of up to 1,000 keys from
boto3's paginator (pyarrow's ``get_file_info`` has no paged form: it returns a whole
level at once), each with the size, time and ETag the listing gives.

``get_object`` reads an object with one GET (Arrow's files ask for the size with a HEAD
first: two round trips an image). ``upload_stream`` puts a file in place whole or not at all
(boto3's transfer manager: a multipart upload that fails is aborted, where Arrow's stream,
closed by an exception, completes the parts it has sent). boto3 is the ``s3`` extra;
``boto_client`` is None without it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Entry",
    "boto_client",
    "get_object",
    "is_boto_error",
    "local_order",
    "paged_entries",
    "upload_stream",
]


@dataclass(frozen=True, slots=True)
class Entry:
    """A name in one level of a prefix: an object (with what the listing says of it) or a
    folder (a common prefix)."""

    name: str
    folder: bool
    size: int | None = None
    mtime_ns: int | None = None
    etag: str | None = None

    @property
    def store_key(self) -> str:
        """Where the store lists it (its order): a folder's name ends in ``/``."""
        return self.name + "/" if self.folder else self.name


def _waiting_on(name: str, cursor: str, settled: set[str]) -> list[str]:
    """The folders that may still come after ``cursor`` and sort before ``name``: the
    starts of ``name`` cut before a character below ``/``, not yet settled."""
    return [
        name[:cut]
        for cut, char in enumerate(name)
        if cut and char < "/" and name[:cut] + "/" > cursor and name[:cut] not in settled
    ]


def local_order(
    entries: Iterable[Entry], has_folder: Callable[[str], bool], *, hold: int = 1000
) -> Iterator[Entry]:
    """``entries`` (one level, in the store's order) in the order of their names, as a
    local folder's walk sorts them; ``has_folder(name)`` tells whether a folder ``name``
    exists, asked only when more than ``hold`` entries wait on it."""
    waiting: list[tuple[str, int, Entry]] = []  # a heap, by name
    order = itertools.count()
    cursor = ""  # the store key of the last entry read
    settled: set[str] = set()  # folder names asked for: absent, or already in the heap
    source = iter(entries)
    ended = False
    while True:
        while waiting and (ended or not _waiting_on(waiting[0][0], cursor, settled)):
            yield heapq.heappop(waiting)[2]
        if ended:
            return
        if len(waiting) > hold:
            for name in _waiting_on(waiting[0][0], cursor, settled):
                settled.add(name)
                if has_folder(name):
                    heapq.heappush(waiting, (name, next(order), Entry(name, True)))
            continue
        entry = next(source, None)
        if entry is None:
            ended = True
            continue
        cursor = entry.store_key
        if len(settled) > 64:
            settled = {name for name in settled if name + "/" > cursor}
        if entry.folder and entry.name in settled:
            continue  # asked for earlier, and already given
        heapq.heappush(waiting, (entry.name, next(order), entry))


def paged_entries(client: Any, bucket: str, prefix: str, page_size: int = 1000) -> Iterator[Entry]:
    """The entries of one level of ``prefix`` (``""`` or ending in ``/``) in the store's
    order, one ListObjectsV2 page at a time; the prefix's own marker object is left out."""
    paginator = client.get_paginator("list_objects_v2")
    pages = paginator.paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/", PaginationConfig={"PageSize": page_size}
    )
    start = len(prefix)
    for page in pages:
        folders = (
            Entry(common["Prefix"][start:-1], True) for common in page.get("CommonPrefixes", ())
        )
        objects = (
            Entry(
                item["Key"][start:],
                False,
                int(item["Size"]),
                int(item["LastModified"].timestamp() * 1_000_000) * 1000,
                str(item.get("ETag", "")).strip('"') or None,
            )
            for item in page.get("Contents", ())
            if len(item["Key"]) > start
        )
        yield from heapq.merge(folders, objects, key=lambda entry: entry.store_key)


def boto_client(
    options: dict[str, Any], *, virtual: bool, retries: dict[str, int], pool: int = 10
) -> Any:
    """boto3's S3 client on the store Arrow's ``options`` describe (endpoint, region,
    timeouts, keys), retrying as ``retries`` says, keeping ``pool`` connections; None
    without boto3."""
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError:
        return None
    config = Config(
        region_name=options["region"],
        retries={"mode": "standard", **retries},
        connect_timeout=options["connect_timeout"],
        read_timeout=options["request_timeout"],
        s3={"addressing_style": "virtual" if virtual else "path"},
        max_pool_connections=pool,
    )
    endpoint = None
    if "endpoint_override" in options:
        endpoint = f"{options['scheme']}://{options['endpoint_override']}"
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=options.get("access_key"),
        aws_secret_access_key=options.get("secret_key"),
        aws_session_token=options.get("session_token"),
        config=config,
    )


def get_object(client: Any, bucket: str, key: str, max_bytes: int) -> bytes:
    """The object's bytes, with one GET: the size from its answer, the body read only if
    it fits (``ValueError(size)`` otherwise). The client's errors as ``OSError``."""
    try:
        answer = client.get_object(Bucket=bucket, Key=key)
        body = answer["Body"]
        try:
            size = int(answer["ContentLength"])
            if size > max_bytes:
                raise ValueError(size)
            data: bytes = body.read()
        finally:
            body.close()
    except Exception as exc:
        if not is_boto_error(exc):
            raise
        raise OSError(str(exc)) from None
    return data


UPLOAD_PART = 8 << 20  # bytes a part (and the size from which an upload is multipart)
UPLOAD_THREADS = 4  # parts sent at once; at most twice as many read ahead in memory


def upload_stream(client: Any, source: Any, bucket: str, key: str) -> None:
    """Put what ``source`` (a binary file) holds at ``key``: one PUT, or a multipart upload
    completed only when every part is sent; on any failure (the store's, or the source's
    read) the upload is aborted and nothing is left at ``key``. The client's errors as
    ``OSError``."""
    from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

    config = TransferConfig(
        multipart_threshold=UPLOAD_PART,
        multipart_chunksize=UPLOAD_PART,
        max_concurrency=UPLOAD_THREADS,
    )
    config.max_in_memory_upload_chunks = 2 * UPLOAD_THREADS
    try:
        client.upload_fileobj(source, bucket, key, Config=config)
    except Exception as exc:
        if not is_boto_error(exc) and not type(exc).__module__.startswith("s3transfer"):
            raise
        raise OSError(str(exc)) from None


def is_boto_error(exc: Exception) -> bool:
    """Whether ``exc`` is botocore's (the store refused, or could not be reached) or
    urllib3's under it (a body cut short, a reset)."""
    return type(exc).__module__.startswith(("botocore", "boto3", "urllib3"))
