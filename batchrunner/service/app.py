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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from batchrunner.service.gateway import (
    _IAM_ROUTE,
    STATS_KEY,
    ServiceStats,
    _make_auth_middleware,
    _make_gateway_middleware,
)
from batchrunner.service.handlers import (
    _make_file_handler,
    _make_login_handler,
    _make_text_handler,
)
from batchrunner.service.iam import IamAccount, TokenRegistry
from batchrunner.service.llm import add_openai_routes
from batchrunner.service.models import TextModel
from batchrunner.service.registry import load_model
from batchrunner.service.wire import PATHS, add_routes

DEFAULT_MAX_BODY_BYTES = 12 * 1024 * 1024  # the gateway's limit through the API URL
IAM_PATH = "/v3/auth/tokens"
DEFAULT_TOKEN_TTL_S = 24 * 3600.0  # the real IAM's

# Graceful shutdown waits this long for requests still in flight. Short: the embedded
# service lives inside a run or a test, and a stuck request must not hold up its end.
_SHUTDOWN_TIMEOUT_S = 2.0


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
