"""The embedded reference service: an aiohttp.web application that speaks the protocol of
``PROTOCOL.md`` in front of a model from ``models.py``, and the ways to run it.

It answers like the real gateway does, so that the client is tested against the real HTTP
path: ``POST /v1/infers/<service-id>[/<anything>]``, the token in ``X-Auth-Token``, and
errors as gateway JSON ``{"error_code": ..., "error_msg": ..., "request_id": <uuid hex>}``.
Every response carries the same id in ``X-Request-Id``. A text model takes text input,
``{"meta": {"uuid": ...}, "data": {"req_data": [...]}}``; a file model takes file input,
one file as multipart/form-data under the model's input name (``curl -F 'images=@x.png'``)
and answers the model's JSON object.

Error codes (status, code, when):

    401 APIG.0301        X-Auth-Token missing or wrong (the gateway's code)
    404 APIG.0101        no such path (the gateway's "API does not exist")
    405 APIG.0101        a method other than POST (with `Allow: POST`)
    413 APIG.0201        body over ``max_body_bytes`` (the gateway's code and message)
    400 ModelArts.4101   body is not a JSON object, ``data.req_data`` is not a non-empty
                         list, ``meta`` is not an object or ``meta.uuid`` not a string of
                         at most 64 characters (our choice of code: the vendor documents
                         none for a malformed body); for a file model: the body is not
                         multipart/form-data, or holds no file (or more than one) under
                         the model's input name
    400 MR.0105          the model refused a record or a file (``ModelInputError``: e.g.
                         not a decodable image); the message is the model's own
    500 ModelArts.5000   the model's code failed unexpectedly (our choice; logged)
    4xx APIG.0<status>   any other error aiohttp itself raises keeps its status (our choice)

Fault injection (latency, 429 above a capacity, 503s, dropped connections, HTML 502 pages)
belongs in a middleware passed as ``extra_middlewares``: they run after the request is
counted and before authentication, where a gateway's own throttling and failures happen.
Such a middleware raises :class:`GatewayError` for a JSON error, or returns its own
response (an HTML page) as it is.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from aiohttp.typedefs import Handler, Middleware

from batchrunner.service.models import FileModel, ModelInputError, TextModel, load_model

DEFAULT_MAX_BODY_BYTES = 12 * 1024 * 1024  # the gateway's limit through the API URL
MAX_UUID_CHARS = 64
# A file this small is scored on the event loop: decoding it takes less than handing it
# to a worker thread and back.
_INLINE_FILE_BYTES = 64 * 1024

TOKEN_HEADER = "X-Auth-Token"
REQUEST_ID_HEADER = "X-Request-Id"

# Graceful shutdown waits this long for requests still in flight. Short: the embedded
# service lives inside a run or a test, and a stuck request must not hold up its end.
_SHUTDOWN_TIMEOUT_S = 2.0

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ServiceStats:
    """What the service has seen so far; mutated in place, read by tests and benchmarks.

    ``requests`` counts every request that reached the application (404s included);
    ``by_status`` counts the responses by HTTP status; ``rows_scored`` counts the records
    of successful requests. ``in_flight`` and ``max_in_flight`` show the concurrency a
    client really used.
    """

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    rows_scored: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


STATS_KEY = web.AppKey("batchrunner_service_stats", ServiceStats)


class GatewayError(Exception):
    """An error answer in the gateway's JSON, e.g. ``GatewayError(429, "APIG.0308", ...)``.

    Raise it from a handler or a middleware (a fault injector's 429 or 503, with a
    ``Retry-After`` in ``headers``); the outermost middleware renders it, request id and all.
    """

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _bad_request(message: str) -> GatewayError:
    return GatewayError(400, "ModelArts.4101", message)


def _too_large(max_body_bytes: int) -> GatewayError:
    return GatewayError(
        413, "APIG.0201", f"Request entity too large: the limit is {max_body_bytes} bytes"
    )


def _translate_http_exception(exc: web.HTTPException, max_body_bytes: int) -> GatewayError:
    """Turn aiohttp's own errors (router, body limit) into the gateway's JSON errors."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _too_large(max_body_bytes)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return GatewayError(
            405,
            "APIG.0101",
            f"Method {exc.method} is not allowed; use POST",
            {"Allow": ", ".join(sorted(exc.allowed_methods))},
        )
    if isinstance(exc, web.HTTPNotFound):
        return GatewayError(
            404, "APIG.0101", "The API does not exist or has not been published in the environment"
        )
    return GatewayError(exc.status, f"APIG.{exc.status:04d}", exc.reason)


def _error_response(error: GatewayError, request_id: str) -> web.Response:
    body = {"error_code": error.code, "error_msg": error.message, "request_id": request_id}
    response = web.Response(
        status=error.status, body=orjson.dumps(body), content_type="application/json"
    )
    response.headers.update(error.headers)
    return response


