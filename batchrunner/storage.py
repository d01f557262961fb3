"""Object storage (S3, OBS): ``s3://`` and ``obs://`` locations, read and written through
``pyarrow.fs.S3FileSystem``, the one filesystem layer the sources and the sink share.

- ``is_uri`` tells a bucket location from a local path; ``ObjectStore`` is one connection
  (endpoint, region, addressing, credentials) and ``ObjectStore.locate`` turns a URI into an
  ``ObjectPath``: a bucket and key that the rest of the code passes around where it passes
  a local ``Path`` (``name``, ``suffix``, ``stat()`` from the listing, ``str()`` the URI).
- ``ObjectStore.read`` reads one object whole (an image, when its request is built);
  ``objectfiles`` opens one for Arrow's table readers. Both try each read again on a
  transient failure (``ObjectStore.retried``).
- ``walk`` lists a prefix as the local image walk lists a folder: one "folder" (common
  prefix) at a time, depth first, names sorted, never the whole tree up front.
- ``upload`` puts a finished local file in place as one object: a single PUT, or a
  multipart upload that the store makes visible only once it is complete, and that is
  aborted when anything fails mid-way (boto3's transfer manager), so the object is whole or
  absent.

Transient answers of the store (500, 503 SlowDown, a dropped connection) are retried by
the AWS SDK inside Arrow (its standard retry strategy, ``RETRY_ATTEMPTS`` attempts with
backoff); what still fails is a ``StorageError`` naming the URI and what to do. The keys
are secrets: they are handed to Arrow and never kept in a ``repr``, a message or a log.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from batchrunner.errors import JobError, ServiceError
from batchrunner.listing import (
    Entry,
    boto_client,
    get_object,
    is_boto_error,
    local_order,
    paged_entries,
    upload_stream,
)

__all__ = [
    "RETRY_ATTEMPTS",
    "SCHEMES",
    "InputPath",
    "ObjectPath",
    "ObjectStat",
    "ObjectStore",
    "StorageAbort",
    "StorageError",
    "is_transient",
    "is_uri",
    "split_uri",
]

SCHEMES = ("s3", "obs")
RETRY_ATTEMPTS = 10  # the SDK's standard strategy: exponential backoff, capped at 20 s
READ_ATTEMPTS, READ_BACKOFF = 5, 0.1  # ours, around each read (see ObjectStore.retried)
_DOT_SEGMENTS = frozenset({".", ".."})
FETCH_POOL = 32  # connections kept for image fetches: asyncio's threads are at most 32
_T = TypeVar("_T")
_TRANSIENT = (
    "internal_failure",
    "flush response stream",
    "slowdown",
    "slow down",
    "slow_down",
    "http status 500",
    "http status 503",
    "connection",
    "curl error",
    "timed out",
    "timeout",
    # botocore's words for the same (its messages carry the error code, not the status)
    "internalerror",
    "serviceunavailable",
    "could not connect",
)


def is_transient(exc: OSError) -> bool:
    """Whether an error of the store may pass if tried again (a 500, a 503 SlowDown, a
    dropped connection, a read cut short); not a refusal or a missing object."""
    text = str(exc).lower()
    return any(word in text for word in _TRANSIENT)


class StorageError(JobError):
    """A bucket location cannot be used: a malformed URI, a missing bucket or object, a
    refused credential; raised before any request is sent (exit 2)."""


class StorageAbort(ServiceError):
    """The object store refused or failed mid-run (the upload of the output): the run's
    state is kept, re-running resumes (exit 3)."""


def is_uri(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names an object store location (``s3://`` or ``obs://``)."""
    value = os.fspath(text)
    scheme, sep, _ = value.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def split_uri(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket, key) of ``s3://bucket/key``; ``StorageError`` when malformed."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or not parts.netloc:
        raise StorageError(
            f"{uri}: not an object storage location; write s3://BUCKET/KEY or obs://BUCKET/KEY"
        )
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise StorageError(
            f"{scheme}://{parts.hostname or ''}/...: a bucket location holds no credentials, "
            f"port, query or fragment; put keys and the endpoint in [storage]"
        )
    return scheme, parts.netloc, parts.path.lstrip("/")


