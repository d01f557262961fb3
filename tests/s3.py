"""A real S3 server on loopback for the tests: moto's S3, in a thread, on a free port.

``S3`` holds the server's endpoint and a pyarrow filesystem to put and read objects with;
``storage_section`` is the ``[storage]`` a job needs to reach it (keys from the environment,
as a user would give them).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator

import aiohttp
import pyarrow.fs as pafs
from aiohttp import web

# Known secrets: tests check that they never leak.
ACCESS_KEY = "AKIATESTKEY7Q3XW9ZE"
SECRET_KEY = "s3-secret-4b8e2f6a1c9d7e305f"


class S3:
    """A running moto S3 server and a filesystem on it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.endpoint = f"http://{host}:{port}"
        self.fs = pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=f"{host}:{port}",
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def bucket(self, name: str) -> str:
        self.fs.create_dir(name)
        return name

    def put(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def get(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            data: bytes = stream.read()
            return data

    def remove_buckets(self) -> None:
        for info in self.fs.get_file_info(pafs.FileSelector("/", recursive=False)):
            self.fs.delete_dir(info.path)

    def exists(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type == pafs.FileType.File)

    def keys(self, prefix: str) -> list[str]:
        selector = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
        return sorted(
            info.path for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File
        )


def storage_section(endpoint: str, *, addressing: str = "path") -> str:
    return (
        f'[storage]\nendpoint = "{endpoint}"\nregion = "us-east-1"\naddressing = "{addressing}"\n'
        'access_key_env = "TEST_S3_ACCESS_KEY"\nsecret_key_env = "TEST_S3_SECRET_KEY"\n'
    )


def moto_server() -> Iterator[tuple[str, int]]:
    """moto's S3 application on werkzeug's threaded server (as ``ThreadedMotoServer`` runs
    it), every request handed to S3 straight away: moto's dispatcher finds the service of
    each request by listing moto's ~200 service folders on disk under a lock, about half of
    its time serving a GET (its S3 answers are the same)."""
    try:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server
    except ImportError:  # moto's internals moved: its public threaded server, slower
        yield from _public_moto_server()
        return

    class S3Only(DomainDispatcherApplication):
        def get_application(self, environ: dict[str, object]) -> object:
            with self.lock:
                app = self.app_instances.get("s3")
                if app is None:
                    app = self.app_instances["s3"] = self.create_app("s3")
            return app

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = make_server(
        "127.0.0.1", 0, S3Only(create_backend_app), True, request_handler=MotoRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        thread.join(5)


def _public_moto_server() -> Iterator[tuple[str, int]]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()
    finally:
        server.stop()


# -- a proxy in front of the server that makes the store misbehave ------------------------

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
# What a store answers when it does not know the keys (revoked, or expired mid-run).
KEYS_UNKNOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidAccessKeyId</Code>'
    b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message>"
    b"</Error>"
)
SLOW_DOWN, DROP, REFUSED = "slowdown", "drop", "refused"
Fault = Callable[[int, str, str], str | None]  # (request number, method, path) -> fault


class FaultyProxy:
    """Forwards every request to the S3 server, except those ``fault`` picks: answered with
    ``503 SlowDown`` or ``403 InvalidAccessKeyId``, or their connection dropped before any
    answer."""

    def __init__(self, target: str, fault: Fault) -> None:
        self.target = target
        self.fault = fault
        self.requests = 0
        self.faults: list[str] = []
        self.ranges: list[str] = []  # each request's Range header ("" if none)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("proxy did not start")
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
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            self._session = session
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._forward)
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        number = self.requests
        self.requests += 1
        self.ranges.append(request.headers.get("Range", ""))  # for a fault to look at
        fault = self.fault(number, request.method, request.path)
        if fault == SLOW_DOWN:
            self.faults.append(fault)
            return web.Response(status=503, body=SLOWDOWN, content_type="application/xml")
        if fault == REFUSED:
            self.faults.append(fault)
            return web.Response(status=403, body=KEYS_UNKNOWN, content_type="application/xml")
        if fault == DROP:
            self.faults.append(fault)
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # nothing is answered
        headers = {k: v for k, v in request.headers.items() if k.lower() != "transfer-encoding"}
        async with self._session.request(
            request.method, self.target + request.path_qs, headers=headers, data=body
        ) as upstream:
            data = await upstream.read()
            skip = {"transfer-encoding", "content-encoding", "connection"}
            if request.method != "HEAD":  # a HEAD's length is the object's: kept
                skip.add("content-length")
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in skip}
            if request.method == "HEAD":
                return web.Response(status=upstream.status, headers=kept)
            return web.Response(status=upstream.status, headers=kept, body=data)
