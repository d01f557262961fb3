"""``protocol = "openai-batch"``: the lines of an OpenAI batch file sent one by one.

Each line's ``body`` goes unchanged to its ``url`` on the service (``/v1/chat/completions``,
``/v1/embeddings``, ...): the ``/v1...`` end of ``service.url`` is replaced by it (the
client joins them). A line whose ``url`` is not such a path (another host, a
scheme, ``..``) or whose ``method`` is not POST fails unsent (kind ``request_unfit``): the
key never goes anywhere but the service.

The answer is kept whole: ``status_code`` and ``response_body`` (the answer's JSON text),
and ``prompt_tokens``/``completion_tokens`` from its usage. ``batch_output_line`` writes an
output row back in the batch API's output shape, ``{"custom_id", "response":
{"status_code", "body"}, "error"}``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from batchrunner.errors import RequestError
from batchrunner.items import Batch
from batchrunner.protocols import EncodedRequest
from batchrunner.protocols.answers import bad_response, parse_answer
from batchrunner.protocols.openai import (
    CHARS_PER_TOKEN,
    JSON_CONTENT_TYPE,
    OpenAIAnswers,
    usage_of,
)

# A path on the service: /v1/..., letters, digits and -_./: only, no "..".
_PATH = re.compile(r"/v1/[A-Za-z0-9_\-./:]+")
BATCH_OUTPUT_COLUMNS = ("status_code", "response_body", "prompt_tokens", "completion_tokens")


def _unfit(message: str) -> RequestError:
    return RequestError(message, kind="request_unfit", retryable=False)


class BatchFileCodec(OpenAIAnswers):
    """Each batch-file line's body to its url; the answer kept whole."""

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        rows = batch.rows
        if rows is None or rows.num_rows != 1:
            raise ValueError("protocol openai-batch sends one line a request")
        method = rows.column("method")[0].as_py()
        path = rows.column("url")[0].as_py()
        body = rows.column("body")[0].as_py()
        if method.upper() != "POST":
            raise _unfit(f"method {method!r}: only POST lines can be sent")
        if not _PATH.fullmatch(path) or ".." in path:
            raise _unfit(
                f"url {path[:80]!r} is not a path on the service such as /v1/chat/completions"
            )
        document = orjson.loads(body)
        limit = document.get("max_tokens") or document.get("max_completion_tokens") or 0
        estimate = math.ceil(len(body) / CHARS_PER_TOKEN) + (limit if type(limit) is int else 0)
        return EncodedRequest(
            body.encode(),
            JSON_CONTENT_TYPE,
            request_uuid=None,
            estimated_tokens=estimate,
            path=path,
        )

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> list[dict[str, Any]]:
        document = parse_answer(body)
        if not isinstance(document, dict):
            raise bad_response("the answer is not a JSON object")
        usage = usage_of(document)
        return [
            {
                "status_code": 200,
                "response_body": body.decode("utf-8", "replace"),
                "prompt_tokens": usage.prompt if usage else None,
                "completion_tokens": usage.completion if usage else None,
            }
        ]


def is_batch_output(path: Path) -> bool:
    """Whether the JSON-lines file at ``path`` is in the batch API's output shape."""
    with path.open("rb") as handle:
        first = handle.readline()
    try:
        document = orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return isinstance(document, dict) and set(document) == {"custom_id", "response", "error"}


def read_batch_output(path: Path) -> pa.Table:
    """A batch-shape output read back with batchrunner's columns (``_key``, ``_status``,
    ``_error``, ``_error_kind``, ``_http_status``, ``response_body``), for ``inspect``."""
    columns: dict[str, list[Any]] = {
        name: [] for name in ("_key", "_status", "_error", "_error_kind", "_http_status")
    }
    bodies: list[str | None] = []
    with path.open("rb") as handle:
        for text in handle:
            if not text.strip():
                continue
            line = orjson.loads(text)
            response, error = line.get("response") or {}, line.get("error")
            columns["_key"].append(line.get("custom_id"))
            columns["_status"].append("error" if error else "ok")
            columns["_error"].append(error.get("message") if error else None)
            columns["_error_kind"].append(error.get("code") if error else None)
            columns["_http_status"].append(response.get("status_code"))
            body = response.get("body")
            bodies.append(None if body is None else orjson.dumps(body).decode())
    statuses = columns.pop("_http_status")
    return pa.table(
        {
            **{name: pa.array(values, pa.string()) for name, values in columns.items()},
            "_http_status": pa.array(statuses, pa.int32()),
            "response_body": pa.array(bodies, pa.string()),
        }
    )


def batch_output_line(row: dict[str, Any]) -> bytes:
    """One output row in the batch API's output shape (a line, without its newline)."""
    ok = row.get("_status") == "ok"
    status = (row.get("status_code") if ok else None) or row.get("_http_status")
    body = row.get("response_body")
    response = None
    if status is not None:
        response = {
            "status_code": status,
            "body": orjson.Fragment(body) if ok and body else None,
        }
    error = None if ok else {"code": row.get("_error_kind"), "message": row.get("_error")}
    line = {"custom_id": row.get("_key"), "response": response, "error": error}
    return orjson.dumps(line)