@dataclass(frozen=True, slots=True)
class ObjectStat:
    """What a listing says of an object: the identity an incremental run hashes."""

    st_size: int
    st_mtime_ns: int


@dataclass(frozen=True, slots=True)
class ObjectPath:
    """An object (or a prefix) in a bucket: where a local ``Path`` would be."""

    store: ObjectStore = field(compare=False, repr=False)
    scheme: str
    bucket: str
    key: str
    size: int | None = field(default=None, compare=False)
    mtime_ns: int | None = field(default=None, compare=False)
    etag: str | None = field(default=None, compare=False)

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    @property
    def location(self) -> str:
        """The path Arrow's filesystem takes: ``bucket/key``."""
        return f"{self.bucket}/{self.key}".rstrip("/")

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    @property
    def parent(self) -> ObjectPath:
        head = self.key.rstrip("/").rpartition("/")[0]
        return self.child(head + "/" if head else "")

    def child(self, key: str, entry: Entry | None = None) -> ObjectPath:
        """Another object of the same bucket, with what the listing says of it if given."""
        if entry is None or entry.folder:
            return ObjectPath(self.store, self.scheme, self.bucket, key)
        return ObjectPath(
            self.store, self.scheme, self.bucket, key, entry.size, entry.mtime_ns, entry.etag
        )

    def is_dir(self) -> bool:
        """Whether this is a prefix (its key ends in ``/``), a folder of objects."""
        return self.key.endswith("/") or not self.key

    def with_name(self, name: str) -> ObjectPath:
        head = self.key.rstrip("/").rpartition("/")[0]
        return self.child(f"{head}/{name}" if head else name)

    def stat(self) -> ObjectStat:
        """Size and modification time, from the listing (or one HEAD when not listed)."""
        if self.size is None or self.mtime_ns is None:
            info = self.store.info(self)
            return ObjectStat(info.size or 0, info.mtime_ns or 0)
        return ObjectStat(self.size, self.mtime_ns)

    def __fspath__(self) -> str:
        # Only for identities and hashes (``os.fspath``): no local call can open it.
        return self.uri

    def __str__(self) -> str:
        return self.uri


