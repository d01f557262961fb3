"""KServe's v1 protocol (also TensorFlow Serving's row format): instances -> predictions.

Request (``POST .../v1/models/<name>:predict``): ``{"instances": [[f1, f2, ...], ...]}``,
each row its values in column order, or with ``[service.kserve] instance_format =
"records"`` each row an object of its columns. Answer: ``{"predictions": [...]}``, exactly
one per instance; a prediction that is an object gives its fields as columns, anything else
(a label, a number, a list of scores) a ``prediction`` column. A wrong count fails the batch.

``validate`` asks ``GET .../v1/models/<name>`` whether the model is ready.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pyarrow as pa

from batchrunner.errors import RequestError, SettingError
from batchrunner.items import Batch
from batchrunner.protocols import EncodedRequest
from batchrunner.protocols.answers import (
    bad_response,
    classify_failure,
    kind_of_value,
    parse_answer,
    scalar_rows,
    values_of,
)
from batchrunner.protocols.modelarts import _json_default, rows_to_records

JSON_CONTENT_TYPE = "application/json"
PREDICTION_COLUMN = "prediction"


def model_url(url: str) -> str:
    """The model's status URL of a ``:predict`` URL."""
    return re.sub(r":predict/?$", "", url.split("?", 1)[0])


def decode_predictions(body: bytes, expected: int) -> list[dict[str, Any]]:
    """The ``predictions`` of an answer, one result object per row, checked for length."""
    document = parse_answer(body)
    predictions = document.get("predictions") if isinstance(document, dict) else None
    if not isinstance(predictions, list):
        raise bad_response(
            f"the answer has no predictions list (it is {kind_of_value(document)}"
            + (f" with {', '.join(map(str, document))}" if isinstance(document, dict) else "")
            + ")"
        )
    if len(predictions) != expected:
        raise bad_response(
            f"predictions has {len(predictions)} items for {expected} rows sent; "
            "results cannot be matched to rows",
            row_specific=True,
        )
    return scalar_rows(predictions, PREDICTION_COLUMN)


class KServeCodec:
    """Rows as KServe v1 ``instances``; its ``predictions`` back."""

    def __init__(self, *, instance_format: str = "values") -> None:
        self.instance_format = instance_format

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        rows = batch.rows
        if rows is None:
            raise ValueError("kserve-v1 sends rows: this batch carries a file")
        instances = rows_to_records(rows) if self.instance_format == "records" else values_of(rows)
        body = orjson.dumps({"instances": instances}, default=_json_default)
        # v1 has no request id in the body: the answer is matched by its connection alone.
        return EncodedRequest(body, JSON_CONTENT_TYPE, request_uuid=None)

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> list[dict[str, Any]]:
        return decode_predictions(body, len(batch))

    def classify_failure(
        self, status: int, body: bytes, retry_after: float | None = None
    ) -> RequestError:
        return classify_failure(status, body, retry_after)

    def probe_url(self, url: str) -> str | None:
        return model_url(url)

    def check_probe(self, status: int, body: bytes, schema: pa.Schema) -> None:
        """The model must exist and say it is ready (``{"name": ..., "ready": true}``)."""
        if status == 404:
            raise SettingError("service.url: the server has no such model (HTTP 404)")
        if status != 200:
            raise classify_failure(status, body)
        document = parse_answer(body)
        if isinstance(document, dict) and document.get("ready") is False:
            raise SettingError(
                f"service.url: the server says model {document.get('name')!r} is not ready"
            )
