"""multipart/form-data bodies with one file part (RFC 7578), built by hand as bytes.

This is what ``curl -F 'images=@photo.png'`` sends: a boundary line, the part's headers
(``Content-Disposition: form-data; name="images"; filename="photo.png"`` and a
``Content-Type`` guessed from the extension), a blank line, the file's bytes, and the
closing boundary. Built here rather than with aiohttp's ``FormData`` because protocols do not
import aiohttp (only ``client`` does), and because a body of plain bytes can be measured
against the service's limit before it is sent.

File names: ``filename`` carries the name as UTF-8, with ``"``, CR and LF percent-escaped,
as browsers, curl and requests send it (WHATWG HTML). A name that is not ASCII, or that
needed escaping, also gets ``filename*=UTF-8''<percent-encoded>`` (RFC 5987): servers that
know it (aiohttp, werkzeug, Python's ``email``) read the exact name from it, others ignore
it. RFC 7578 section 4.2 advises against ``filename*``; we send both so that neither kind of
server loses the name.

``read_file`` reads a file under a size limit, so that a file too large for one request is
refused before its bytes are held in memory.
"""

from __future__ import annotations

import functools
import mimetypes
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from batchrunner.errors import ErrorKind, RequestError
from batchrunner.storage import ObjectPath

FILE_TOO_LARGE = "file_too_large"
UNREADABLE = ErrorKind.UNREADABLE.value
OCTET_STREAM = "application/octet-stream"


@functools.cache
def _types() -> mimetypes.MimeTypes:
    """Python's built-in table only (not the system's /etc/mime.types), so that a file gets
    the same Content-Type on every machine; plus the image types it lacks before Python
    3.13. Built on first use: ~3 ms that a run of table rows need not pay at start-up."""
    types = mimetypes.MimeTypes()
    types.add_type("image/webp", ".webp")
    return types


@dataclass(frozen=True, slots=True)
class FilePart:
    """The fixed parts of a one-file form: everything but the file's bytes.

    The body is ``head + content + tail``: its size is known before the file is read.
    """

    head: bytes
    tail: bytes
    boundary: str
    content_type: str  # the request's: multipart/form-data with the boundary

    @property
    def envelope_bytes(self) -> int:
        return len(self.head) + len(self.tail)

    def body(self, content: bytes) -> bytes:
        return b"".join((self.head, content, self.tail))


def content_type_of(filename: str) -> str:
    """The MIME type of a file name's extension (any case); octet-stream when unknown."""
    guessed, _ = _types().guess_type(filename.lower(), strict=False)
    return guessed or OCTET_STREAM


def file_part(field: str, filename: str, boundary: str) -> FilePart:
    """The form around one file sent under ``field`` as ``filename``.

    ``boundary`` must not occur in the file (see ``choose_boundary``). ``field`` must hold
    no ``"``, ``\\``, CR or LF (the job validates ``service.file_field``).
    """
    quoted = _quoted_filename(filename)
    disposition = f'form-data; name="{field}"; filename="{quoted}"'
    if quoted != filename or not filename.isascii():  # the plain form lost or may garble it
        utf8 = os.fsencode(filename)  # the name's own bytes, even if they are not UTF-8
        disposition += f"; filename*=UTF-8''{quote(utf8, safe='')}"
    head = (
        f"--{boundary}\r\n"
        f"Content-Disposition: {disposition}\r\n"
        f"Content-Type: {content_type_of(filename)}\r\n"
        "\r\n"
    ).encode("utf-8", errors="surrogateescape")
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    return FilePart(head, tail, boundary, f"multipart/form-data; boundary={boundary}")


def choose_boundary(seed: str, content: bytes) -> str:
    """A boundary made from ``seed`` (e.g. the request's uuid) that ``content`` lacks.

    A boundary found inside the file would cut it short; a random seed makes that all but
    impossible, and the check makes it impossible.
    """
    base = "batchrunner-" + "".join(filter(str.isalnum, seed))
    boundary, extra = base, 0
    while f"--{boundary}".encode("ascii") in content:
        extra += 1
        boundary = f"{base}-{extra}"
    return boundary


def _quoted_filename(filename: str) -> str:
    # WHATWG's multipart/form-data encoding: only these three would break the header.
    return filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def read_file(path: Path | ObjectPath, max_bytes: int) -> bytes:
    """The bytes of ``path``; ``RequestError`` if it holds more than ``max_bytes`` or
    cannot be read (gone, a folder, no permission, not a regular file).

    An object in a bucket is fetched here, when its request is built (inside the request's
    slot); the store's transient errors are retried by the SDK (see ``storage``).

    The size is checked before reading, and again while reading (a file that grows in
    between): never more than ``max_bytes + 1`` bytes are held.
    """
    if isinstance(path, ObjectPath):
        return _read_object(path, max_bytes)
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer that never comes.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise _unreadable("no such file (removed after the input was listed?)") from None
    except OSError as exc:
        raise _unreadable(exc.strerror or str(exc)) from None
    try:
        status = os.fstat(descriptor)
        if stat.S_ISDIR(status.st_mode):
            raise _unreadable("it is a folder")
        if not stat.S_ISREG(status.st_mode):
            raise _unreadable("not a regular file")
        if status.st_size > max_bytes:
            raise too_large(status.st_size, max_bytes)
        with open(descriptor, "rb", buffering=0, closefd=False) as file:
            # What fstat says plus one byte (a buffer of max_bytes would be allocated, and
            # given back, for every file), then the rest if the file grew meanwhile.
            content = file.read(status.st_size + 1)
            if len(content) > status.st_size:
                content += file.read(max_bytes + 1 - len(content))
    except OSError as exc:
        raise _unreadable(exc.strerror or str(exc)) from None
    finally:
        os.close(descriptor)
    if len(content) > max_bytes:  # it grew after the size was checked
        raise too_large(len(content), max_bytes)
    return content


def _read_object(path: ObjectPath, max_bytes: int) -> bytes:
    try:
        return path.store.read(path, max_bytes)
    except ValueError as exc:
        raise too_large(int(exc.args[0]), max_bytes) from None
    except OSError as exc:
        # The keys themselves refused (not this object's access): every object would be,
        # so the run stops, its finished batches kept for a re-run.
        fatal = path.store.keys_refused(exc)
        raise _unreadable(path.store.explain(path, exc), fatal=fatal) from None


def _unreadable(reason: str, *, fatal: bool = False) -> RequestError:
    return RequestError(
        f"cannot read the file: {reason}", kind=UNREADABLE, retryable=False, fatal=fatal
    )


def too_large(size: int, max_bytes: int) -> RequestError:
    """The error of a file of ``size`` bytes where at most ``max_bytes`` fit a request."""
    return RequestError(
        f"the file is {size:,} bytes; at most {max_bytes:,} fit in one request "
        "(batch.max_request_bytes less the form around the file): shrink the file, or raise "
        "batch.max_request_bytes if the service takes larger bodies",
        kind=FILE_TOO_LARGE,
        retryable=False,
    )
