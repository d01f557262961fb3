"""Token sources through the real command, against real servers on loopback: IAM login,
cache, expiry mid-run and renewal, refused logins, a token file renewed by someone else,
and the AppCode."""

from __future__ import annotations

import asyncio
import math
import stat
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from batchrunner.clock import Clock
from batchrunner.engines.local import run_job
from batchrunner.gate import MAX_RENEWALS_IN_A_ROW
from batchrunner.job import load_job
from batchrunner.service import GatewayError, IamAccount, ServiceOptions
from tests.conftest import (
    APPCODE,
    PASSWORD,
    TOKEN,
    iris_csv,
    read_output,
    write_csv,
    write_job,
)
from tests.servers import Call, ThreadedServer, ThreadedService, answer, gateway_error

ACCOUNT = IamAccount("alice", PASSWORD, "acme", "eu-west-0")
FAST_RETRIES = "[retry]\nbackoff_initial = 0.001\nbackoff_max = 0.002\n"


def iam_job(
    service: ThreadedService,
    *,
    copies: int = 1,
    size: int = 50,
    concurrency: int = 4,
    url: str | None = None,
    iam: str = "",
    extra: str = "",
) -> Path:
    data = iris_csv(copies)
    text = (
        f'name = "nightly"\n[input]\npath = "{data}"\nid_column = "id"\n'
        f'columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]\n'
        f'[service]\nurl = "{url or service.url}"\n'
        f'[service.iam]\nurl = "{service.iam_url}"\nuser = "alice"\ndomain = "acme"\n'
        f'project = "eu-west-0"\npassword_env = "IAM_PASSWORD"\n{iam}'
        f"[batch]\nsize = {size}\nconcurrency = {concurrency}\n{FAST_RETRIES}{extra}"
    )
    return write_job(Path("job.toml"), text)


@pytest.fixture(autouse=True)
def _iam_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IAM_PASSWORD", PASSWORD)


