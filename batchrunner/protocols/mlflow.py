"""MLflow's scoring server: ``POST /invocations`` with a ``dataframe_split`` body.

Request: ``{"dataframe_split": {"columns": [...], "data": [[...], ...]}}``, the rows' values
in column order. Answer: ``{"predictions": [...]}``, exactly one per row; scalars give a
``prediction`` column, objects (a model that returns a table) their fields. A wrong count
fails the batch. MLflow's errors are ``{"error_code": "BAD_REQUEST", "message": ...}``.

``validate`` asks ``GET /ping`` (200 when the model is loaded).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pyarrow as pa

from batchrunner.errors import RequestError
from batchrunner.items import Batch
from batchrunner.protocols import EncodedRequest
from batchrunner.protocols.answers import classify_failure, values_of
from batchrunner.protocols.kserve import decode_predictions
from batchrunner.protocols.modelarts import _json_default

JSON_CONTENT_TYPE = "application/json"


def ping_url(url: str) -> str:
    """``/ping`` beside the ``/invocations`` URL."""
    return re.sub(r"/invocations/?$", "", url.split("?", 1)[0]) + "/ping"


class MlflowCodec:
    """Rows as a ``dataframe_split``; the ``predictions`` back."""

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        rows = batch.rows
        if rows is None:
            raise ValueError("mlflow sends rows: this batch carries a file")
        frame = {"columns": rows.schema.names, "data": values_of(rows)}
        body = orjson.dumps({"dataframe_split": frame}, default=_json_default)
        return EncodedRequest(body, JSON_CONTENT_TYPE, request_uuid=None)

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> list[dict[str, Any]]:
        return decode_predictions(body, len(batch))

    def classify_failure(
        self, status: int, body: bytes, retry_after: float | None = None
    ) -> RequestError:
        return classify_failure(status, body, retry_after)

    def probe_url(self, url: str) -> str | None:
        return ping_url(url)

    def check_probe(self, status: int, body: bytes, schema: pa.Schema) -> None:
        if status != 200:
            raise classify_failure(status, body)
