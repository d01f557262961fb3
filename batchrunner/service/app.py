"""The embedded reference service: an aiohttp.web application that speaks the protocol of
``PROTOCOL.md`` in front of a model from ``models.py``, and the ways to run it.

It answers like the real gateway does, so that the client is tested against the real HTTP
path: ``POST /v1/infers/<service-id>[/<anything>]``, the token in ``X-Auth-Token`` (or
``Authorization: Bearer``, as OpenAI-compatible clients send it), and
errors as gateway JSON ``{"error_code": ..., "error_msg": ..., "request_id": <uuid hex>}``.
Every response carries the same id in ``X-Request-Id``. A text model takes text input,
``{"meta": {"uuid": ...}, "data": {"req_data": [...]}}``; a file model takes file input,
one file as multipart/form-data under the model's input name (``curl -F 'images=@x.png'``)
and answers the model's JSON object.

Error codes (status, code, when):

    401 APIG.0301        X-Auth-Token missing, wrong, or expired ("token expires")
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

With an IAM account in its options, the service also answers IAM's password login at
``POST /v3/auth/tokens`` (see ``service.iam``): 201 with the token in ``X-Subject-Token``
and ``{"token": {"expires_at": ...}}``; the inference routes then accept every issued
token until ``token_ttl`` seconds after its issue, besides the fixed token. Its errors
(codes our choice; the body is the gateway's, as IAM's is):

    400 IAM.0001         the body is not a password login
    401 IAM.0002         wrong user name, password or domain, or a project not the account's

Fault injection (latency, 429 above a capacity, 503s, dropped connections, HTML 502 pages)
belongs in a middleware passed as ``extra_middlewares``: they run after the request is
counted and before authentication, where a gateway's own throttling and failures happen.
Such a middleware raises :class:`GatewayError` for a JSON error, or returns its own
response (an HTML page) as it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
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

from batchrunner.service.iam import (
    IamAccount,
    TokenRegistry,
    login_fails,
    parse_login,
    token_document,
)
from batchrunner.service.llm import add_openai_routes
from batchrunner.service.models import FileModel, ModelInputError, TextModel
from batchrunner.service.registry import load_model
from batchrunner.service.wire import PATHS, add_routes

DEFAULT_MAX_BODY_BYTES = 12 * 1024 * 1024  # the gateway's limit through the API URL
MAX_UUID_CHARS = 64
# A file this small is scored on the event loop: decoding it takes less than handing it
# to a worker thread and back.
_INLINE_FILE_BYTES = 64 * 1024

TOKEN_HEADER = "X-Auth-Token"
SUBJECT_TOKEN_HEADER = "X-Subject-Token"
REQUEST_ID_HEADER = "X-Request-Id"
IAM_PATH = "/v3/auth/tokens"
_IAM_ROUTE = "iam-tokens"
DEFAULT_TOKEN_TTL_S = 24 * 3600.0  # the real IAM's

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
    logins: int = 0  # IAM logins that got a token
    logins_refused: int = 0
    expired_tokens: int = 0  # requests refused because their token had expired


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


def _make_auth_middleware(tokens: TokenRegistry, stats: ServiceStats) -> Middleware:
    """Refuse requests without a good token; unknown paths fall through to 404/405."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A path that matches no API has no token to check: the gateway says 404 first.
        # The IAM login is how a token is got: it needs none.
        if request.match_info.http_exception is not None or (
            request.match_info.route.name == _IAM_ROUTE
        ):
            return await handler(request)
        reason = tokens.refusal(request.headers.get(TOKEN_HEADER) or _bearer(request))
        if reason is None:
            return await handler(request)
        if reason == "token expires":
            stats.expired_tokens += 1
        # Never echo the given token: it may be a real one meant for another service.
        raise GatewayError(401, "APIG.0301", f"Incorrect IAM authentication information: {reason}")

    return authenticate