def _make_gateway_middleware(stats: ServiceStats, max_body_bytes: int) -> Middleware:
    """The outermost layer: counts every request and renders every error as gateway JSON."""

    @web.middleware
    async def gateway(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = uuid.uuid4().hex
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            try:
                response = await handler(request)
            except GatewayError as exc:
                response = _error_response(exc, request_id)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = _error_response(
                    _translate_http_exception(exc, max_body_bytes), request_id
                )
            except Exception:
                # A bug in a model or in this module: answer like a server, keep serving.
                logger.exception("request %s failed", request_id)
                response = _error_response(
                    GatewayError(500, "ModelArts.5000", "Internal error of the service"),
                    request_id,
                )
            response.headers[REQUEST_ID_HEADER] = request_id
            stats.by_status[response.status] += 1
            return response
        finally:
            stats.in_flight -= 1

    return gateway


def _make_auth_middleware(token: str) -> Middleware:
    """Refuse requests without the right token; unknown paths fall through to 404/405."""
    expected = token.encode("utf-8")

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A path that matches no API has no token to check: the gateway says 404 first.
        if request.match_info.http_exception is not None:
            return await handler(request)
        given = request.headers.get(TOKEN_HEADER)
        if given is None:
            reason = f"the {TOKEN_HEADER} header is missing"
        elif not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            reason = "the token is not valid"
        else:
            return await handler(request)
        # Never echo the given token: it may be a real one meant for another service.
        raise GatewayError(401, "APIG.0301", f"Incorrect IAM authentication information: {reason}")

    return authenticate


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


def create_app(
    model_name: str,
    token: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    extra_middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """Build the service for the model ``model_name``, guarded by ``token``.

    ``extra_middlewares`` run, in order, after the request is counted and before the
    token is checked: the place for fault injection. Raises ValueError for an unknown
    model, an empty token, or a ``max_body_bytes`` below 1.
    """
    if not token:
        raise ValueError("the service token must not be empty")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    model = load_model(model_name)
    stats = ServiceStats()
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[
            _make_gateway_middleware(stats, max_body_bytes),
            *extra_middlewares,
            _make_auth_middleware(token),
        ],
    )
    app[STATS_KEY] = stats
    handler = (
        _make_text_handler(model, stats, max_body_bytes)
        if isinstance(model, TextModel)
        else _make_file_handler(model, stats, max_body_bytes)
    )
    app.router.add_post("/v1/infers/{service_id}", handler)
    app.router.add_post("/v1/infers/{service_id}/{tail:.*}", handler)
    return app


class RunningService:
    """A service listening on a port of this event loop; close it (or use ``async with``).

    ``url`` is the inference URL to give a client, ``token`` the one it must send.
    """

    def __init__(self, runner: web.AppRunner, url: str, token: str, stats: ServiceStats) -> None:
        self._runner = runner
        self.url = url
        self._token = token
        self.stats = stats

    @property
    def token(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return f"<RunningService {self.url} token=***>"

    async def close(self) -> None:
        """Stop listening and finish (or, after a short grace, cut) requests in flight."""
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningService:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def start_service(
    model_name: str = "iris",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    extra_middlewares: Sequence[Middleware] = (),
    access_log: bool = False,
) -> RunningService:
    """Start the service for ``model_name`` on the running event loop.

    ``port=0`` takes a free port (give ``host`` as an IP address then: a name that resolves
    to several addresses would get a different free port on each). ``token=None`` makes a
    random one. The service id in the URL is the model name. Raises ValueError for an
    unknown model and OSError when the address cannot be bound.
    """
    if token is None:
        token = secrets.token_urlsafe(32)
    app = create_app(
        model_name, token, max_body_bytes=max_body_bytes, extra_middlewares=extra_middlewares
    )
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
    except BaseException:
        await runner.cleanup()
        raise
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{url_host}:{bound_port}/v1/infers/{model_name}"
    return RunningService(runner, url, token, app[STATS_KEY])


async def run_service(
    model_name: str,
    host: str,
    port: int,
    token: str,
    on_ready: Callable[[str], None] | None = None,
    extra_middlewares: Sequence[Middleware] = (),
) -> None:
    """Serve until cancelled; call ``on_ready(url)`` once listening. The body of ``serve``."""
    service = await start_service(
        model_name,
        host=host,
        port=port,
        token=token,
        access_log=True,
        extra_middlewares=extra_middlewares,
    )
    async with service:
        if on_ready is not None:
            on_ready(service.url)
        await asyncio.Event().wait()  # forever: only cancellation ends a server


def serve(
    model_name: str,
    host: str,
    port: int,
    token: str,
    on_ready: Callable[[str], None] | None = None,
    extra_middlewares: Sequence[Middleware] = (),
) -> None:
    """Run the service in the foreground (``batchrunner serve``) until Ctrl-C.

    Blocks; calls ``on_ready(url)`` once listening. Ctrl-C closes the service, then raises
    KeyboardInterrupt for the caller to turn into an exit code. Never prints.
    """
    asyncio.run(run_service(model_name, host, port, token, on_ready, extra_middlewares))
