"""The routes' handlers of the embedded service: inference on text input (a JSON body of
records) and on file input (one file as multipart/form-data), and IAM's password login."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from aiohttp.typedefs import Handler

from batchrunner.service.gateway import GatewayError, ServiceStats, _bad_request, _too_large
from batchrunner.service.iam import (
    IamAccount,
    TokenRegistry,
    login_fails,
    parse_login,
    token_document,
)
from batchrunner.service.models import FileModel, ModelInputError, TextModel

MAX_UUID_CHARS = 64
# A file this small is scored on the event loop: decoding it takes less than handing it
# to a worker thread and back.
_INLINE_FILE_BYTES = 64 * 1024

SUBJECT_TOKEN_HEADER = "X-Subject-Token"


def _make_login_handler(account: IamAccount, tokens: TokenRegistry, stats: ServiceStats) -> Handler:
    async def log_in(request: web.Request) -> web.StreamResponse:
        try:
            login = parse_login(await request.read())
        except ValueError as exc:
            raise GatewayError(400, "IAM.0001", str(exc)) from None
        refusal = login_fails(account, login)
        if refusal is not None:
            stats.logins_refused += 1
            raise GatewayError(401, "IAM.0002", refusal)
        token, issued_at, expires_at = tokens.issue()
        stats.logins += 1
        return web.Response(
            status=201,
            body=orjson.dumps(token_document(account, issued_at, expires_at)),
            content_type="application/json",
            headers={SUBJECT_TOKEN_HEADER: token},
        )

    return log_in


def _make_text_handler(model: TextModel, stats: ServiceStats, max_body_bytes: int) -> Handler:
    async def infer(request: web.Request) -> web.StreamResponse:
        # Refuse an announced oversize body before reading a byte of it; a body without
        # Content-Length (chunked) is cut by the Application's client_max_size instead.
        if request.content_length is not None and request.content_length > max_body_bytes:
            raise _too_large(max_body_bytes)
        raw = await request.read()
        meta_uuid, records = _parse_text_request(raw)
        try:
            # Synchronous on purpose: scoring is microseconds a record, and a real model
            # server is busy while it scores, too.
            results = model.predict(records)
        except ModelInputError as exc:
            raise GatewayError(400, "MR.0105", str(exc)) from exc
        if len(results) != len(records):
            raise RuntimeError(
                f"model {model.name!r} returned {len(results)} results for {len(records)} records"
            )
        stats.rows_scored += len(records)
        body = {"meta": {"uuid": meta_uuid}, "data": {"resp_data": results}}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    return infer


def _make_file_handler(model: FileModel, stats: ServiceStats, max_body_bytes: int) -> Handler:
    field = model.input_name
    how = (
        f"send one file as multipart/form-data under the form field '{field}' "
        f"(curl -F '{field}=@photo.png')"
    )

    async def infer(request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > max_body_bytes:
            raise _too_large(max_body_bytes)
        # The header itself, not request.content_type: aiohttp parses that with the email
        # package, a millisecond per request for the distinct boundary of each.
        content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
        mimetype = parse_mimetype(content_type)
        if (mimetype.type, mimetype.subtype) != ("multipart", "form-data"):
            given = f"{mimetype.type}/{mimetype.subtype}" if content_type else "no Content-Type"
            raise _bad_request(f"The model {model.name!r} takes file input, not {given}: {how}")
        filename, content = await _read_file_part(request, field, how, max_body_bytes)
        try:
            if len(content) <= _INLINE_FILE_BYTES:
                result = model.predict_file(filename, content)
            else:
                # Decoding a photo takes long enough to hold up every other request (and,
                # inside a run, the client on the same event loop): a worker thread does it.
                result = await asyncio.to_thread(model.predict_file, filename, content)
        except ModelInputError as exc:
            raise GatewayError(400, "MR.0105", str(exc)) from exc
        stats.rows_scored += 1
        return web.Response(body=orjson.dumps(result), content_type="application/json")

    return infer


async def _read_file_part(
    request: web.Request, field: str, how: str, max_body_bytes: int
) -> tuple[str, bytes]:
    """(file name, bytes) of the one part named ``field``; a 400 or 413 if there is not
    exactly one, or the body is malformed or too large (counted as it streams in: a
    chunked body has no Content-Length to refuse up front)."""
    found: tuple[str, bytes] | None = None
    others: list[str] = []
    received = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _bad_request(f"A form part holds a nested multipart body: {how}")
            # Parsed once here: aiohttp's part.name and part.filename parse the header anew.
            _, params = parse_content_disposition(part.headers.get(hdrs.CONTENT_DISPOSITION))
            name = content_disposition_filename(params, "name")
            chunks: list[bytes] = []
            while chunk := await part.read_chunk():
                received += len(chunk)
                if received > max_body_bytes:
                    raise _too_large(max_body_bytes)
                if name == field:
                    chunks.append(chunk)
            if name != field:
                others.append(repr(name))
            elif found is not None:
                raise _bad_request(f"The form holds more than one '{field}' file: {how}")
            else:
                filename = content_disposition_filename(params, "filename") or ""
                found = (filename, b"".join(chunks))
    except ValueError as exc:  # aiohttp's word for a malformed multipart body
        raise _bad_request(f"The multipart body is malformed ({exc}): {how}") from exc
    if found is None:
        held = f"its fields are {', '.join(others)}" if others else "it is empty"
        raise _bad_request(f"The form holds no '{field}' file ({held}): {how}")
    return found


def _parse_text_request(raw: bytes) -> tuple[str, list[dict[str, Any]]]:
    """Return (meta.uuid or "", data.req_data) of a text-input body; raise a 400 if unfit."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad_request(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _bad_request("The request body must be a JSON object with a 'data' object")
    data = body.get("data")
    if not isinstance(data, dict):
        raise _bad_request("The request body lacks the 'data' object")
    records = data.get("req_data")
    if not isinstance(records, list):
        raise _bad_request("'data.req_data' must be a list of records")
    if not records:
        raise _bad_request("'data.req_data' is empty: send at least one record")
    meta = body.get("meta")
    meta_uuid = ""
    if meta is not None:
        if not isinstance(meta, dict):
            raise _bad_request("'meta' must be an object")
        given = meta.get("uuid")
        if given is not None:
            if not isinstance(given, str) or len(given) > MAX_UUID_CHARS:
                raise _bad_request(
                    f"'meta.uuid' must be a string of at most {MAX_UUID_CHARS} characters"
                )
            meta_uuid = given
    return meta_uuid, records
