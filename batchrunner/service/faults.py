"""Fault injection for the embedded service: a bad day at the gateway, on demand and seeded.

One aiohttp middleware adds, in the order a real gateway would: a capacity (requests in
flight above it are answered 429 ``APIG.0308`` with ``Retry-After``), random 503s, dropped
connections and HTML 502 pages, latency with jitter, and rows that make the model fail
(``MR.0105``). The random draws come from one ``random.Random(seed)``; the poisoned rows are
chosen by a hash of the row's content and the seed, so the same row fails on every attempt,
in every run, as a row the model truly cannot score would.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from batchrunner.job.service import EmbeddedSettings
from batchrunner.service.gateway import GatewayError

HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


# One declaration of the faults, used by the job ([service.embedded]), by ``serve``'s
# options and here.
FaultSettings = EmbeddedSettings


def poisoned(record: object, rate: float, seed: int) -> bool:
    """Whether the model "fails" on this record: a stable draw from its content."""
    if rate <= 0:
        return False
    digest = hashlib.blake2b(
        orjson.dumps(record, option=orjson.OPT_SORT_KEYS), digest_size=8, key=str(seed).encode()
    ).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def fault_middleware(settings: FaultSettings) -> Middleware:
    """The middleware injecting ``settings``' faults (see the module docstring)."""
    rng = random.Random(settings.seed)
    in_flight = 0

    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight
        if settings.capacity is not None and in_flight >= settings.capacity:
            raise GatewayError(
                429,
                "APIG.0308",
                "The throttling threshold has been reached",
                # retry-after-ms: OpenAI-compatible servers' finer form of the same.
                {
                    "Retry-After": f"{settings.retry_after:g}",
                    "retry-after-ms": str(int(settings.retry_after * 1000)),
                },
            )
        in_flight += 1
        try:
            draw = rng.random()
            if draw < settings.error_rate:
                raise GatewayError(503, "APIG.0203", "Backend unavailable")
            draw -= settings.error_rate
            if draw < settings.drop_rate:
                if request.transport is not None:
                    request.transport.close()  # hang up: the client sees a dropped connection
                return web.Response(status=503)
            draw -= settings.drop_rate
            if draw < settings.html_rate:
                return web.Response(status=502, text=HTML_502, content_type="text/html")
            delay = settings.latency_ms + rng.uniform(-1, 1) * settings.jitter_ms
            if delay > 0:
                await asyncio.sleep(delay / 1000.0)
            if settings.poison_rate > 0:
                await _refuse_poisoned_rows(request, settings)
            return await handler(request)
        finally:
            in_flight -= 1

    return inject


async def _refuse_poisoned_rows(request: web.Request, settings: FaultSettings) -> None:
    if request.content_type != "application/json":
        return
    try:
        records = orjson.loads(await request.read())["data"]["req_data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return  # malformed: the handler answers it as the service would
    if not isinstance(records, list):
        return
    for position, record in enumerate(records):
        if poisoned(record, settings.poison_rate, settings.seed):
            raise GatewayError(
                400, "MR.0105", f"the model failed on record {position}: cannot score it"
            )
