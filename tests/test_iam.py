"""The IAM token source: the documented login, the answer, the cache, renewal."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from batchrunner.auth import Secret
from batchrunner.client import LoginAnswer, login
from batchrunner.errors import AuthError, RequestError, ServiceError
from batchrunner.iam import (
    IamToken,
    IssuedToken,
    TokenCache,
    default_cache_dir,
    login_body,
    read_login_answer,
)
from batchrunner.job import IamSettings
from batchrunner.service import (
    GatewayError,
    IamAccount,
    RunningService,
    ServiceOptions,
    start_service,
)
from tests.conftest import PASSWORD
from tests.servers import Call, ThreadedServer

ACCOUNT = IamAccount("alice", PASSWORD, "acme", "eu-west-0")


def iam_settings(url: str = "https://iam.example/v3/auth/tokens", **changes: object) -> IamSettings:
    fields: dict[str, object] = {
        "url": url,
        "user": "alice",
        "domain": "acme",
        "project": "eu-west-0",
        "password_env": "IAM_PASSWORD",
    }
    return IamSettings.model_validate({**fields, **changes})


def answer(status: int, body: object, token: str | None = "issued-token") -> LoginAnswer:
    return LoginAnswer(status, Secret(token) if token else None, orjson.dumps(body))


# --- the request and the answer --------------------------------------------------------------


def test_login_body_is_the_documented_one() -> None:
    body = login_body(iam_settings(), Secret(PASSWORD))
    assert PASSWORD not in repr(body) and PASSWORD not in str(body)
    assert orjson.loads(body.reveal()) == {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": "alice", "password": PASSWORD, "domain": {"name": "acme"}}
                },
            },
            "scope": {"project": {"name": "eu-west-0"}},
        }
    }


def test_a_201_gives_the_subject_token_and_its_end() -> None:
    body = {"token": {"expires_at": "2030-02-13T06:52:13.855000Z", "methods": ["password"]}}
    issued = read_login_answer(answer(201, body), iam_settings(), Secret(PASSWORD), now=100.0)
    assert issued.token == Secret("issued-token")
    assert issued.expires_at == datetime(2030, 2, 13, 6, 52, 13, 855000, UTC).timestamp()
    assert issued.obtained_at == 100.0


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (answer(201, {"token": {}}), "without a valid token.expires_at"),
        (answer(201, {"token": {"expires_at": "soon"}}), "without a valid token.expires_at"),
        (answer(201, "not an object"), "without a valid token.expires_at"),
        (
            answer(201, {"token": {"expires_at": "2030-01-01T00:00:00Z"}}, token=None),
            "without an X-Subject-Token header; check that service.iam.url is the token",
        ),
        (
            answer(201, {"token": {"expires_at": "2001-01-01T00:00:00Z"}}),
            "before now by this machine's clock; check the clock",
        ),
    ],
)
def test_a_2xx_that_is_not_a_token_is_a_service_error(reply: LoginAnswer, message: str) -> None:
    with pytest.raises(ServiceError, match=message):
        read_login_answer(reply, iam_settings(), Secret(PASSWORD), now=1e9)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        # the gateway's (and IAM's) error body, echoing the password: it is scrubbed
        (
            {"error_code": "IAM.0002", "error_msg": f"wrong password {PASSWORD}"},
            "HTTP 401: IAM.0002: wrong password ****",
        ),
        # Keystone's error body
        (
            {
                "error": {
                    "code": 401,
                    "title": "Unauthorized",
                    "message": "The request you have made requires authentication.",
                }
            },
            "HTTP 401: The request you have made requires authentication.",
        ),
    ],
)
def test_a_refused_login_is_an_auth_error_with_iams_words(body: object, detail: str) -> None:
    with pytest.raises(AuthError) as caught:
        read_login_answer(answer(401, body, None), iam_settings(), Secret(PASSWORD), now=0)
    message = str(caught.value)
    assert message == (
        "IAM at https://iam.example/v3/auth/tokens refused the login of user 'alice' "
        f"(domain 'acme', project 'eu-west-0'): {detail}; check service.iam.user, "
        "service.iam.domain and service.iam.project, and the password in $IAM_PASSWORD"
    )
    assert PASSWORD not in repr(caught.value)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_busy_iam_is_retryable(status: int) -> None:
    reply = LoginAnswer(status, None, b"<html><h1>Service Unavailable</h1></html>")
    with pytest.raises(RequestError) as caught:
        read_login_answer(reply, iam_settings(), Secret(PASSWORD), now=0)
    assert caught.value.retryable and caught.value.kind == "iam_login"
    assert f"could not log in now (HTTP {status}: Service Unavailable)" in caught.value.message


def test_renewal_comes_before_the_end_but_not_before_half_the_life() -> None:
    day = IssuedToken(Secret("t"), expires_at=86_400.0, obtained_at=0.0)
    assert day.renew_at(300.0) == 86_100.0  # five minutes before the end
    assert day.renew_at(0.0) == 86_400.0
    short = IssuedToken(Secret("t"), expires_at=10.0, obtained_at=0.0)
    assert short.renew_at(300.0) == 5.0  # not at once, and not at every request


# --- the cache -------------------------------------------------------------------------------


def test_default_cache_dir_follows_xdg_and_ignores_a_relative_one() -> None:
    assert default_cache_dir({"XDG_CACHE_HOME": "/var/c"}) == Path("/var/c/batchrunner")
    home = Path.home() / ".cache" / "batchrunner"
    assert default_cache_dir({"XDG_CACHE_HOME": "rel/ative"}) == home
    assert default_cache_dir({}) == home


def test_the_cache_file_is_private_atomic_and_keyed(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "batchrunner"
    cache = TokenCache(folder, iam_settings())
    issued = IssuedToken(Secret("cached-token"), 2e9, 1e9)
    assert cache.load() is None
    cache.store(issued)
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert os.listdir(folder) == [cache.path.name]  # no temporary file left behind
    assert cache.path.name.startswith("iam-token-") and "alice" not in cache.path.name
    assert cache.load() == issued
    # another project, user, domain or endpoint is another file
    for change in ({"project": "cn-north-4"}, {"user": "bob"}, {"domain": "other"},
                   {"url": "https://iam.other/v3/auth/tokens"}):  # fmt: skip
        other = TokenCache(folder, iam_settings(**change))
        assert other.path != cache.path
        assert other.load() is None


def test_a_cache_file_of_another_account_is_not_used(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, iam_settings())
    TokenCache(tmp_path, iam_settings(user="bob")).store(IssuedToken(Secret("b"), 2e9, 1e9))
    os.replace(TokenCache(tmp_path, iam_settings(user="bob")).path, cache.path)  # a collision
    assert cache.load() is None


def test_a_cache_file_others_can_read_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = TokenCache(tmp_path, iam_settings())
    cache.store(IssuedToken(Secret("cached-token"), 2e9, 1e9))
    cache.path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        assert cache.load() is None
    assert "readable by others (mode 644); it will be replaced" in caplog.text
    cache.store(IssuedToken(Secret("cached-token"), 2e9, 1e9))
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600


def test_a_broken_or_unwritable_cache_costs_a_login_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = TokenCache(tmp_path, iam_settings())
    cache.path.write_bytes(b"{not json")
    cache.path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="batchrunner"):
        assert cache.load() is None
        blocked = TokenCache(tmp_path / "file-not-folder" / "x", iam_settings())
        (tmp_path / "file-not-folder").write_text("")
        blocked.store(IssuedToken(Secret("t"), 2e9, 1e9))  # no exception
    assert "it cannot be read" in caplog.text
    assert "cannot cache the IAM token" in caplog.text
    assert "the next run will log in again" in caplog.text


# --- IamToken against the embedded IAM ------------------------------------------------------


class Clock:
    """A wall clock that moves only when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def with_iam(
    test: Callable[[RunningService, Clock], Awaitable[None]],
    extra_middlewares: tuple[object, ...] = (),
    ttl: float = 3600.0,
) -> None:
    clock = Clock()

    async def main() -> None:
        options = ServiceOptions(iam=ACCOUNT, token_ttl=ttl, clock=clock)
        async with await start_service(
            options,
            extra_middlewares=extra_middlewares,  # type: ignore[arg-type]
        ) as service:
            await test(service, clock)

    asyncio.run(main())


