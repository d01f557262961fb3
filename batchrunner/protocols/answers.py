"""What the JSON protocols other than ModelArts share: their error answers, their answers'
shapes, and where ``validate`` asks a server what it expects.

``classify_failure`` reads a non-2xx answer of KServe, MLServer, Triton, MLflow or a custom
JSON service into a ``RequestError``: 401/403 stop the run (the token is refused), 429 and
5xx are retried, 400/413/422 (a request the model refused for its content) split the batch
so that the row to blame is found. A 500 is both: these servers answer 500 when the model's
own code raises (MLServer's scikit-learn runtime on a value it cannot convert, KServe on an
exception that is not ``InvalidInput``), so a 500 that persists through the retries splits
the batch too. The servers' documented bodies give the detail:
``{"error": "..."}`` (KServe v1 and v2, MLServer, Triton), ``{"error_code": ...,
"message": ...}`` (MLflow), ``{"detail": ...}`` (FastAPI's validation errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pyarrow as pa

from batchrunner.errors import ErrorKind, RequestError, SettingError, http_kind
from batchrunner.protocols.modelarts import (
    FATAL_STATUSES,
    RETRYABLE_STATUSES,
    ROW_SPECIFIC_STATUSES,
    _a,
    _bad_response,
    _parse_json,
    _record_builder,
    _snippet,
)

# The model's code raised: maybe a passing fault, maybe a row it cannot take.
MODEL_FAILED = 500

__all__ = [
    "bad_response",
    "build_rows",
    "classify_failure",
    "kind_of_value",
    "parse_answer",
    "scalar_rows",
    "values_of",
]


def classify_failure(status: int, body: bytes, retry_after: float | None = None) -> RequestError:
    """A ``RequestError`` for a non-2xx answer of a KServe, OIP, MLflow or JSON server."""
    text = f"HTTP {status}"
    detail = _detail(body)
    if detail:
        text += f": {detail}"
    if status in FATAL_STATUSES:
        return RequestError(
            f"{text} (the service refused the request's credentials: check the token)",
            kind=ErrorKind.AUTH,
            retryable=False,
            fatal=True,
            http_status=status,
        )
    retryable = status in RETRYABLE_STATUSES
    return RequestError(
        text,
        kind=http_kind(status),
        retryable=retryable,
        row_specific=status == MODEL_FAILED or (not retryable and status in ROW_SPECIFIC_STATUSES),
        http_status=status,
        retry_after=retry_after,
    )


def _detail(body: bytes) -> str | None:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        snippet = _snippet(body)
        return f"non-JSON body: {snippet}" if snippet else None
    if not isinstance(document, dict):
        return _snippet(body) or None
    code = document.get("error_code")
    detail = document.get("error") or document.get("message") or document.get("detail")
    if detail is not None and not isinstance(detail, str):
        detail = orjson.dumps(detail).decode()
    parts = [str(part) for part in (code, detail) if part]
    return _snippet(": ".join(parts).encode(), 300) if parts else _snippet(body) or None


def parse_answer(body: bytes) -> Any:
    """The JSON document of a 2xx answer; a body that is not JSON is retried."""
    return _parse_json(body, 200)


def bad_response(message: str, *, row_specific: bool = False) -> RequestError:
    """An answer whose shape does not fit the request: the batch fails, nothing shifts."""
    return _bad_response(message, row_specific=row_specific)


def kind_of_value(value: Any) -> str:
    """``a list``, ``an int``: a value's JSON kind, for messages."""
    return _a(value)


def values_of(rows: pa.RecordBatch) -> list[list[Any]]:
    """The rows as lists of values in column order, built column by column."""
    columns = [column.to_pylist() for column in rows.columns]
    return [list(values) for values in zip(*columns, strict=True)] if columns else []


def build_rows(names: Sequence[str], columns: Sequence[list[Any]]) -> list[dict[str, Any]]:
    """One object per row from equally long columns (``names[i]`` holds ``columns[i]``)."""
    return _record_builder(tuple(names))(list(columns))


def scalar_rows(results: list[Any], name: str) -> list[dict[str, Any]]:
    """One result per row: an object gives its fields, anything else a column ``name``.

    Objects and other values mixed in one answer are taken each as it is (the output's
    columns are merged by the sink).
    """
    kinds = set(map(type, results))
    if kinds == {dict}:
        return results
    if dict not in kinds:
        return [{name: value} for value in results]
    return [value if type(value) is dict else {name: value} for value in results]


def mismatch(setting: str, server: str, ours: str) -> SettingError:
    """``validate``'s word when the server expects other inputs than the job sends."""
    return SettingError(f"{setting}: the server expects {server}, but the job sends {ours}")
