"""The ModelArts real-time service protocol: text input, file input, and their answers.

Text input: encoding turns a batch's Arrow rows into the JSON body; decoding checks the
answer's shape before anything is joined back to rows: ``data.resp_data`` must be a list of
objects exactly as long as ``req_data``, else the whole batch fails (results are never
shifted onto other rows).

File input: one file per request, as multipart/form-data under the model's input name
(``images``); the answer is one JSON object, the file's result as it came (the model
decides its fields: ``predicted_label`` and ``scores`` for classifiers). The protocol has
no ``meta.uuid`` for files, so none is sent. A file too large for one request, or that
cannot be read, fails without being sent.

Many models echo the fields they were sent in each ``resp_data`` item (the reference iris
model does). Where an item carries a sent field under the same name, ``check_echo``
compares it with what that row sent: a reversed or reordered answer fails the batch
instead of putting its results on the wrong rows.

``classify_failure`` reads a non-2xx answer (gateway ``APIG.*``, platform ``ModelArts.*``,
model ``MR.*`` codes, or an HTML page) into a ``RequestError``.
"""

from __future__ import annotations

import base64
import decimal
import functools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
import pyarrow as pa

from batchrunner.errors import ErrorKind, RequestError, clip, http_kind
from batchrunner.items import Batch, Results
from batchrunner.job.settings import DEFAULT_MAX_REQUEST_BYTES
from batchrunner.protocols import EncodedRequest
from batchrunner.protocols.columnar import ECHO_REL_TOL, check_echo_columns, item_columns
from batchrunner.protocols.multipart import choose_boundary, file_part, read_file, too_large

JSON_CONTENT_TYPE = "application/json"
DEFAULT_FILE_FIELD = "images"  # the vendor's examples: curl -F 'images=@test.png'

# The gateway answers these when the backend is busy or down: worth another try.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# 401/403: the token is refused; every other request will be refused too.
FATAL_STATUSES = frozenset({401, 403})
# A request refused for its content: one row may be to blame, so halves are worth a try.
ROW_SPECIFIC_STATUSES = frozenset({400, 413, 422})
# ModelArts.42xx / 45xx: throttling, circuit breaker, backend timeouts: transient.
_TRANSIENT_CODE = re.compile(r"^ModelArts\.4[25]\d\d$")


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"cannot send a value of type {type(value).__name__} as JSON")


def rows_to_records(rows: pa.RecordBatch) -> list[dict[str, Any]]:
    """The rows as JSON-ready dicts, built column by column (much faster than row by row)."""
    return _records_and_columns(rows)[0]


def _records_and_columns(
    rows: pa.RecordBatch,
) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    columns = [column.to_pylist() for column in rows.columns]
    names = tuple(rows.schema.names)
    return _record_builder(names)(columns), dict(zip(names, columns, strict=True))


@functools.lru_cache(maxsize=64)
def _record_builder(names: tuple[str, ...]) -> Callable[[list[list[Any]]], list[dict[str, Any]]]:
    # The hottest loop of a tabular run: a dict display with the field names written in
    # builds a row twice as fast as dict(zip(names, values)). The names enter the code only
    # as repr() literals, so no column name can be anything but a string here.
    if not names:
        return lambda columns: []
    values = ", ".join(f"v{index}" for index in range(len(names)))
    fields = ", ".join(f"{name!r}: v{index}" for index, name in enumerate(names))
    source = f"lambda columns: [{{{fields}}} for ({values},) in zip(*columns)]"
    return eval(source, {"__builtins__": {"zip": zip}})  # type: ignore[no-any-return]


def encode_text(rows: pa.RecordBatch, request_uuid: str) -> bytes:
    """The request body for text input: ``{"meta": {"uuid": ...}, "data": {"req_data": [...]}}``."""
    return _encode_records(rows_to_records(rows), request_uuid)


def _encode_records(records: list[dict[str, Any]], request_uuid: str) -> bytes:
    body = {"meta": {"uuid": request_uuid}, "data": {"req_data": records}}
    return orjson.dumps(body, default=_json_default)


