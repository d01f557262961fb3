"""The Open Inference Protocol v2 (KServe v2, Triton, Seldon MLServer): tensors in and out.

Request (``POST .../v2/models/<name>/infer``)::

    {"id": <uuid>, "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [N, F],
                               "data": [row-major values]}],
     "outputs": [{"name": ...}]}            # only when [service.oip] outputs is set

The ``tensor`` layout sends the columns as one ``[N, F]`` tensor (they must share a numeric
type); the ``columns`` layout sends one ``[N]`` tensor per column, named after it, with the
request parameter ``content_type = "pd"`` that tells MLServer to read them as a table (text
goes as BYTES). Both are built from Arrow in bulk: numpy stacks the columns and orjson
writes the array.

Answer: ``{"id": ..., "outputs": [{"name", "datatype", "shape", "data"}]}``. Each output
must have ``N`` rows (``shape[0]``) and as many values as its shape says; one of ``[N]`` or
``[N, 1]`` becomes a scalar column named after it, ``[N, k]`` a list column. An ``id`` other
than the request's, a missing requested output or a wrong length fails the batch.

``validate`` reads the model's metadata (``GET .../v2/models/<name>``): its inputs' names,
datatypes and shapes are checked against the columns sent.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from batchrunner.errors import ErrorKind, RequestError
from batchrunner.items import Batch
from batchrunner.protocols import EncodedRequest
from batchrunner.protocols.answers import (
    bad_response,
    build_rows,
    classify_failure,
    kind_of_value,
    mismatch,
    parse_answer,
)

JSON_CONTENT_TYPE = "application/json"
TENSOR = "tensor"
COLUMNS = "columns"

_DATATYPES: dict[pa.DataType, str] = {
    pa.bool_(): "BOOL",
    pa.int8(): "INT8",
    pa.int16(): "INT16",
    pa.int32(): "INT32",
    pa.int64(): "INT64",
    pa.uint8(): "UINT8",
    pa.uint16(): "UINT16",
    pa.uint32(): "UINT32",
    pa.uint64(): "UINT64",
    pa.float16(): "FP16",
    pa.float32(): "FP32",
    pa.float64(): "FP64",
    pa.string(): "BYTES",
    pa.large_string(): "BYTES",
}


def datatype_of(arrow_type: pa.DataType) -> str | None:
    """The OIP datatype of an Arrow type (FP64, INT64, BOOL, BYTES, ...), None if none fits."""
    return _DATATYPES.get(arrow_type)


def default_layout(schema: pa.Schema) -> str:
    """``tensor`` when the columns share one numeric type, else ``columns``."""
    types = set(schema.types)
    if len(types) == 1 and datatype_of(schema.types[0]) not in (None, "BYTES"):
        return TENSOR
    return COLUMNS


def metadata_url(url: str) -> str:
    """The model's metadata URL of an inference URL (``.../infer`` left out)."""
    return re.sub(r"/infer/?$", "", url.split("?", 1)[0])


