"""The HTTP client: the only module that imports the aiohttp client.

One ``aiohttp.ClientSession`` per run, TLS verified by default, the token sent in the
``X-Auth-Token`` header (``Authorization: Bearer`` for OpenAI-compatible servers; an
AppCode in ``X-Apig-AppCode``) and nowhere else. Network
failures come out as ``RequestError`` (``timeout``, ``connection``, ``tls``); HTTP answers
of any status come back as ``Response`` for the protocol codec to judge, except two:

- a redirect (3xx) is never followed, for the service as for the IAM login: following it
  would send the token, the AppCode or the password to whatever address the answer names,
  and a gateway does not redirect ``POST /v1/infers/...``. It is a fatal ``RequestError``
  of kind ``redirect`` (``iam_login`` for IAM) that says where it pointed;
- an answer larger than ``max_response_bytes`` (counted after decompression, so that a
  gzip bomb is cut off too) is a ``RequestError`` of kind ``response_too_large``, read no
  further.

``login`` posts an IAM login (built and judged by ``iam``) and hands back the answer, the
token already wrapped in a ``Secret``.
"""

from __future__ import annotations

import errno
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
from yarl import URL

from batchrunner import __version__
from batchrunner.auth import Secret
from batchrunner.errors import ErrorKind, RequestError, SettingError, clip
from batchrunner.job.service import DEFAULT_MAX_RESPONSE_BYTES
from batchrunner.retry import parse_retry_after

USER_AGENT = f"batchrunner/{__version__}"
TOKEN_HEADER = "X-Auth-Token"
APP_CODE_HEADER = "X-Apig-AppCode"
SUBJECT_TOKEN_HEADER = "X-Subject-Token"
RATE_LIMIT_PREFIX = "x-ratelimit-"
_READ_CHUNK = 256 * 1024
IAM_CONTENT_TYPE = "application/json;charset=utf8"  # as IAM documents it


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP answer, whatever its status."""

    status: int
    body: bytes
    retry_after: float | None
    latency_ms: float
    # The x-ratelimit-* headers of an OpenAI-compatible server (names lower-cased).
    rate_limits: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class ServiceClient:
    """Posts request bodies to one service URL. Use as ``async with ServiceClient(...)``."""

    def __init__(
        self,
        url: str,
        token: Secret | None,
        *,
        app_code: Secret | None = None,
        timeout: float = 40.0,
        connect_timeout: float = 10.0,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
        max_connections: int = 100,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        clock: Callable[[], float] = time.perf_counter,
        bearer: bool = False,
    ) -> None:
        self.url = url
        # OpenAI-compatible servers take the key as "Authorization: Bearer <key>".
        self._token_header = "Authorization" if bearer else TOKEN_HEADER
        self._token_prefix = "Bearer " if bearer else ""
        self._max_response_bytes = max_response_bytes
        self._token = token
        self._app_code = app_code
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._ssl = tls_context(url, verify_tls, ca_bundle)
        self._max_connections = max_connections
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl)
        headers = {"User-Agent": USER_AGENT}
        if self._token is not None:
            headers[self._token_header] = self._token_prefix + self._token.reveal()
        if self._app_code is not None:
            headers[APP_CODE_HEADER] = self._app_code.reveal()
        self._session = aiohttp.ClientSession(
            connector=connector, headers=headers, timeout=self._timeout
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self,
        body: bytes | aiohttp.FormData,
        content_type: str | None,
        *,
        token: Secret | None = None,
        path: str | None = None,
    ) -> Response:
        """POST ``body`` to the service and read the whole answer.

        ``token`` is sent instead of the client's own: the caller renews tokens and must
        know which one each request carried, to say which one the service refused. ``path``
        (a batch file's line names its own, ``/v1/embeddings``) replaces the service URL's
        ``/v1/...`` end; the request stays on the service's own origin.
        """
        headers: dict[str, str] = {}
        if content_type:
            headers["Content-Type"] = content_type
        url = self.url
        if path is not None:
            url = _v1_base(self.url) + path
            if not path.startswith("/") or _origin(url) != _origin(self.url):
                raise ValueError("a POST goes to the service's own origin only")
        return await self._send("POST", url, body, headers, token)

    async def get(self, url: str, *, token: Secret | None = None) -> Response:
        """GET ``url``, which must be on the service's own origin (what ``validate`` asks a
        server about its model: credentials never go anywhere else), and read the answer."""
        if _origin(url) != _origin(self.url):
            raise ValueError("a GET goes to the service's own origin only")
        return await self._send("GET", url, None, {}, token)

    async def _send(
        self,
        method: str,
        url: str,
        body: bytes | aiohttp.FormData | None,
        headers: dict[str, str],
        token: Secret | None,
    ) -> Response:
        if self._session is None:
            raise RuntimeError("ServiceClient used outside 'async with'")
        if token is not None:
            headers[self._token_header] = self._token_prefix + token.reveal()
        started = self._clock()
        try:
            async with self._session.request(
                method, url, data=body, headers=headers or None, allow_redirects=False
            ) as answer:
                if 300 <= answer.status < 400:
                    raise _redirected(answer, "the service", "service.url")
                payload = await _read_capped(answer, self._max_response_bytes)
                return Response(
                    status=answer.status,
                    body=payload,
                    retry_after=_retry_after(answer),
                    latency_ms=(self._clock() - started) * 1000.0,
                    rate_limits={
                        name.lower(): value
                        for name, value in answer.headers.items()
                        if name.lower().startswith(RATE_LIMIT_PREFIX)
                    },
                )
        except TimeoutError:
            elapsed = self._clock() - started
            raise RequestError(
                f"no complete answer within {elapsed:.1f} s (service.timeout)",
                kind=ErrorKind.TIMEOUT,
                retryable=True,
            ) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _untrusted(exc, "") from None
        except aiohttp.ClientPayloadError as exc:
            raise RequestError(
                f"the answer was cut off: {exc}", kind=ErrorKind.CONNECTION, retryable=True
            ) from None
        except aiohttp.ClientError as exc:
            raise RequestError(
                f"connection failed: {exc.__class__.__name__}: {exc}",
                kind=ErrorKind.CONNECTION,
                retryable=True,
                row_specific=_hung_up(exc),
            ) from None


@dataclass(frozen=True, slots=True)
class LoginAnswer:
    """IAM's answer to a login: its status, the ``X-Subject-Token`` (if any) and the body."""

    status: int
    subject_token: Secret | None
    body: bytes