class ObjectStore:
    """One connection to an S3-compatible store, made from the job's ``[storage]``.

    ``endpoint`` (``https://obs.<region>.myhuaweicloud.com``; None: AWS), ``region``,
    ``virtual`` addressing (bucket in the host name, which OBS requires) or path addressing,
    and the keys (None: the AWS SDK's own sources: environment, profile, instance role).
    The filesystem is made on first use.
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        virtual: bool = False,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 60.0,
        keys_from: str = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role",
    ) -> None:
        self.keys_from = keys_from  # where the keys come from, in words, for messages
        self.endpoint = endpoint
        self.region = region
        self.virtual = virtual
        options: dict[str, Any] = {
            "region": region or "us-east-1",
            "force_virtual_addressing": virtual,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS),
            "connect_timeout": connect_timeout,
            "request_timeout": request_timeout,
        }
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
            options["scheme"] = parts.scheme or "https"
            options["endpoint_override"] = parts.netloc
        if access_key is not None and secret_key is not None:
            options["access_key"] = access_key
            options["secret_key"] = secret_key
            if session_token:
                options["session_token"] = session_token
        self._options = options
        self._fs: pafs.S3FileSystem | None = None
        self._lister: Any = None
        self._getter: Any = None
        self._making = threading.Lock()
        self.sleep: Callable[[float], None] = time.sleep  # injected by tests
        self.paged = True  # list with boto3's paginator, when it is installed

    def __repr__(self) -> str:  # never the keys
        return f"ObjectStore(endpoint={self.endpoint!r}, region={self.region!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray ships sources and the actors' secrets to its workers. The store goes with its
        # options, keys included (as they would inside Arrow's own pickle of its filesystem),
        # so that a worker fetches an image with one GET (boto3), as here, not with Arrow's
        # HEAD and GET.
        state = (self.endpoint, self.region, self.virtual, self.keys_from, self._options)
        return (_rebuild, state)

    @property
    def filesystem(self) -> pafs.S3FileSystem:
        if self._fs is None:
            self._fs = pafs.S3FileSystem(**self._options)
        return self._fs

    def locate(self, uri: str) -> ObjectPath:
        scheme, bucket, key = split_uri(uri)
        return ObjectPath(self, scheme, bucket, key)

    # -- reading ---------------------------------------------------------------------------

    def info(self, path: ObjectPath) -> pafs.FileInfo:
        try:
            info: pafs.FileInfo = self.filesystem.get_file_info(path.location)
        except OSError as exc:
            raise StorageError(self.explain(path, exc)) from None
        return info

    def kind(self, path: ObjectPath) -> str:
        """``file``, ``folder`` (a prefix holding objects) or ``missing``."""
        info = self.info(path)
        if info.type == pafs.FileType.File and not path.key.endswith("/"):
            return "file"
        if info.type == pafs.FileType.Directory or path.key in ("", "/"):
            return "folder"
        self.check_bucket(path)
        return "missing"

    def check_bucket(self, path: ObjectPath) -> None:
        """``StorageError`` unless ``path``'s bucket exists (and the keys are taken)."""
        bucket = path.child("")
        if self.info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(self.explain(bucket, OSError("NoSuchBucket")))

    def listing(self, prefix: ObjectPath) -> Iterator[tuple[str, bool, ObjectPath]]:
        """One level of ``prefix``: (name, is a folder, its path), sorted by name as a local
        folder is; streamed page by page (boto3's paginator) when boto3 is installed (the
        ``s3`` extra), else one level whole from Arrow."""
        base = prefix.key.rstrip("/")
        base = base + "/" if base else ""
        client = self.lister()
        if client is None:
            entries: Iterable[Entry] = self._level(prefix)
        else:
            entries = local_order(
                self._paged(client, prefix, base),
                lambda name: self._has_folder(client, prefix, base + name + "/"),
            )
        for entry in entries:
            key = base + entry.name + ("/" if entry.folder else "")
            yield entry.name, entry.folder, prefix.child(key, entry)

    def _level(self, prefix: ObjectPath) -> list[Entry]:
        selector = pafs.FileSelector(prefix.location, recursive=False, allow_not_found=True)
        try:
            infos = self.filesystem.get_file_info(selector)
        except OSError as exc:
            raise StorageError(self.explain(prefix, exc)) from None
        entries = [
            Entry(info.base_name, True)
            if info.type == pafs.FileType.Directory
            else Entry(info.base_name, False, info.size, info.mtime_ns)
            for info in infos
        ]
        entries.sort(key=lambda entry: entry.name)
        return entries

    def _paged(self, client: Any, prefix: ObjectPath, base: str) -> Iterator[Entry]:
        with self._boto_errors(prefix):
            yield from paged_entries(client, prefix.bucket, base)

    def _has_folder(self, client: Any, prefix: ObjectPath, key: str) -> bool:
        with self._boto_errors(prefix):
            answer = client.list_objects_v2(Bucket=prefix.bucket, Prefix=key, MaxKeys=1)
        return bool(answer.get("KeyCount", 0))

    @contextmanager
    def _boto_errors(self, prefix: ObjectPath) -> Iterator[None]:
        """botocore's errors (a refusal, a lost connection) as a ``StorageError`` naming
        ``prefix``; anything else as it is."""
        try:
            yield
        except Exception as exc:
            if not is_boto_error(exc):
                raise
            raise StorageError(self.explain(prefix, OSError(str(exc)))) from None

    def lister(self) -> Any:
        """boto3's S3 client on the same store (None without boto3): for paged listings."""
        if self._lister is None and self.paged:
            with self._making:  # one client, however many threads ask at once
                if self._lister is None and self.paged:
                    self._lister = self._boto_client({"max_attempts": RETRY_ATTEMPTS})
        return self._lister

    def getter(self) -> Any:
        """boto3's S3 client for single GETs, the SDK's retries off (None without boto3);
        shared by the threads that fetch images."""
        if self._getter is None and self.paged:
            with self._making:
                if self._getter is None and self.paged:
                    self._getter = self._boto_client({"total_max_attempts": 1}, FETCH_POOL)
        return self._getter

    def _boto_client(self, retries: dict[str, int], pool: int = 10) -> Any:
        client = boto_client(self._options, virtual=self.virtual, retries=retries, pool=pool)
        if client is None:
            self.paged = False
        return client

    def walk(self, prefix: ObjectPath) -> Iterator[tuple[str, ObjectPath]]:
        """(key relative to ``prefix``, object) under ``prefix``, depth first, sorted as a
        local folder walk is; one page per level being walked is held, never the tree."""
        stack = [("", self.listing(prefix))]
        while stack:
            relative, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            name, is_folder, path = entry
            if is_folder:
                stack.append((relative + name + "/", self.listing(path)))
            else:
                yield relative + name, path

    def read(self, path: ObjectPath, max_bytes: int) -> bytes:
        """The object's bytes; ``OSError`` if it cannot be read, ``ValueError`` (its size)
        if it holds more than ``max_bytes``. Tried again as ``retried`` says.

        With boto3 (the ``s3`` extra), one GET (see ``_get``), tried up to
        ``RETRY_ATTEMPTS`` times here (the SDK's own retries are off for it, so that the
        pauses are this object's ``sleep``); else Arrow's file."""
        client = self.getter()
        if client is not None and not _DOT_SEGMENTS & set(path.key.split("/")):
            return self.retried(
                lambda: get_object(client, path.bucket, path.key, max_bytes), RETRY_ATTEMPTS
            )
        return self.retried(lambda: self._read_once(path, max_bytes))

    def retried(self, call: Callable[[], _T], attempts: int = READ_ATTEMPTS) -> _T:
        """``call()`` (a read), tried again on a transient failure:
        ``attempts`` times in all, with backoff; the last ``OSError`` as it is.

        The SDK retries most of them itself, but not an error answer longer than a small
        read (Arrow reads into a buffer of the range's size, and a 503 SlowDown's body
        overflows it: "Failed to flush response stream")."""
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except OSError as exc:
                if attempt == attempts or not is_transient(exc):
                    raise
                self.sleep(min(READ_BACKOFF * 2 ** (attempt - 1), 2.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_once(self, path: ObjectPath, max_bytes: int) -> bytes:
        # Arrow's file asks for the size first: a HEAD, then a GET. (Used without boto3,
        # and for a key Arrow resolves: a manifest's ``../x.png``.)
        with self.filesystem.open_input_file(path.location) as file:
            size = file.size()
            if size > max_bytes:
                raise ValueError(size)
            data: bytes = file.read()
            return data

    # -- writing ---------------------------------------------------------------------------

    def upload(self, local: Path, target: ObjectPath) -> None:
        """Put the finished file ``local`` at ``target``, whole or not at all.

        With boto3 (the ``s3`` extra), its transfer manager, which aborts a multipart upload
        that fails, whatever failed. Without it, Arrow's stream: closed by an exception
        that is not its own (a failed read of ``local``, an interruption), it completes the
        parts sent so far (it has no abort), so a partial object may be left at
        ``target``."""
        client = self.lister()
        try:
            with pa.OSFile(str(local), "rb") as source:
                if client is not None:
                    upload_stream(client, source, target.bucket, target.key)
                    return
                with self.filesystem.open_output_stream(target.location, metadata={}) as sink:
                    while chunk := source.read(8 << 20):
                        sink.write(chunk)
        except OSError as exc:
            raise StorageAbort(
                f"cannot upload the output to {target}: {self.explain(target, exc)}"
            ) from None

    def put_bytes(self, data: bytes, target: ObjectPath) -> None:
        try:
            with self.filesystem.open_output_stream(target.location, metadata={}) as sink:
                sink.write(data)
        except OSError as exc:
            raise StorageAbort(f"cannot write {target}: {self.explain(target, exc)}") from None

    def check_writable(self, target: ObjectPath) -> None:
        """Write and remove a small probe object beside ``target`` (``validate``, dry runs)."""
        try:
            self.check_bucket(target)
        except StorageError as exc:
            raise StorageError(f"output.path: cannot write to {target.parent}: {exc}") from None
        probe = target.with_name(f".{target.name}.batchrunner-probe")
        try:
            with self.filesystem.open_output_stream(probe.location, metadata={}) as sink:
                sink.write(b"probe")
            self.filesystem.delete_file(probe.location)
        except OSError as exc:
            raise StorageError(
                f"output.path: cannot write to {target.parent}: {self.explain(target, exc)}"
            ) from None

    def check_readable(self, path: ObjectPath) -> None:
        """The bucket answers and the credentials are taken (one listing call)."""
        next(self.listing(path.parent if self.kind(path) == "file" else path), None)

    # -- messages --------------------------------------------------------------------------

    @staticmethod
    def keys_refused(exc: OSError) -> bool:
        """Whether the store refused the keys themselves (unknown, wrongly signed with, or
        expired), not one object's access (``AccessDenied``: its policy or ACL)."""
        lowered = str(exc).lower()
        return any(code in lowered for code in _KEYS_REFUSED)

    def explain(self, path: ObjectPath, exc: OSError) -> str:
        """What Arrow's error means for ``path``, and what to do; never a key."""
        text = str(exc)
        lowered = text.lower()
        if "nosuchbucket" in lowered or "bucket does not exist" in lowered:
            return (
                f"{path.scheme}://{path.bucket}: no such bucket; check the bucket name and "
                f"[storage] endpoint/region"
            )
        if any(
            word in lowered
            for word in (
                "accessdenied",
                "access_denied",
                "access denied",
                "forbidden",
                "invalidaccesskeyid",
                "signaturedoesnotmatch",
                "http status 403",
                "http status 401",
            )
        ):
            return (
                f"{path}: the store refused the credentials (access denied); check the keys "
                f"({self.keys_from}) and that they may use bucket {path.bucket}"
            )
        if "curl" in lowered or "connect" in lowered or "resolve" in lowered:
            return (
                f"{path}: cannot reach the object store at "
                f"{self.endpoint or 'AWS S3'}; check [storage] endpoint and the network"
            )
        return f"{path}: {_scrub(text, self._options)}"


# S3's error codes for keys it does not take, whatever the object.
_KEYS_REFUSED = (
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "expiredtoken",
    "invalidtoken",
    "tokenrefreshrequired",
)


def _rebuild(
    endpoint: str | None,
    region: str | None,
    virtual: bool,
    keys_from: str,
    options: dict[str, Any],
) -> ObjectStore:
    store = ObjectStore(endpoint=endpoint, region=region, virtual=virtual, keys_from=keys_from)
    store._options = dict(options)
    return store


def _scrub(text: str, options: dict[str, Any]) -> str:
    for name in ("access_key", "secret_key", "session_token"):
        value = options.get(name)
        if value:
            text = text.replace(str(value), "***")
    return text


#: Where an input file is: on local disk, or in a bucket.
InputPath = Path | ObjectPath
