"""Small purpose-built HTTP servers for tests, and the embedded service: real aiohttp servers
on loopback, each in a thread of its own (the command under test runs its own event loop in
the main thread)."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from batchrunner.service import RunningService, ServiceOptions, ServiceStats, start_service

Handler = Callable[["Call"], Awaitable[web.StreamResponse]]


@dataclass
class Call:
    """One request the server received: its number (from 0), headers and parsed body."""

    number: int
    headers: dict[str, str]
    body: Any
    request: web.Request


@dataclass
class ThreadedServer:
    handler: Handler
    path: str = "/v1/infers/test"
    calls: list[Call] = field(default_factory=list)
    ssl_context: ssl.SSLContext | None = None  # HTTPS when given
    # Record (and answer) requests of any method to any path, not only POSTs to ``path``:
    # a second origin that must see nothing.
    any_path: bool = False
    port: int = 0  # 0: any free port; a given one, to bring back a service that was down

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.path}"

    def start(self) -> ThreadedServer:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("test server did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw
        call = Call(len(self.calls), dict(request.headers), body, request)
        self.calls.append(call)
        return await self.handler(call)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        if self.any_path:
            app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app, handle_signals=False, handler_cancellation=True, shutdown_timeout=0.1
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()


def answer(call: Call, **extra: Any) -> web.Response:
    """A well-formed ModelArts answer: each record echoed with a ``score`` = its position."""
    records = call.body["data"]["req_data"]
    results = [{**record, "score": position, **extra} for position, record in enumerate(records)]
    meta = {"uuid": call.body.get("meta", {}).get("uuid", "")}
    return web.json_response({"meta": meta, "data": {"resp_data": results}})


def gateway_error(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = {"error_code": code, "error_msg": message, "request_id": "0" * 32}
    return web.json_response(body, status=status, headers=headers)


# --- hostile servers ---------------------------------------------------------------------


def redirecting(status: int, target: str) -> Handler:
    """A gateway that answers every request with a redirect to ``target``."""

    async def handle(call: Call) -> web.Response:
        return web.Response(status=status, headers={"Location": target})

    return handle


def echoing_token(status: int = 400) -> Handler:
    """A careless gateway whose error body (and a header) quote the request's credentials."""

    async def handle(call: Call) -> web.Response:
        token = call.headers.get("X-Auth-Token", "")
        app_code = call.headers.get("X-Apig-AppCode", "")
        return gateway_error(
            status,
            "APIG.0101",
            f"token {token} (AppCode {app_code}) is not allowed here",
            **{"X-Echo": token},
        )

    return handle


def huge_answer(size: int, *, gzip: bool = False) -> Handler:
    """An answer of ``size`` bytes (JSON whitespace before a well-formed answer); with
    ``gzip``, sent compressed (a gzip bomb: a few kB that inflate to ``size``)."""
    import gzip as gzip_module

    async def handle(call: Call) -> web.Response:
        body = b" " * size + answer(call).body  # type: ignore[operator]
        headers = {"Content-Type": "application/json"}
        if gzip:
            body = gzip_module.compress(body, 9)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    return handle


def nested(depth: int) -> Any:
    """A value nested ``depth`` levels deep: objects in lists in objects..."""
    value: Any = 1
    for level in range(depth):
        value = {"a": value} if level % 2 else [value]
    return value


def deeply_nested_answer(depth: int) -> Handler:
    """Every row's result carries a field nested ``depth`` levels deep."""

    async def handle(call: Call) -> web.Response:
        return answer(call, deep=nested(depth))

    return handle


def reversed_echo(call: Call) -> Awaitable[web.Response]:
    """A service that echoes the sent fields, but answers the rows in reverse order."""

    async def handle() -> web.Response:
        records = call.body["data"]["req_data"]
        results = [{**record, "score": position} for position, record in enumerate(records)]
        meta = {"uuid": call.body.get("meta", {}).get("uuid", "")}
        return web.json_response({"meta": meta, "data": {"resp_data": results[::-1]}})

    return handle()


def busy_until(retry_after: str) -> Handler:
    """A gateway that answers every request 503 with a (hostile) ``Retry-After``."""

    async def handle(call: Call) -> web.Response:
        return gateway_error(503, "APIG.0203", "busy", **{"Retry-After": retry_after})

    return handle


class ThreadedService:
    """The embedded reference service (with its IAM endpoint, if the options have an
    account) on loopback, in a thread of its own, for tests that run the real command."""

    def __init__(
        self, options: ServiceOptions, extra_middlewares: Sequence[Middleware] = ()
    ) -> None:
        self._options = options
        self._middlewares = extra_middlewares
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop: asyncio.Event | None = None
        self._service: RunningService | None = None
        self._error: BaseException | None = None

    @property
    def service(self) -> RunningService:
        assert self._service is not None, "the service is not running"
        return self._service

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def iam_url(self) -> str:
        assert self.service.iam_url is not None, "the service has no IAM account"
        return self.service.iam_url

    @property
    def stats(self) -> ServiceStats:
        return self.service.stats

    def __enter__(self) -> ThreadedService:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the embedded service did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            self._service = await start_service(self._options, extra_middlewares=self._middlewares)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        async with self._service:
            self._ready.set()
            await self._stop.wait()