def _bearer(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header (how OpenAI-compatible clients
    send theirs), else None."""
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


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


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """How the embedded service runs: its model, the tokens it accepts, its limits.

    ``token`` is a fixed token the inference routes accept (``start_service`` makes a
    random one when it is None). With ``iam``, the service also answers IAM logins for
    that account, and accepts the tokens it issues for ``token_ttl`` seconds. ``clock`` is
    the wall clock tokens expire by; tests inject their own.
    """

    model: str = "iris"
    token: str | None = None
    iam: IamAccount | None = None
    token_ttl: float = DEFAULT_TOKEN_TTL_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    clock: Callable[[], float] = time.time
    # The protocol whose URL the running service hands out (every protocol is served).
    protocol: str = "modelarts"


TOKENS_KEY = web.AppKey("batchrunner_service_tokens", TokenRegistry)


def create_app(
    options: ServiceOptions, *, extra_middlewares: Sequence[Middleware] = ()
) -> web.Application:
    """Build the service ``options`` describe; ``options.token`` must be set.

    ``extra_middlewares`` run, in order, after the request is counted and before the
    token is checked (on every route, the IAM login included): the place for fault
    injection. Raises ValueError for an unknown model, a missing or empty token, a
    ``max_body_bytes`` below 1 or a ``token_ttl`` not above 0.
    """
    if not options.token:
        raise ValueError("the service token must not be empty")
    if options.max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {options.max_body_bytes}")
    if not options.token_ttl > 0:
        raise ValueError(f"token_ttl must be > 0 seconds, got {options.token_ttl}")
    if options.protocol != "modelarts" and options.protocol not in PATHS:
        raise ValueError(f"unknown protocol {options.protocol!r}")
    model = load_model(options.model)
    if options.protocol != "modelarts" and not isinstance(model, TextModel):
        raise ValueError(
            f"the model {options.model!r} takes files: it speaks protocol 'modelarts' only"
        )
    stats = ServiceStats()
    tokens = TokenRegistry(options.token, options.token_ttl, options.clock)
    max_body_bytes = options.max_body_bytes
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[
            _make_gateway_middleware(stats, max_body_bytes),
            *extra_middlewares,
            _make_auth_middleware(tokens, stats),
        ],
    )
    app[STATS_KEY] = stats
    app[TOKENS_KEY] = tokens
    handler = (
        _make_text_handler(model, stats, max_body_bytes)
        if isinstance(model, TextModel)
        else _make_file_handler(model, stats, max_body_bytes)
    )
    app.router.add_post("/v1/infers/{service_id}", handler)
    app.router.add_post("/v1/infers/{service_id}/{tail:.*}", handler)
    if isinstance(model, TextModel):  # the other protocols carry rows: see ``wire``

        def count(records: list[dict[str, Any]]) -> None:
            stats.rows_scored += len(records)

        add_routes(app, model, count)

        def count_rows(rows: int) -> None:
            stats.rows_scored += rows

        add_openai_routes(app, count_rows)
    if options.iam is not None:
        app.router.add_post(
            IAM_PATH, _make_login_handler(options.iam, tokens, stats), name=_IAM_ROUTE
        )
    return app


class RunningService:
    """A service listening on a port of this event loop; close it (or use ``async with``).

    ``url`` is the inference URL to give a client, ``token`` the fixed one it may send;
    ``iam_url`` is the IAM token endpoint (None without an IAM account).
    """

    def __init__(
        self,
        runner: web.AppRunner,
        url: str,
        options: ServiceOptions,
        iam_url: str | None,
        app: web.Application,
    ) -> None:
        self._runner = runner
        self.url = url
        self.options = options
        self.iam_url = iam_url
        self.stats = app[STATS_KEY]
        self._tokens = app[TOKENS_KEY]

    @property
    def token(self) -> str:
        assert self.options.token is not None  # start_service always sets one
        return self.options.token

    @property
    def issued_tokens(self) -> tuple[str, ...]:
        """The IAM tokens issued so far (for tests that look for leaks)."""
        return self._tokens.issued

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
    options: ServiceOptions | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_middlewares: Sequence[Middleware] = (),
    access_log: bool = False,
) -> RunningService:
    """Start the service ``options`` describe (default: iris) on the running event loop.

    ``port=0`` takes a free port (give ``host`` as an IP address then: a name that resolves
    to several addresses would get a different free port on each). A ``token`` of None in
    the options becomes a random one. The service id in the URL is the model name. Raises
    ValueError for bad options and OSError when the address cannot be bound.
    """
    options = options or ServiceOptions()
    if options.token is None:
        options = dataclasses.replace(options, token=secrets.token_urlsafe(32))
    app = create_app(options, extra_middlewares=extra_middlewares)
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
    base = f"http://{url_host}:{bound_port}"
    iam_url = base + IAM_PATH if options.iam is not None else None
    path = PATHS.get(options.protocol, "/v1/infers/{name}").format(name=options.model)
    return RunningService(runner, base + path, options, iam_url, app)


async def run_service(
    options: ServiceOptions,
    host: str,
    port: int,
    on_ready: Callable[[RunningService], None] | None = None,
    *,
    extra_middlewares: Sequence[Middleware] = (),
) -> None:
    """Serve until cancelled; call ``on_ready(service)`` once listening. The body of ``serve``."""
    service = await start_service(
        options, host=host, port=port, access_log=True, extra_middlewares=extra_middlewares
    )
    async with service:
        if on_ready is not None:
            on_ready(service)
        await asyncio.Event().wait()  # forever: only cancellation ends a server


def serve(
    options: ServiceOptions,
    host: str,
    port: int,
    on_ready: Callable[[RunningService], None] | None = None,
    *,
    extra_middlewares: Sequence[Middleware] = (),
) -> None:
    """Run the service in the foreground (``batchrunner serve``) until Ctrl-C.

    Blocks; calls ``on_ready(service)`` once listening. Ctrl-C closes the service, then
    raises KeyboardInterrupt for the caller to turn into an exit code. Never prints.
    """
    asyncio.run(run_service(options, host, port, on_ready, extra_middlewares=extra_middlewares))
