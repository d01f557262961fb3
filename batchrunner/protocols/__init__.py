"""Request encoding and response decoding, one module per protocol (``modelarts`` first).

A codec turns a ``Batch`` into the bytes of one request and the answer's bytes back into one
result object per row, refusing any answer whose shape does not fit the request. Codecs are
pure: no network, no clock; the client sends what they build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from batchrunner.items import Batch


@dataclass(frozen=True, slots=True)
class EncodedRequest:
    """A request body and its content type, ready to send."""

    body: bytes
    content_type: str


class Codec(Protocol):
    """How one protocol encodes batches and decodes answers."""

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        """The request for ``batch``, tagged with ``request_uuid`` where the protocol can."""
        ...

    def decode(self, body: bytes, batch: Batch, request_uuid: str) -> list[dict[str, Any]]:
        """One result object per row of ``batch``; raises ``RequestError`` on a bad shape."""
        ...
