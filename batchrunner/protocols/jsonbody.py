"""``protocol = "json"``: a body shaped by the job, for any JSON service.

``[service.json] request`` is the body as a JSON value. In it, a string that is exactly
``"{column}"`` is that column's value with its JSON type; a longer string holding
``{column}`` is filled in as text (``"Classify: {text}"``); ``"{rows}"`` is the batch's rows
as a list of objects, ``"{values}"`` as a list of lists (column order). Without ``{rows}`` or
``{values}`` a request carries one row.

``response`` is a dotted path to the result in the answer (a number in it is a list index;
empty: the whole answer). With ``{rows}``/``{values}`` it must lead to a list exactly as long
as the batch. A result that is an object gives its fields as columns; anything else goes in
a column named after the path's last part, or ``result`` when the path is empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pyarrow as pa

from batchrunner.errors import ErrorKind, RequestError, SettingError
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
ROWS = "{rows}"
VALUES = "{values}"
DEFAULT_RESULT_COLUMN = "result"
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")

Row = dict[str, Any]
Filler = Callable[[Row, pa.RecordBatch], Any]


def placeholders(template: Any) -> set[str]:
    """The column names a request template refers to (``{rows}``/``{values}`` left out)."""
    if isinstance(template, str):
        return {name for name in _PLACEHOLDER.findall(template) if name not in ("rows", "values")}
    if isinstance(template, dict):
        return set().union(*map(placeholders, template.values())) if template else set()
    if isinstance(template, list):
        return set().union(*map(placeholders, template)) if template else set()
    return set()


def check_template(template: Any, columns: Sequence[str]) -> None:
    """Refuse a template naming a column that is not sent (a ``SettingError``)."""
    unknown = sorted(placeholders(template) - set(columns))
    if unknown:
        raise SettingError(
            f"service.json.request: {', '.join('{' + n + '}' for n in unknown)} "
            f"{'is not a column' if len(unknown) == 1 else 'are not columns'} of the input; "
            f"the columns sent are {', '.join(columns) or 'none'}"
        )


def _compile(template: Any) -> Filler:
    """A function that fills ``template`` for one row (or, with {rows}/{values}, the batch)."""
    if isinstance(template, str):
        if template == ROWS:
            return lambda row, rows: rows_to_records(rows)
        if template == VALUES:
            return lambda row, rows: values_of(rows)
        whole = _PLACEHOLDER.fullmatch(template)
        if whole:
            name = whole.group(1)
            return lambda row, rows: row[name]
        if _PLACEHOLDER.search(template):
            return lambda row, rows: _PLACEHOLDER.sub(lambda m: _text(row[m.group(1)]), template)
        return lambda row, rows: template
    if isinstance(template, dict):
        fields = [(key, _compile(value)) for key, value in template.items()]
        return lambda row, rows: {key: fill(row, rows) for key, fill in fields}
    if isinstance(template, list):
        items = [_compile(value) for value in template]
        return lambda row, rows: [fill(row, rows) for fill in items]
    return lambda row, rows: template


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=_json_default).decode()


def _path(path: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in path.split(".") if part]


class JsonCodec:
    """Bodies shaped by ``[service.json]``; the result found at ``response`` in the answer."""

    def __init__(self, request: Any, response: str = "", *, batched: bool) -> None:
        self.request = request
        self.response = response
        self.batched = batched
        self._fill = _compile(request)
        self._path = _path(response)
        last = self._path[-1] if self._path else None
        self._column = last if isinstance(last, str) else DEFAULT_RESULT_COLUMN

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        rows = batch.rows
        if rows is None:
            raise ValueError("protocol json sends rows: this batch carries a file")
        if not self.batched and rows.num_rows != 1:
            raise ValueError(f"a one-row JSON body got {rows.num_rows} rows")
        row = rows_to_records(rows)[0] if not self.batched else {}
        try:
            body = self._fill(row, rows)
        except KeyError as exc:
            raise RequestError(
                f"service.json.request names {{{exc.args[0]}}}, which is not a column sent",
                kind=ErrorKind.REQUEST_UNFIT,
                retryable=False,
            ) from None
        return EncodedRequest(
            orjson.dumps(body, default=_json_default), JSON_CONTENT_TYPE, request_uuid=None
        )

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> list[dict[str, Any]]:
        found = self._find(parse_answer(body))
        if not self.batched:
            return scalar_rows([found], self._column)
        if not isinstance(found, list):
            raise bad_response(
                f"the answer's {self.response or 'body'} is {kind_of_value(found)}, "
                "not a list of one result per row"
            )
        if len(found) != len(batch):
            raise bad_response(
                f"the answer's {self.response or 'body'} has {len(found)} items for "
                f"{len(batch)} rows sent; results cannot be matched to rows",
                row_specific=True,
            )
        return scalar_rows(found, self._column)

    def _find(self, document: Any) -> Any:
        node = document
        for depth, part in enumerate(self._path):
            where = ".".join(map(str, self._path[: depth + 1]))
            if isinstance(part, int) and isinstance(node, list) and part < len(node):
                node = node[part]
            elif isinstance(node, dict) and str(part) in node:
                node = node[str(part)]
            else:
                raise bad_response(
                    f"the answer has no {where} (service.json.response = {self.response!r})"
                )
        return node

    def classify_failure(
        self, status: int, body: bytes, retry_after: float | None = None
    ) -> RequestError:
        return classify_failure(status, body, retry_after)

    def probe_url(self, url: str) -> str | None:
        return None  # a custom service has no standard route that says what it takes

    def check_probe(self, status: int, body: bytes, schema: pa.Schema) -> None:
        return None
