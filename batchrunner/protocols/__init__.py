"""Request encoding and response decoding, one module per protocol (``modelarts`` first).

    modelarts   text input (TextCodec) and file input (FileCodec); failure classification
    columnar    a regular answer's items as Arrow columns; the echo checked a column at a time
    multipart   multipart/form-data bodies with one file part, built by hand
    answers     what the other JSON protocols share: error bodies, answers' shapes
    jsonbody    protocol = "json": a body shaped by the job ([service.json])
    kserve      protocol = "kserve-v1": instances -> predictions (also TF Serving's rows)
    oip         protocol = "oip-v2": the Open Inference Protocol v2 (KServe v2, Triton,
                MLServer): tensors in, tensors out
    mlflow      protocol = "mlflow": dataframe_split -> predictions
    openai      protocol = "openai-chat" (a prompt a row) and "openai-embeddings" (texts
                a request): OpenAI-compatible language model servers
    openaibatch protocol = "openai-batch": an OpenAI batch file's lines, one a request

A codec turns a ``Batch`` into the bytes of one request and the answer's bytes back into one
result object per row, refusing any answer whose shape does not fit the request. Codecs use
no network and no clock; the client sends what they build. A file-input codec reads the
batch's file (so the dispatcher calls it off the event loop) and raises a ``RequestError``
when the file cannot become a request: that item fails without being sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyarrow as pa

from batchrunner.errors import RequestError
from batchrunner.items import Batch, Results


@dataclass(frozen=True, slots=True)
class EncodedRequest:
    """A request body and its content type, ready to send.

    ``request_uuid`` is the id the body carries (text input's ``meta.uuid``), None when the
    protocol has no place for one (file input). ``preview`` shows a body that is not text
    to people (``--dry-run``): the form with the file's bytes left out.
    """

    body: bytes
    content_type: str
    request_uuid: str | None = None
    preview: str | None = None
    # Language models: the tokens the request is expected to take (the prompt's, estimated
    # from its length, and the most the answer may take), for the token rate limit and
    # budget before the answer's usage says.
    estimated_tokens: int = 0
    # Where this request goes when not to the service's URL: the path a batch file's line
    # names (``/v1/embeddings``), on the service's own origin, always.
    path: str | None = None


class Codec(Protocol):
    """How one protocol encodes batches and decodes answers."""

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        """The request for ``batch``, tagged with ``request_uuid`` where the protocol can.

        Raises ``RequestError`` when the batch cannot become a request (a file too large or
        unreadable): nothing is sent, and sending again would not help.
        """
        ...

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> Results:
        """One result object per row of ``batch`` (sent as ``request``), or the results as
        Arrow columns; raises ``RequestError`` on a bad shape."""
        ...

    def classify_failure(
        self, status: int, body: bytes, retry_after: float | None = None
    ) -> RequestError:
        """What a non-2xx answer means: retry, split the batch, give up, or stop the run."""
        ...

    def probe_url(self, url: str) -> str | None:
        """Where ``validate`` asks the service at ``url`` what it expects (a GET), or None."""
        ...

    def check_probe(self, status: int, body: bytes, schema: pa.Schema) -> None:
        """Raise ``SettingError`` (naming both sides) when the server's answer to the probe
        says it expects other inputs than ``schema``'s columns."""
        ...


class TokenUsage(Protocol):
    """The tokens an answer says its request took."""

    @property
    def prompt(self) -> int: ...

    @property
    def completion(self) -> int: ...


@runtime_checkable
class Metered(Protocol):
    """A codec whose answers say how many tokens their requests took (language models)."""

    def usage(self, body: bytes) -> TokenUsage | None:
        """The answer's token usage, or None when it does not say."""
        ...