def provider(
    service: RunningService, clock: Clock, cache: TokenCache | None, password: str = PASSWORD
) -> IamToken:
    assert service.iam_url is not None
    settings = iam_settings(service.iam_url)
    return IamToken(settings, Secret(password), login=login, cache=cache, clock=clock)


def test_login_use_and_cache_across_runs(tmp_path: Path) -> None:
    async def test(service: RunningService, clock: Clock) -> None:
        assert service.iam_url is not None
        first = provider(service, clock, TokenCache(tmp_path, iam_settings(service.iam_url)))
        token = await first.current()
        assert token.reveal() in service.issued_tokens
        assert await first.current() == token
        assert (first.logins, service.stats.logins) == (1, 1)
        # the next run (a new provider, the same cache): no login
        second = provider(service, clock, TokenCache(tmp_path, iam_settings(service.iam_url)))
        assert await second.current() == token
        assert (second.logins, second.cache_hits, service.stats.logins) == (0, 1, 1)

    with_iam(test)


def test_an_expiring_token_is_renewed_before_use_without_stalling_requests() -> None:
    async def test(service: RunningService, clock: Clock) -> None:
        tokens = provider(service, clock, cache=None)
        first = await tokens.current()
        clock.now += 3600 - 301  # still more than renew_before (300 s) to go
        assert await tokens.current() == first
        clock.now += 2  # within the last five minutes: renew, once
        given = await asyncio.gather(*(tokens.current() for _ in range(20)))
        assert service.stats.logins == 2
        renewed = await tokens.current()
        assert renewed != first
        # while one request logged in, the others went on with the old, still valid token
        assert set(given) == {first, renewed}

    with_iam(test)