def decode_text(body: bytes, expected: int, request_uuid: str) -> list[dict[str, Any]]:
    """The ``resp_data`` items of a 2xx answer, checked against the request's shape."""
    document = _parse_json(body, 200)
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, dict) or "resp_data" not in data:
        raise _bad_response(f"the answer has no data.resp_data (keys: {_keys(document)})")
    results = data["resp_data"]
    if not isinstance(results, list):
        raise _bad_response(f"data.resp_data is {_a(results)}, not a list")
    if len(results) != expected:
        raise _bad_response(
            f"data.resp_data has {len(results)} items for {expected} rows sent; "
            "results cannot be matched to rows",
            row_specific=True,  # a model that drops a row it cannot score: halves isolate it
        )
    if results and set(map(type, results)) != {dict}:  # checked in C: a hot path
        position, item = next((i, r) for i, r in enumerate(results) if type(r) is not dict)
        raise _bad_response(f"data.resp_data[{position}] is {_a(item)}, not an object")
    meta = document.get("meta")
    echoed = meta.get("uuid") if isinstance(meta, dict) else None
    if echoed and echoed != request_uuid:
        raise _bad_response(
            f"meta.uuid {echoed!r} does not match the request's {request_uuid!r}: "
            "the answer belongs to another request"
        )
    return results


# Sent values of these types are compared with their echo (nested values and the rest are
# sent as the JSON encoder makes them, and echoed as the model likes).
_ECHO_SCALARS = frozenset({int, float, str, bool, type(None)})
_ABSENT = object()


def check_echo(
    results: list[dict[str, Any]],
    sent: list[dict[str, Any]],
    keys: Sequence[str],
    columns: Mapping[str, list[Any]] | None = None,
) -> None:
    """Raise ``RequestError`` when a result echoes a sent field with another row's value.

    ``sent`` are the rows as sent. Only scalar fields both the first item and the first row
    carry are compared; an item without the field is not compared. Numbers compare within
    a relative 1e-6, a null with a null or NaN, everything else exactly. ``columns``, the
    sent values column by column, makes the common case (every echo equal) cheaper: a
    column of echoes is compared with a list of the sent values, with no tuple per row.
    """
    if not results or not sent:
        return
    first, sent_first = results[0], sent[0]
    names = [
        name for name in first if name in sent_first and type(sent_first[name]) in _ECHO_SCALARS
    ]
    if not names:
        return
    try:
        if columns is not None:
            if all(
                list(map(operator.itemgetter(name), results)) == columns[name] for name in names
            ):  # in C: the common case
                return
        else:
            values = operator.itemgetter(*names)
            if list(map(values, results)) == list(map(values, sent)):
                return
    except KeyError:
        pass  # an item without a field: compared one by one
    for name in names:
        echoed = [item.get(name, _ABSENT) for item in results]
        _compare_echo(name, [row[name] for row in sent], echoed, keys)


def _compare_echo(name: str, sent: list[Any], echoed: list[Any], keys: Sequence[str]) -> None:
    for position, (value, echo) in enumerate(zip(sent, echoed, strict=True)):
        if echo is _ABSENT or _same_value(value, echo):
            continue
        raise _bad_response(
            f"data.resp_data[{position}].{name} is {clip(repr(echo), 60)}, but the row "
            f"sent there (key {keys[position]}) has {clip(repr(value), 60)}: the answer's "
            "items are not in the order of the rows sent; results cannot be matched to rows"
        )


def _same_value(sent: Any, echoed: Any) -> bool:
    if sent == echoed and type(sent) is not bool and type(echoed) is not bool:
        return True
    if isinstance(sent, bool) or isinstance(echoed, bool):
        return type(sent) is type(echoed) and sent == echoed
    if sent is None or (isinstance(sent, float) and math.isnan(sent)):
        return echoed is None  # JSON has no NaN: it was sent as null
    if isinstance(sent, int | float) and isinstance(echoed, int | float):
        return math.isclose(sent, echoed, rel_tol=ECHO_REL_TOL)
    return False


def classify_failure(status: int, body: bytes, retry_after: float | None = None) -> RequestError:
    """A ``RequestError`` describing a non-2xx answer: its kind, and whether to retry."""
    code, detail = _error_fields(body)
    text = f"HTTP {status}"
    if code:
        text += f" {code}"
    if detail:
        text += f": {detail}"
    if status in FATAL_STATUSES:
        return RequestError(
            f"{text} (the service refused the token: check that it is valid and not expired)",
            kind=ErrorKind.AUTH,
            retryable=False,
            fatal=True,
            http_status=status,
        )
    if code and code.startswith("MR."):
        return RequestError(
            text, kind=ErrorKind.MODEL_ERROR, retryable=False, row_specific=True, http_status=status
        )
    retryable = status in RETRYABLE_STATUSES or bool(code and _TRANSIENT_CODE.match(code))
    return RequestError(
        text,
        kind=http_kind(status),
        retryable=retryable,
        row_specific=not retryable and status in ROW_SPECIFIC_STATUSES,
        http_status=status,
        retry_after=retry_after,
    )


