"""The gateway's manners, shared by every route of the embedded service: what it counts
(``ServiceStats``), its JSON errors (``GatewayError``, aiohttp's own errors translated), the
outermost middleware that counts each request and renders each error with its request id,
and the token check (``X-Auth-Token`` or ``Authorization: Bearer``)."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from batchrunner.service.iam import TokenRegistry

TOKEN_HEADER = "X-Auth-Token"
REQUEST_ID_HEADER = "X-Request-Id"
_IAM_ROUTE = "iam-tokens"

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