async def login(
    url: str,
    body: Secret,
    *,
    timeout: float = 40.0,
    connect_timeout: float = 10.0,
    verify_tls: bool = True,
    ca_bundle: str | None = None,
) -> LoginAnswer:
    """POST an IAM login ``body`` (it holds the password: a ``Secret``) to ``url``.

    A session of its own: logins are rare (once a day, or once per expiry), and IAM is
    another host than the service. Network failures are retryable ``RequestError`` of kind
    ``iam_login``; a TLS failure is fatal.
    """
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
    connector = aiohttp.TCPConnector(ssl=tls_context(url, verify_tls, ca_bundle))
    headers = {"User-Agent": USER_AGENT, "Content-Type": IAM_CONTENT_TYPE}
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, headers=headers, timeout=client_timeout
            ) as session,
            session.post(url, data=body.reveal().encode("utf-8"), allow_redirects=False) as answer,
        ):
            if 300 <= answer.status < 400:
                raise _redirected(
                    answer, f"IAM at {url}", "service.iam.url", kind=ErrorKind.IAM_LOGIN
                )
            payload = await _read_capped(answer, DEFAULT_MAX_RESPONSE_BYTES)
            token = answer.headers.get(SUBJECT_TOKEN_HEADER)
            return LoginAnswer(answer.status, Secret(token) if token else None, payload)
    except TimeoutError:
        raise RequestError(
            f"IAM at {url} did not answer within {timeout:.0f} s",
            kind=ErrorKind.IAM_LOGIN,
            retryable=True,
        ) from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise _untrusted(exc, "IAM at ") from None
    except aiohttp.ClientError as exc:
        raise RequestError(
            f"cannot reach IAM at {url}: {exc.__class__.__name__}: {exc}",
            kind=ErrorKind.IAM_LOGIN,
            retryable=True,
        ) from None


def _retry_after(answer: aiohttp.ClientResponse) -> float | None:
    """The wait an answer asks for: ``retry-after-ms`` (OpenAI-compatible servers' finer
    form) when it is a number, else ``Retry-After``."""
    milliseconds = answer.headers.get("retry-after-ms")
    if milliseconds:
        try:
            value = float(milliseconds)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000.0
    return parse_retry_after(answer.headers.get("Retry-After"))