def test_an_expired_token_is_not_sent_while_it_is_renewed() -> None:
    async def test(service: RunningService, clock: Clock) -> None:
        tokens = provider(service, clock, cache=None)
        first = await tokens.current()
        clock.now += 3600  # ended (the machine slept, say): everyone waits for the new one
        given = await asyncio.gather(*(tokens.current() for _ in range(20)))
        assert service.stats.logins == 2
        assert len(set(given)) == 1 and given[0] != first

    with_iam(test)


def test_a_refusal_wave_logs_in_once() -> None:
    async def test(service: RunningService, clock: Clock) -> None:
        tokens = provider(service, clock, cache=None)
        first = await tokens.current()
        renewed = await asyncio.gather(*(tokens.refresh(first) for _ in range(30)))
        assert service.stats.logins == 2
        assert len(set(renewed)) == 1 and renewed[0] not in (None, first)

    with_iam(test)


def test_renewal_takes_a_token_another_run_cached(tmp_path: Path) -> None:
    async def test(service: RunningService, clock: Clock) -> None:
        assert service.iam_url is not None
        ours = provider(service, clock, TokenCache(tmp_path, iam_settings(service.iam_url)))
        theirs = provider(service, clock, TokenCache(tmp_path, iam_settings(service.iam_url)))
        first = await ours.current()
        newer = await theirs.refresh(first)  # the other run renewed (and cached) first
        assert service.stats.logins == 2
        assert await ours.refresh(first) == newer  # read from the cache: no third login
        assert service.stats.logins == 2

    with_iam(test)


def test_a_wrong_password_is_refused_with_iams_message() -> None:
    async def test(service: RunningService, clock: Clock) -> None:
        tokens = provider(service, clock, cache=None, password="not-" + PASSWORD)
        with pytest.raises(AuthError) as caught:
            await tokens.current()
        message = str(caught.value)
        assert "refused the login of user 'alice'" in message
        assert "HTTP 401: IAM.0002: The username or password is wrong." in message
        assert PASSWORD not in message and PASSWORD not in repr(caught.value)
        assert service.stats.logins_refused == 1

    with_iam(test)


def test_a_busy_iam_is_a_retryable_failure() -> None:
    @web.middleware
    async def busy(request: web.Request, handler: Handler) -> web.StreamResponse:
        raise GatewayError(503, "APIG.0203", "Backend unavailable")

    async def test(service: RunningService, clock: Clock) -> None:
        with pytest.raises(RequestError) as caught:
            await provider(service, clock, cache=None).current()
        assert caught.value.retryable
        assert "could not log in now (HTTP 503: APIG.0203: Backend unavailable)" in str(
            caught.value
        )

    with_iam(test, extra_middlewares=(busy,))


def test_an_unreachable_iam_is_a_retryable_failure() -> None:
    async def handle(call: Call) -> web.Response:
        raise AssertionError("not reached")

    server = ThreadedServer(handle, path="/v3/auth/tokens").start()
    url = server.url
    server.stop()

    async def main() -> None:
        tokens = IamToken(
            iam_settings(url), Secret(PASSWORD), login=functools.partial(login, timeout=2),
            cache=None,
        )  # fmt: skip
        with pytest.raises(RequestError) as caught:
            await tokens.current()
        assert caught.value.retryable and caught.value.kind == "iam_login"
        assert f"cannot reach IAM at {url}" in str(caught.value)

    asyncio.run(main())


def test_the_login_is_sent_as_documented() -> None:
    async def handle(call: Call) -> web.Response:
        body = {"token": {"expires_at": "2099-01-01T00:00:00.000000Z"}}
        return web.json_response(body, status=201, headers={"X-Subject-Token": "tok"})

    async def main(url: str) -> None:
        tokens = IamToken(iam_settings(url), Secret(PASSWORD), login=login, cache=None)
        assert (await tokens.current()).reveal() == "tok"

    with ThreadedServer(handle, path="/v3/auth/tokens") as server:
        asyncio.run(main(server.url))
    (call,) = server.calls
    assert call.headers["Content-Type"] == "application/json;charset=utf8"
    assert call.body["auth"]["identity"]["password"]["user"]["password"] == PASSWORD
    assert "X-Auth-Token" not in call.headers