def slow_inference(seconds: float) -> Middleware:
    """Each inference request takes ``seconds`` before its token is checked, as through a
    busy gateway: a token can expire while its request is in flight."""

    @web.middleware
    async def slow(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            await asyncio.sleep(seconds)
        return await handler(request)

    return slow


def assert_all_ok(rows: int) -> list[dict[str, object]]:
    output = read_output("out/nightly.parquet")
    assert len(output) == rows
    assert [r["_status"] for r in output] == ["ok"] * rows
    assert all(r["predictresult"] for r in output)
    return output


# --- IAM ---------------------------------------------------------------------------------------


def test_iam_login_then_use(invoke, cache_dir: Path) -> None:
    with ThreadedService(ServiceOptions(iam=ACCOUNT)) as service:
        result = invoke("run", str(iam_job(service)))
        issued = service.service.issued_tokens
    assert result.exit_code == 0, result.stderr
    assert_all_ok(150)
    assert service.stats.logins == 1
    assert service.stats.by_status[200] == 3  # the three batches, with the issued token
    assert "IAM: logged in as user alice (domain acme, project eu-west-0)" in result.stderr
    (cache,) = cache_dir.iterdir()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert issued[0] in cache.read_text()  # the cache's job: keep the token for the next run
    assert not cache.is_relative_to(Path.cwd())


def test_the_next_run_reuses_the_cached_token(invoke) -> None:
    with ThreadedService(ServiceOptions(iam=ACCOUNT)) as service:
        job = iam_job(service)
        first = invoke("run", str(job))
        second = invoke("run", str(job))
    assert first.exit_code == 0 and second.exit_code == 0, second.stderr
    assert service.stats.logins == 1
    assert "IAM: using the cached token of user alice (project eu-west-0)" in second.stderr


class TickingClock(Clock):
    """A wall clock that moves only when the service answers an inference request, by a
    fixed step: token lives are counted in requests, whatever the machine's load. A login
    takes no time on it: inference requests wait while one is answered. The service's
    thread and the run's both read it."""

    def __init__(self, step: float) -> None:
        self.step = step
        self._now = time.time()
        self._lock = threading.Lock()
        self._logins = 0

    def wall(self) -> float:
        with self._lock:
            return self._now

    def tick(self) -> None:
        with self._lock:
            self._now += self.step

    def middleware(self) -> Middleware:
        @web.middleware
        async def ticking(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path == "/v3/auth/tokens":
                self._logins += 1
                try:
                    return await handler(request)
                finally:
                    self._logins -= 1
            if request.path.startswith("/v1/"):
                await asyncio.sleep(0.004)  # requests overlap, as through a busy gateway
                while self._logins:
                    await asyncio.sleep(0.001)
                self.tick()  # before the token is checked: it can expire while in flight
            return await handler(request)

        return ticking


@pytest.mark.parametrize(
    ("renew_before", "ttl"),
    [(0.0, 0.1), (300.0, 1.0)],
    ids=["on-401", "before-expiry"],
)
def test_tokens_expiring_every_few_dozen_requests_never_stop_the_run(
    renew_before: float, ttl: float
) -> None:
    # A nightly job for days, compressed: each answered request moves the clock 10 ms, so
    # a token lives 10 (on-401) or 100 (before-expiry) requests, 4 in flight at a time.
    # With renew_before = 0 every expiry surfaces as a wave of 401s. The default renews
    # ahead, at half the life of such a short token (50 requests), and the service refuses
    # nothing: requests go on with the old token while the new one is fetched, and a login
    # takes far less than the 50 requests left. max_attempts = 1: a renewal must not use
    # up the retry budget.
    clock = TickingClock(0.01)
    options = ServiceOptions(iam=ACCOUNT, token_ttl=ttl, clock=clock.wall)
    with ThreadedService(options, [clock.middleware()]) as service:
        job = iam_job(
            service,
            copies=4,
            size=1,
            concurrency=4,
            iam=f"renew_before = {renew_before}\n",
            extra="max_attempts = 1\n",
        )
        started = clock.wall()
        result = run_job(load_job(job), clock=clock, handle_signals=False)
        lives = math.ceil((clock.wall() - started) / ttl)
    assert result.outcome == "done"
    assert_all_ok(600)
    stats = service.stats
    assert stats.by_status[200] == 600
    assert lives >= 6  # 600 requests of 10 ms: several lives
    assert stats.logins >= 3  # tokens were renewed during the run, more than once
    if renew_before == 0:
        assert stats.expired_tokens >= 2  # the 401s happened...
        assert stats.logins <= lives + 1  # ...and each wave cost one login at most
    else:
        assert stats.expired_tokens == 0
        assert stats.logins <= 2 * lives + 1  # renewed at half life


def test_a_refused_login_stops_the_run_with_iams_message(invoke, monkeypatch) -> None:
    wrong = "wrong-password-4f8a2c"
    monkeypatch.setenv("IAM_PASSWORD", wrong)
    with ThreadedService(ServiceOptions(iam=ACCOUNT)) as service:
        result = invoke("run", str(iam_job(service)))
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: IAM at {service.iam_url} refused the login of user 'alice' (domain 'acme', "
        "project 'eu-west-0'): HTTP 401: IAM.0002: The username or password is wrong.; check "
        "service.iam.user, service.iam.domain and service.iam.project, and the password in "
        "$IAM_PASSWORD"
    )
    for text in (result.stdout, result.stderr):
        assert wrong not in text and PASSWORD not in text
    assert service.stats.requests == 1  # the login; nothing was sent to the model
    # Nothing written either: the login comes once the job's lock is held, before its
    # state is opened, so the only file is the released (empty) lock.
    written = sorted(p for p in Path("out").rglob("*") if p.is_file())
    assert [p.suffix for p in written] == [".lock"]
    assert written[0].read_text() == ""


def test_iam_refusing_a_renewal_mid_run_aborts_with_exit_3() -> None:
    logins = 0

    @web.middleware
    async def password_changed(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal logins
        if request.path == "/v3/auth/tokens":
            logins += 1
            if logins > 1:  # the password was changed after the first login
                raise GatewayError(401, "IAM.0002", "The username or password is wrong.")
        return await handler(request)

    clock = TickingClock(0.02)  # a token lives 5 ticks: the 5th request finds it expired
    options = ServiceOptions(iam=ACCOUNT, token_ttl=0.1, clock=clock.wall)
    with ThreadedService(options, [password_changed, clock.middleware()]) as service:
        job = iam_job(service, size=5, concurrency=1, iam="renew_before = 0\n")
        result = run_job(load_job(job), clock=clock, handle_signals=False)
    assert (result.outcome, result.exit_code) == ("aborted", 3)
    assert result.abort_reason is not None
    assert result.abort_reason.startswith("IAM at")
    assert "refused the login of user 'alice'" in result.abort_reason
    rows = read_output("out/nightly.parquet")
    assert len(rows) == 150  # finished rows, and the rest saying why they were not sent
    assert [r["_status"] for r in rows[:21]] == ["ok"] * 20 + ["error"]  # 4 requests of 5
    assert rows[-1]["_error_kind"] == "not_sent"
    assert logins == 2  # the renewal IAM refused, once: not retried, nothing sent after it
    stats = service.stats
    assert stats.expired_tokens == 1  # concurrency 1: the one request sent when it expired
    assert stats.requests == logins + stats.by_status[200] + stats.expired_tokens


def test_a_busy_iam_at_start_is_retried(invoke) -> None:
    first = True

    @web.middleware
    async def busy_once(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal first
        if request.path == "/v3/auth/tokens" and first:
            first = False
            raise GatewayError(503, "APIG.0203", "Backend unavailable")
        return await handler(request)

    with ThreadedService(ServiceOptions(iam=ACCOUNT), [busy_once]) as service:
        result = invoke("run", str(iam_job(service)))
    assert result.exit_code == 0, result.stderr
    assert "could not log in now (HTTP 503: APIG.0203: Backend unavailable); trying again" in (
        result.stderr
    )
    assert service.stats.logins == 1


def test_tokens_the_service_never_accepts_stop_the_run_after_a_few_logins(invoke) -> None:
    # IAM gives tokens, the service refuses every one (say, scoped to another project):
    # renewing would log in forever. A few renewals in a row, then exit 3.
    async def refuse(call: Call) -> web.Response:
        return gateway_error(401, "APIG.0301", "Incorrect IAM authentication information")

    with (
        ThreadedService(ServiceOptions(iam=ACCOUNT)) as iam,
        ThreadedServer(refuse) as service,
    ):
        result = invoke("run", str(iam_job(iam, url=service.url, concurrency=2)))
    assert result.exit_code == 3
    assert f"renewed tokens were refused as well ({MAX_RENEWALS_IN_A_ROW} in a row)" in (
        result.stderr
    )
    assert "service.iam.project is the service's project" in result.stderr
    assert iam.stats.logins <= 1 + MAX_RENEWALS_IN_A_ROW
    assert len(service.calls) <= 2 * (1 + MAX_RENEWALS_IN_A_ROW)


def test_a_password_file(invoke, tmp_path_factory) -> None:
    secret_dir = tmp_path_factory.mktemp("secrets")
    (secret_dir / "iam-password").write_text(PASSWORD + "\n")
    with ThreadedService(ServiceOptions(iam=ACCOUNT)) as service:
        job = iam_job(service)
        text = job.read_text().replace(
            'password_env = "IAM_PASSWORD"', f'password_file = "{secret_dir / "iam-password"}"'
        )
        job.write_text(text)
        result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    assert service.stats.logins == 1


def test_a_missing_password_is_a_setting_error_before_anything(invoke, monkeypatch) -> None:
    monkeypatch.delenv("IAM_PASSWORD")
    with ThreadedService(ServiceOptions(iam=ACCOUNT)) as service:
        result = invoke("run", str(iam_job(service)))
    assert result.exit_code == 2
    assert (
        "service.iam.password_env: environment variable IAM_PASSWORD is not set or empty; "
        "export the IAM password as IAM_PASSWORD"
    ) in result.stderr
    assert service.stats.requests == 0


# --- a token file ------------------------------------------------------------------------------


def token_file_job(server: ThreadedServer, rows: int = 10, concurrency: int = 2) -> Path:
    data = write_csv(Path("data.csv"), ["x"], [(i,) for i in range(rows)])
    text = (
        f'name = "nightly"\n[input]\npath = "{data}"\n[service]\nurl = "{server.url}"\n'
        f'token_file = "token"\n[batch]\nsize = 1\nconcurrency = {concurrency}\n{FAST_RETRIES}'
    )
    return write_job(Path("job.toml"), text)


def test_a_token_file_renewed_by_someone_else_is_read_again(invoke) -> None:
    Path("token").write_text("first\n")
    token_path = Path("token").resolve()

    async def handle(call: Call) -> web.Response:
        token = call.headers["X-Auth-Token"]
        if token == "first" and call.number >= 3:
            token_path.write_text("second\n")  # the external refresher did its job
            return gateway_error(401, "APIG.0301", "token expires")
        if token in ("first", "second"):
            return answer(call)
        return gateway_error(401, "APIG.0301", "the token is not valid")

    with ThreadedServer(handle) as server:
        result = invoke("run", str(token_file_job(server)))
    assert result.exit_code == 0, result.stderr
    assert [r["_status"] for r in read_output("out/nightly.parquet")] == ["ok"] * 10
    sent = [call.headers["X-Auth-Token"] for call in server.calls]
    assert sent[:3] == ["first"] * 3 and sent[-1] == "second"
    refused = sum(call.headers["X-Auth-Token"] == "first" for call in server.calls[3:])
    assert len(server.calls) == 10 + refused  # each refused request sent once more


def test_a_token_file_still_holding_the_refused_token_is_fatal(invoke) -> None:
    Path("token").write_text("first\n")

    async def handle(call: Call) -> web.Response:
        if call.number >= 2:
            return gateway_error(401, "APIG.0301", "token expires")
        return answer(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(token_file_job(server, concurrency=1)))
    assert result.exit_code == 3
    assert "the service refused the token" in result.stderr
    assert len(server.calls) == 3  # the refused one is not sent again, nor anything after it


# --- the AppCode -------------------------------------------------------------------------------


@pytest.mark.parametrize("with_token", [False, True], ids=["appcode-alone", "appcode-and-token"])
def test_the_appcode_is_sent(invoke, monkeypatch, with_token: bool) -> None:
    monkeypatch.setenv("APP_CODE", APPCODE)

    async def handle(call: Call) -> web.Response:
        return answer(call)

    data = write_csv(Path("data.csv"), ["x"], [(1,), (2,)])
    with ThreadedServer(handle) as server:
        token = 'token_env = "MODELARTS_TOKEN"\n' if with_token else ""
        job = write_job(
            Path("job.toml"),
            f'[input]\npath = "{data}"\n[service]\nurl = "{server.url}"\n{token}'
            '[service.app]\nappcode_env = "APP_CODE"\n',
        )
        result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    (call,) = server.calls
    assert call.headers["X-Apig-AppCode"] == APPCODE
    assert call.headers.get("X-Auth-Token") == (TOKEN if with_token else None)