def _redirected(
    answer: aiohttp.ClientResponse, who: str, setting: str, *, kind: str = ErrorKind.REDIRECT
) -> RequestError:
    location = answer.headers.get("Location", "")
    try:
        # Where it points, without its query (which may carry anything).
        target = answer.url.join(URL(location)).with_query(None).with_fragment(None)
        where = f"to {clip(str(target), 120)}"
    except ValueError:
        where = "to an address that is not a URL"
    return RequestError(
        f"{who} answered HTTP {answer.status}, a redirect {where}; batchrunner never follows "
        f"redirects (the credentials would go along): set {setting} to the address that answers",
        kind=kind,
        retryable=False,
        fatal=True,
        http_status=answer.status,
    )


async def _read_capped(answer: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole answer body, or a ``RequestError`` once it is over ``limit`` bytes."""
    encoded = answer.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
    length = answer.content_length
    if length is not None and length > limit:
        raise _too_large(answer, limit, encoded)
    if length is not None and not encoded:
        return await answer.read()  # the common case: its size is known, and fits
    received = bytearray()
    # aiohttp hands the body over decompressed: the count is what would be kept.
    async for chunk in answer.content.iter_chunked(_READ_CHUNK):
        received += chunk
        if len(received) > limit:
            raise _too_large(answer, limit, encoded)
    return bytes(received)


def _too_large(answer: aiohttp.ClientResponse, limit: int, encoded: bool) -> RequestError:
    counted = " (decompressed)" if encoded else ""
    return RequestError(
        f"HTTP {answer.status}: the answer is over service.max_response_bytes ({limit:,} "
        f"bytes){counted} and was not read further; raise the setting, or make batch.size "
        "smaller",
        kind=ErrorKind.RESPONSE_TOO_LARGE,
        retryable=False,
        row_specific=True,  # a smaller batch has a smaller answer: halves are worth a try
        http_status=answer.status,
    )


def _untrusted(exc: aiohttp.ClientConnectorCertificateError, peer: str) -> RequestError:
    # No certificate will become trusted by asking again: the run stops and says what to set.
    return RequestError(
        f"TLS certificate of {peer}{exc.host} not trusted: {exc.certificate_error}; "
        "set service.ca_bundle to your CA file (or service.verify_tls = false)",
        kind=ErrorKind.TLS,
        retryable=False,
        fatal=True,
    )


def _hung_up(exc: aiohttp.ClientError) -> bool:
    """Whether the server took the request and hung up on it (not: could not be reached).

    A passing fault, or a server whose worker dies on this request's content (MLServer
    resets the connection after a model error): retried, and if every try ends so, halves
    of the batch are tried, as for a 400 (see ``dispatch``). A server that is down refuses
    the connection instead, which never splits a batch.
    """
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return (
        isinstance(exc, aiohttp.ClientOSError)
        and not isinstance(exc, aiohttp.ClientConnectorError)
        and exc.errno == errno.ECONNRESET
    )


def _v1_base(url: str) -> str:
    """What a ``/v1/...`` path is joined to: ``url`` up to its ``/v1`` (an OpenAI-compatible
    server's base URL), or without its end slash when it has none."""
    found = url.rstrip("/").rfind("/v1")
    if found >= 0 and _origin(url[:found]) == _origin(url):
        return url[:found]
    return url.rstrip("/")


def _origin(url: str) -> str | None:
    found = re.match(r"^(https?)://([^/?#]+)", url)
    return f"{found.group(1)}://{found.group(2)}".lower() if found else None


def tls_context(url: str, verify_tls: bool, ca_bundle: str | None) -> ssl.SSLContext:
    """The TLS context of a session to ``url``: always one of ours, never aiohttp's defaults
    (the console does not even build those: see ``startup.lean_process``).

    Verified, with the system's CAs (or ``ca_bundle``'s), for an https URL; for a plain
    http URL, verified against no CA at all: no TLS connection is made to it, and nothing
    is loaded for one (the CA bundle takes ~20 ms to read); were one ever made, no
    certificate would pass. ``verify_tls = false``: no check.
    """
    context: ssl.SSLContext
    if not verify_tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_bundle:
        if not Path(ca_bundle).is_file():
            raise SettingError(f"service.ca_bundle: no such file: {ca_bundle}")
        context = ssl.create_default_context(cafile=ca_bundle)
    elif url.lower().startswith("https:"):
        context = ssl.create_default_context()
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, and trusts no CA
    context.set_alpn_protocols(("http/1.1",))  # as aiohttp's own
    return context