class OipCodec:
    """Batches as OIP v2 tensors; the answer's output tensors back as result columns."""

    def __init__(
        self,
        *,
        layout: str | None = None,
        input_name: str = "input-0",
        outputs: tuple[str, ...] | None = None,
        content_type: str | None = "pd",
    ) -> None:
        self.layout = layout
        self.input_name = input_name
        self.outputs = outputs
        self.content_type = content_type

    def layout_for(self, schema: pa.Schema) -> str:
        """The layout this codec sends ``schema``'s columns in."""
        return self.layout or default_layout(schema)

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        rows = batch.rows
        if rows is None:
            raise ValueError("oip-v2 sends rows: this batch carries a file")
        _refuse_nulls(rows)
        body: dict[str, Any] = {"id": request_uuid}
        if self.layout_for(rows.schema) == TENSOR:
            body["inputs"] = [self._tensor(rows)]
        else:
            body["inputs"] = [
                _column(name, column)
                for name, column in zip(rows.schema.names, rows.columns, strict=True)
            ]
            if self.content_type:
                body["parameters"] = {"content_type": self.content_type}
        if self.outputs:
            body["outputs"] = [{"name": name} for name in self.outputs]
        return EncodedRequest(
            orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
            JSON_CONTENT_TYPE,
            request_uuid=request_uuid,
        )

    def _tensor(self, rows: pa.RecordBatch) -> dict[str, Any]:
        types = set(rows.schema.types)
        datatype = datatype_of(rows.schema.types[0]) if len(types) == 1 else None
        if datatype is None or datatype == "BYTES":
            described = ", ".join(f"{f.name} ({f.type})" for f in rows.schema)
            raise RequestError(
                f'service.oip.layout = "tensor" needs columns of one numeric type; these are '
                f'{described}: use layout = "columns"',
                kind=ErrorKind.REQUEST_UNFIT,
                retryable=False,
            )
        matrix = np.column_stack([column.to_numpy(zero_copy_only=False) for column in rows.columns])
        return {
            "name": self.input_name,
            "datatype": datatype,
            "shape": [rows.num_rows, rows.num_columns],
            "data": matrix.ravel(),
        }

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> list[dict[str, Any]]:
        document = parse_answer(body)
        if not isinstance(document, dict) or not isinstance(document.get("outputs"), list):
            raise bad_response(f"the answer has no outputs list (it is {_describe(document)})")
        echoed = document.get("id")
        request_uuid = request.request_uuid
        if echoed not in (None, "") and echoed != request_uuid:
            raise bad_response(
                f"id {echoed!r} does not match the request's {request_uuid!r}: "
                "the answer belongs to another request"
            )
        expected = len(batch)
        names: list[str] = []
        columns: list[list[Any]] = []
        for position, output in enumerate(document["outputs"]):
            name, column = _output_column(output, position, expected)
            if self.outputs and name not in self.outputs:
                continue
            names.append(name)
            columns.append(column)
        missing = [name for name in self.outputs or () if name not in names]
        if missing:
            raise bad_response(
                f"the answer lacks the requested output(s) {', '.join(missing)} "
                f"(it has {', '.join(names) or 'none'})"
            )
        if not names:
            raise bad_response("the answer has no outputs")
        return build_rows(names, columns)

    def classify_failure(
        self, status: int, body: bytes, retry_after: float | None = None
    ) -> RequestError:
        return classify_failure(status, body, retry_after)

    def probe_url(self, url: str) -> str | None:
        return metadata_url(url)

    def check_probe(self, status: int, body: bytes, schema: pa.Schema) -> None:
        """Check the model's metadata (its ``inputs``) against the columns sent."""
        if status != 200:
            raise classify_failure(status, body)
        document = parse_answer(body)
        inputs = document.get("inputs") if isinstance(document, dict) else None
        if not isinstance(inputs, list) or not inputs:
            return  # the server does not say (MLServer without declared inputs)
        declared = {str(item.get("name")): item for item in inputs if isinstance(item, dict)}
        if self.layout_for(schema) == TENSOR:
            ours_type = datatype_of(schema.types[0])
            spec = declared.get(self.input_name)
            if spec is None:
                raise mismatch(
                    "service.oip.input_name",
                    f"inputs {', '.join(declared)}",
                    f"one tensor named {self.input_name!r}",
                )
            shape = spec.get("shape")
            features = shape[-1] if isinstance(shape, list) and len(shape) >= 2 else None
            if isinstance(features, int) and features > 0 and features != len(schema):
                raise mismatch(
                    "input.columns",
                    f"{features} features in {self.input_name!r} (shape {shape})",
                    f"{len(schema)} columns ({', '.join(schema.names)})",
                )
            theirs = spec.get("datatype")
            if theirs and ours_type and theirs != ours_type:
                raise mismatch(
                    "input.columns",
                    f"{self.input_name!r} as {theirs}",
                    f"{ours_type} ({schema.types[0]} columns)",
                )
            return
        names = set(schema.names)
        absent = [name for name in declared if name not in names]
        extra = [name for name in schema.names if name not in declared]
        if absent or extra:
            raise mismatch(
                "input.columns",
                f"inputs {', '.join(declared)}",
                f"columns {', '.join(schema.names)}",
            )
        for field in schema:
            theirs = declared[field.name].get("datatype")
            ours = datatype_of(field.type)
            if theirs and ours and theirs != ours:
                raise mismatch(
                    f"input column {field.name!r}", f"{theirs}", f"{ours} ({field.type})"
                )


def _column(name: str, column: pa.Array) -> dict[str, Any]:
    datatype = datatype_of(column.type)
    if datatype is None:
        raise RequestError(
            f"column {name!r} is {column.type}, which has no Open Inference Protocol datatype",
            kind=ErrorKind.REQUEST_UNFIT,
            retryable=False,
        )
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [len(column)]}
    if datatype == "BYTES":
        tensor["parameters"] = {"content_type": "str"}
        tensor["data"] = column.to_pylist()
    else:
        tensor["data"] = column.to_numpy(zero_copy_only=False)
    return tensor


def _refuse_nulls(rows: pa.RecordBatch) -> None:
    named = zip(rows.schema.names, rows.columns, strict=True)
    nulls = [name for name, column in named if column.null_count]
    if nulls:
        # A tensor has no place for a missing value: the row to blame is found by splitting.
        raise RequestError(
            f"a value is missing in {', '.join(nulls)}: a tensor cannot carry it",
            kind=ErrorKind.MISSING_VALUE,
            retryable=False,
            row_specific=True,
        )


def _output_column(output: Any, position: int, expected: int) -> tuple[str, list[Any]]:
    if not isinstance(output, dict):
        raise bad_response(f"outputs[{position}] is {kind_of_value(output)}, not an object")
    name, shape, data = output.get("name"), output.get("shape"), output.get("data")
    if not isinstance(name, str) or not name:
        raise bad_response(f"outputs[{position}] has no name")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(type(size) is int and size >= 0 for size in shape)
    ):
        raise bad_response(f"output {name!r} has no valid shape (got {shape!r})")
    if shape[0] != expected:
        raise bad_response(
            f"output {name!r} has shape {shape} for {expected} rows sent; "
            "results cannot be matched to rows",
            row_specific=True,
        )
    if not isinstance(data, list):
        raise bad_response(f"output {name!r} has no data list")
    width = math.prod(shape[1:])
    flat = data if not data or not isinstance(data[0], list) else _flatten(data)
    if len(flat) != expected * width:
        raise bad_response(
            f"output {name!r} has {len(flat)} values where its shape {shape} says "
            f"{expected * width}; results cannot be matched to rows"
        )
    if width == 1:
        return name, flat
    if output.get("datatype") == "BYTES" or not flat or isinstance(flat[0], str):
        return name, [flat[i : i + width] for i in range(0, len(flat), width)]
    return name, np.asarray(flat).reshape(expected, width).tolist()


def _flatten(data: list[Any]) -> list[Any]:
    array = np.asarray(data, dtype=object)
    return list(array.ravel()) if array.ndim > 1 else list(data)


def _describe(document: Any) -> str:
    if isinstance(document, dict):
        return "an object with " + (", ".join(map(str, document)) or "no keys")
    return kind_of_value(document)