class TextCodec:
    """Text input: a batch's rows as ``req_data``, the answer's ``resp_data`` back."""

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        if batch.rows is None:
            raise ValueError("text input needs rows: this batch carries a file")
        # The rows' dicts go as soon as they are written: the echo is checked against the
        # batch's Arrow columns, and only an irregular answer builds them again.
        return EncodedRequest(
            encode_text(batch.rows, request_uuid), JSON_CONTENT_TYPE, request_uuid=request_uuid
        )

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> Results:
        """The answer's items: as Arrow columns when regular (see ``columnar``), else as
        objects; both checked against the rows sent (count, order by their echo)."""
        results = decode_text(body, len(batch), request.request_uuid or "")
        if batch.rows is None:
            return results
        columns = item_columns(results)
        if columns is not None:
            check_echo_columns(columns, batch.rows, batch.keys, _compare_echo)
            return columns
        records, sent = _records_and_columns(batch.rows)
        check_echo(results, records, batch.keys, sent)
        return results

    def classify_failure(
        self, status: int, body: bytes, retry_after: float | None = None
    ) -> RequestError:
        return classify_failure(status, body, retry_after)

    def probe_url(self, url: str) -> str | None:
        return None  # ModelArts has no route that says what a model expects

    def check_probe(self, status: int, body: bytes, schema: pa.Schema) -> None:
        return None


class FileCodec:
    """File input: the batch's one file as multipart/form-data; the answer object back.

    ``file_field`` is the form field (the model's input name); a request body is never
    larger than ``max_request_bytes`` (``batch.max_request_bytes``): a file that would make
    it larger is refused unsent.
    """

    def __init__(
        self,
        file_field: str = DEFAULT_FILE_FIELD,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.file_field = file_field
        self.max_request_bytes = max_request_bytes

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        """Read the file and build the form; ``RequestError`` if it is too large or unreadable."""
        path = batch.path
        if path is None:
            raise ValueError("file input needs a file: this batch carries rows")
        name = path.name
        form = file_part(self.file_field, name, choose_boundary(request_uuid, b""))
        content = read_file(path, self.max_request_bytes - form.envelope_bytes)
        boundary = choose_boundary(request_uuid, content)
        if boundary != form.boundary:  # the file holds the first choice: rebuild
            form = file_part(self.file_field, name, boundary)
        body = form.body(content)
        if len(body) > self.max_request_bytes:  # only a longer boundary can get here
            raise too_large(len(content), self.max_request_bytes - form.envelope_bytes)
        preview = (
            form.head.decode("utf-8", errors="replace")
            + f"<{len(content):,} bytes of {name}>"
            + form.tail.decode("ascii")
        ).replace("\r\n", "\n")
        return EncodedRequest(body, form.content_type, request_uuid=None, preview=preview)

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> list[dict[str, Any]]:
        """The answer's JSON object, as it came, as the one result of the file."""
        return [decode_file(body)]

    def classify_failure(
        self, status: int, body: bytes, retry_after: float | None = None
    ) -> RequestError:
        return classify_failure(status, body, retry_after)

    def probe_url(self, url: str) -> str | None:
        return None

    def check_probe(self, status: int, body: bytes, schema: pa.Schema) -> None:
        return None


def decode_file(body: bytes) -> dict[str, Any]:
    """The result of a 2xx file-input answer: the whole JSON object, fields untouched."""
    document = _parse_json(body, 200)
    if not isinstance(document, dict):
        raise _bad_response(
            f"the answer is {_a(document)}, not a JSON object; file input answers one object "
            "per file"
        )
    return document


def _parse_json(body: bytes, status: int) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError(
            f"HTTP {status} with a body that is not JSON: {_snippet(body)}",
            kind=ErrorKind.NOT_JSON,
            # A gateway's error page or a cut-off body: another try usually gets through.
            retryable=True,
            http_status=status,
        ) from None


def _error_fields(body: bytes) -> tuple[str | None, str | None]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        snippet = _snippet(body)
        return None, f"non-JSON body: {snippet}" if snippet else None
    if not isinstance(document, dict):
        return None, _snippet(body)
    code = document.get("error_code")
    detail = document.get("error_msg") or document.get("message")
    return (str(code) if code else None), (str(detail) if detail else None)


def _snippet(body: bytes, limit: int = 160) -> str:
    text = body.decode("utf-8", errors="replace")
    text = re.sub(r"<[^>]*>", " ", text)  # an HTML error page: keep its words
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _keys(document: Any) -> str:
    if isinstance(document, dict):
        return ", ".join(map(str, document)) or "none"
    return f"not an object but {_a(document)}"


def _a(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _bad_response(message: str, *, row_specific: bool = False) -> RequestError:
    return RequestError(
        message,
        kind=ErrorKind.BAD_RESPONSE,
        retryable=False,
        row_specific=row_specific,
        http_status=200,
    )
