"""Known secrets (the token, the IAM password, the AppCode, every token IAM issues) appear in
no output, log, error message, summary, state or output file."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from batchrunner.auth import Secret, mask_headers
from batchrunner.service import GatewayError, IamAccount, ServiceOptions
from tests.conftest import (
    APPCODE,
    PASSWORD,
    REPO,
    TOKEN,
    iris_csv,
    read_output,
    write_csv,
    write_job,
)
from tests.servers import (
    Call,
    ThreadedServer,
    ThreadedService,
    answer,
    gateway_error,
    redirecting,
)


def test_secret_is_masked() -> None:
    secret = Secret(TOKEN)
    assert TOKEN not in repr(secret)
    assert TOKEN not in str(secret)
    assert TOKEN not in f"{secret} {[secret]}"
    assert secret.reveal() == TOKEN
    assert mask_headers({"X-Auth-Token": TOKEN, "Accept": "a"}) == {
        "X-Auth-Token": "****",
        "Accept": "a",
    }


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def assert_nowhere(secrets: list[str], texts: list[str], files: list[Path]) -> None:
    for secret in secrets:
        assert secret, "an empty secret proves nothing"
        for text in texts:
            assert secret not in text
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


def env_file_outside(folder: Path, secrets: dict[str, str]) -> Path:
    """A cron env file holding ``secrets``, outside the working folder (it is their home)."""
    path = folder / "nightly.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in secrets.items()))
    path.chmod(0o600)
    return path


def validate_and_run(invoke, job: Path, *, must_succeed: bool) -> list[str]:
    """What validate, a dry run and runs with JSON and text logs print (stdout, stderr)."""
    printed: list[str] = []
    for args in (
        ("validate", str(job)),
        ("run", str(job), "--dry-run"),
        ("run", str(job), "--log-format", "json"),
        ("run", str(job), "--log-format", "text", "--progress"),
    ):
        result = invoke(*args)
        printed += [result.stdout, result.stderr]
        if must_succeed:
            assert result.exit_code == 0, result.stderr
    return printed


def cron_and_inspect(invoke, job: Path, env_file: Path) -> list[str]:
    """What ``cron`` (the line it prints) and ``inspect`` (of every output) show."""
    shown = []
    cron = invoke("cron", str(job), "--schedule", "0 2 * * *", "--env-file", str(env_file))
    assert cron.exit_code == 0, cron.stderr
    assert "warning" not in cron.stderr  # the env file sets every secret the job reads
    assert f". {env_file} &&" in cron.stdout  # the line sources the file, never its values
    shown += [cron.stdout, cron.stderr]
    outputs = sorted(Path().rglob("*.parquet"))
    assert outputs
    for output in outputs:
        for args in (("inspect", str(output)), ("inspect", str(output), "--errors")):
            result = invoke(*args)
            assert result.exit_code == 0, result.stderr
            shown += [result.stdout, result.stderr]
    return shown


def state_files(files: list[Path]) -> list[Path]:
    """The run state kept under ``.batchrunner/`` (the journal of an unfinished run)."""
    return [p for p in files if ".batchrunner" in p.parts and p.suffix != ".lock"]


def test_token_appears_nowhere(invoke, fake_crontab, tmp_path_factory) -> None:
    async def handle(call: Call) -> web.Response:
        assert call.headers["X-Auth-Token"] == TOKEN  # it is sent, and only here
        if call.number == 1:
            return gateway_error(503, "APIG.0203", "busy")
        if call.number in (4, 6):  # each run aborts: the second resumes the first
            return gateway_error(401, "APIG.0301", "token expires")
        return answer(call)

    data = write_csv(Path("data.csv"), ["x"], [(i,) for i in range(12)])
    printed: list[str] = []
    with ThreadedServer(handle) as server:
        job = write_job(
            Path("job.toml"),
            f'[input]\npath = "{data}"\n[service]\nurl = "{server.url}"\n'
            "[batch]\nsize = 2\nconcurrency = 1\n[retry]\nbackoff_initial = 0.001\n",
        )
        printed += validate_and_run(invoke, job, must_succeed=False)
    assert any("not sent" in text for text in printed)  # the 401 path ran
    env_file = env_file_outside(tmp_path_factory.mktemp("env"), {"MODELARTS_TOKEN": TOKEN})
    printed += cron_and_inspect(invoke, job, env_file)
    assert fake_crontab.calls == []  # printing the line touches no table
    files = files_under(Path())
    assert any(p.suffix == ".parquet" for p in files)
    assert any(p.name.endswith(".summary.json") for p in files)
    assert state_files(files)  # the aborted runs kept their state, to resume
    assert_nowhere([TOKEN], printed, files)


def test_credentials_a_service_echoes_appear_nowhere(
    invoke, monkeypatch, fake_crontab, tmp_path_factory
) -> None:
    # A careless service quotes the request's token and AppCode: in a 400's JSON body (the
    # batch is split), a 503's (retried), an HTML 502 page, a header, and in the results.
    async def handle(call: Call) -> web.Response:
        token, code = call.headers["X-Auth-Token"], call.headers["X-Apig-AppCode"]
        records = call.body["data"]["req_data"]
        quoted = f"token {token} with AppCode {code}"
        if call.number % 4 == 0:
            return gateway_error(400, "APIG.0101", f"{quoted} refused", **{"X-Echo": token})
        if call.number % 4 == 1:
            return gateway_error(503, "APIG.0203", f"busy: {quoted}")
        if call.number % 4 == 2:
            page = f"<html><body><h1>502</h1><p>{quoted}</p></body></html>"
            return web.Response(status=502, text=page, content_type="text/html")
        results = [{**record, "note": f"scored for {quoted}"} for record in records]
        return web.json_response({"data": {"resp_data": results}})

    monkeypatch.setenv("APP_CODE", APPCODE)
    data = write_csv(Path("data.csv"), ["x"], [(i,) for i in range(16)])
    printed: list[str] = []
    with ThreadedServer(handle) as server:
        job = write_job(
            Path("job.toml"),
            f'[input]\npath = "{data}"\n[service]\nurl = "{server.url}"\n'
            'token_env = "MODELARTS_TOKEN"\n[service.app]\nappcode_env = "APP_CODE"\n'
            "[batch]\nsize = 4\nconcurrency = 1\n[retry]\nbackoff_initial = 0.001\n"
            "max_attempts = 2\n",
        )
        printed += validate_and_run(invoke, job, must_succeed=False)
    assert all(call.headers["X-Auth-Token"] == TOKEN for call in server.calls)
    env_file = env_file_outside(
        tmp_path_factory.mktemp("env"), {"MODELARTS_TOKEN": TOKEN, "APP_CODE": APPCODE}
    )
    printed += cron_and_inspect(invoke, job, env_file)
    files = files_under(Path())
    rows = read_output(sorted(Path().rglob("*.parquet"))[0])
    # every path ran: a scrubbed error and a scrubbed result
    assert any("token **** with AppCode ****" in (row["_error"] or "") for row in rows)
    assert any(row.get("note") == "scored for token **** with AppCode ****" for row in rows)
    assert_nowhere([TOKEN, APPCODE], printed, files)


def test_a_redirect_takes_no_credential_elsewhere_and_shows_none(invoke, monkeypatch) -> None:
    monkeypatch.setenv("APP_CODE", APPCODE)
    data = write_csv(Path("data.csv"), ["x"], [(i,) for i in range(4)])
    printed: list[str] = []
    with ThreadedServer(redirecting_handler_ok, any_path=True) as elsewhere:
        # The target names the token in its path: the message must not show it.
        target = f"http://127.0.0.1:{elsewhere.port}/{TOKEN}/{APPCODE}?t={TOKEN}"
        for status in (301, 302, 307, 308):
            with ThreadedServer(redirecting(status, target)) as gateway:
                job = write_job(
                    Path("job.toml"),
                    f'[input]\npath = "{data}"\n[service]\nurl = "{gateway.url}"\n'
                    'token_env = "MODELARTS_TOKEN"\n[service.app]\nappcode_env = "APP_CODE"\n',
                )
                printed += validate_and_run(invoke, job, must_succeed=False)
        assert elsewhere.calls == []
    assert any("a redirect to http://127.0.0.1" in text for text in printed)
    assert_nowhere([TOKEN, APPCODE], printed, files_under(Path()))


async def redirecting_handler_ok(call: Call) -> web.Response:
    return answer(call)


def test_iam_password_appcode_and_issued_tokens_appear_nowhere(
    invoke, monkeypatch, cache_dir: Path, fake_crontab, tmp_path_factory: pytest.TempPathFactory
) -> None:
    wrong = "wrong-password-61d0e7c3a5"
    # Changed between runs: how slow the model is, how many more logins IAM accepts.
    service_state: dict[str, float | None] = {"delay": 0.002, "logins_left": None}

    @web.middleware
    async def echoing_iam(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A careless IAM that echoes the password it was given: it must not reach the user.
        if request.path == "/v3/auth/tokens":
            body = orjson.loads(await request.read())
            given = body["auth"]["identity"]["password"]["user"]["password"]
            logins_left = service_state["logins_left"]
            if given != PASSWORD or logins_left == 0:
                raise GatewayError(401, "IAM.0002", f"password {given!r} is wrong")
            if logins_left is not None:
                service_state["logins_left"] = logins_left - 1
        elif request.path.startswith("/v1/"):
            assert request.headers["X-Apig-AppCode"] == APPCODE
            # a run of 75 requests outlives many 50 ms tokens
            await asyncio.sleep(service_state["delay"] or 0)
        return await handler(request)

    monkeypatch.setenv("APP_CODE", APPCODE)
    monkeypatch.setenv("IAM_PASSWORD", PASSWORD)
    data = iris_csv()
    account = IamAccount("alice", PASSWORD, "acme", "eu-west-0")
    # Tokens live 50 ms, renewed only when refused: the run goes through 401s and logins.
    options = ServiceOptions(token=TOKEN, iam=account, token_ttl=0.05)
    printed: list[str] = []
    with ThreadedService(options, [echoing_iam]) as service:
        job = write_job(
            Path("job.toml"),
            f'name = "secrets"\n[input]\npath = "{data}"\nid_column = "id"\n'
            f'[service]\nurl = "{service.url}/x"\n'
            f'[service.iam]\nurl = "{service.iam_url}"\nuser = "alice"\ndomain = "acme"\n'
            'project = "eu-west-0"\npassword_env = "IAM_PASSWORD"\nrenew_before = 0\n'
            '[service.app]\nappcode_env = "APP_CODE"\n'
            "[batch]\nsize = 2\nconcurrency = 2\n[retry]\nbackoff_initial = 0.001\n",
        )
        printed += validate_and_run(invoke, job, must_succeed=True)
        # The cache holds the last token (that is its job), for its user only, outside
        # the working folder, and no other secret.
        (cache,) = cache_dir.iterdir()
        assert cache.read_text().count(service.service.issued_tokens[-1]) == 1
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert not cache.resolve().is_relative_to(Path.cwd().resolve())
        assert_nowhere([PASSWORD, APPCODE, TOKEN], [], [cache])
        # A run whose renewal IAM refuses mid-run (echoing the password): aborted, exit 3,
        # its finished batches kept in its state under .batchrunner/, to resume.
        service_state.update(delay=0.01, logins_left=1)
        aborted = invoke("run", str(job), "--log-format", "json")
        printed += [aborted.stdout, aborted.stderr]
        assert aborted.exit_code == 3, aborted.stderr
        assert "password '****' is wrong" in aborted.stderr
        service_state.update(delay=0.002, logins_left=None)
        assert state_files(files_under(Path()))
        env_file = env_file_outside(
            tmp_path_factory.mktemp("env"), {"IAM_PASSWORD": PASSWORD, "APP_CODE": APPCODE}
        )
        printed += cron_and_inspect(invoke, job, env_file)
        cache.unlink()  # so that the next run logs in, with a wrong password
        monkeypatch.setenv("IAM_PASSWORD", wrong)
        refused = invoke("run", str(job))
        printed += [refused.stdout, refused.stderr]
        issued = list(service.service.issued_tokens)
        stats = service.stats
    assert refused.exit_code == 3
    assert "password '****' is wrong" in refused.stderr  # IAM's message, scrubbed
    assert stats.expired_tokens > 0 and stats.logins > 2  # the 401 and re-login paths ran
    dry_run = printed[2]  # its stdout
    assert "X-Auth-Token: ****" in dry_run and "X-Apig-AppCode: ****" in dry_run
    assert "auth:         token from an IAM login at" in dry_run
    assert "; AppCode from $APP_CODE" in dry_run
    files = files_under(Path())
    assert any(p.suffix == ".parquet" for p in files)
    assert state_files(files)
    assert_nowhere([TOKEN, PASSWORD, APPCODE, wrong, *issued], printed, files)


def test_serve_shows_no_secret() -> None:
    env = {
        **os.environ,
        "BATCHRUNNER_SERVE_TOKEN": TOKEN,
        "BATCHRUNNER_SERVE_IAM_PASSWORD": PASSWORD,
        "PYTHONPATH": str(REPO),
    }
    command = [sys.executable, "-m", "batchrunner", "serve", "--port", "0", "--iam-user", "alice"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ready = b""
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 20
            while b"press Ctrl-C" not in ready:
                assert selector.select(timeout=deadline - time.monotonic()), ready
                chunk = os.read(process.stdout.fileno(), 4096)
                assert chunk, f"serve ended early: {ready!r}"
                ready += chunk
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    shown = (ready + stdout + stderr).decode()
    assert "X-Auth-Token: the value of BATCHRUNNER_SERVE_TOKEN" in shown
    assert "/v3/auth/tokens logs in user 'alice' (domain 'alice', project 'local')" in shown
    assert "with the password in BATCHRUNNER_SERVE_IAM_PASSWORD" in shown
    assert_nowhere([TOKEN, PASSWORD], [shown], [])


WEBHOOK_SECRET = "hook-secret-8e2d5a1f7c3b9046"


def test_webhook_url_appears_nowhere(invoke, monkeypatch) -> None:
    # The webhook URL is a secret (whoever holds it can post to the channel): it reaches its
    # own server and nothing else, whether the webhook answers, fails or redirects.
    path = f"/services/T01/B02/{WEBHOOK_SECRET}"

    async def handle(call: Call) -> web.Response:
        if call.number == 1:
            return web.Response(status=500, text=f"no such hook {path}")
        if call.number == 2:
            return web.Response(status=302, headers={"Location": f"http://127.0.0.1:9{path}"})
        return web.Response(text="ok")

    data = write_csv(Path("data.csv"), ["x"], [(i,) for i in range(4)])
    printed: list[str] = []
    with ThreadedServer(handle, path=path) as server:
        monkeypatch.setenv("HOOK_URL", server.url)
        job = write_job(
            Path("job.toml"),
            f'[input]\npath = "{data}"\n[service]\nurl = "embedded:iris"\n'
            '[notify]\non = ["failure", "success"]\nwebhook_url_env = "HOOK_URL"\ntimeout = 2\n'
            '[report]\nmetrics_file = "metrics/job.prom"\n',
        )
        printed += validate_and_run(invoke, job, must_succeed=False)
        again = invoke("run", str(job))
        printed += [again.stdout, again.stderr]
        assert len(server.calls) == 3  # answered, failed, redirected
    monkeypatch.setenv("HOOK_URL", f"http://127.0.0.1:9{path}")  # nobody listens there
    unreachable = invoke("run", str(job), "--log-format", "json")
    printed += [unreachable.stdout, unreachable.stderr]
    assert "cannot reach the webhook" in unreachable.stderr
    for output in sorted(Path().rglob("*.parquet")):
        result = invoke("inspect", str(output))
        printed += [result.stdout, result.stderr]
    files = files_under(Path())
    assert any(p.suffix == ".prom" for p in files)
    assert_nowhere([WEBHOOK_SECRET, f"127.0.0.1:9{path}"], printed, files)


def test_token_appears_nowhere_in_reports_metrics_notifications_and_retries(invoke) -> None:
    # The text paths of issue 18: the metrics file, the notification (a command's stdin),
    # CSV and JSON lines outputs, inspect --head/--counts/--html, and a retry's output.
    failing = {"on": True}

    async def handle(call: Call) -> web.Response:
        assert call.headers["X-Auth-Token"] == TOKEN
        if failing["on"] and call.body["data"]["req_data"][0]["x"] == 1:
            return gateway_error(400, "MR.0105", f"bad row (token {TOKEN[:4]}...)")
        return answer(call, echo=TOKEN[:6])

    data = write_csv(Path("data.csv"), ["id", "x"], [(f"r{i}", i) for i in range(4)])
    save = [
        sys.executable,
        "-c",
        "import sys; open('told.json', 'wb').write(sys.stdin.buffer.read())",
    ]
    printed: list[str] = []
    with ThreadedServer(handle) as server:
        for output in ("out/job.csv", "out/job.jsonl", "out/job.parquet"):
            job = write_job(
                Path("job.toml"),
                f'name = "job"\n[input]\npath = "{data}"\nid_column = "id"\n'
                f'[service]\nurl = "{server.url}"\n[batch]\nsize = 1\n'
                f'[output]\npath = "{output}"\n[report]\nmetrics_file = "job.prom"\n'
                f"[notify]\ncommand = {orjson.dumps(save).decode()}\n",
            )
            result = invoke("run", str(job), "--log-format", "json")
            assert result.exit_code == 1, result.stderr
            printed += [result.stdout, result.stderr]
            for args in (("--head", "5"), ("--counts", "_error"), ("--html", "report.html")):
                shown = invoke("inspect", output, *args)
                assert shown.exit_code == 0, shown.stderr
                printed += [shown.stdout, shown.stderr]
        failing["on"] = False
        retried = invoke("retry", str(job), "out/job.parquet", "--output", "fixed.jsonl")
        assert retried.exit_code == 0, retried.stderr
        printed += [retried.stdout, retried.stderr]
    files = files_under(Path())
    names = {p.name for p in files}
    assert {"job.prom", "told.json", "report.html", "fixed.jsonl", "job.csv"} <= names
    assert_nowhere([TOKEN], printed, files)


def test_object_storage_keys_appear_nowhere(
    invoke, s3, fake_crontab, tmp_path_factory, monkeypatch
) -> None:
    import moto.settings

    from tests.s3 import ACCESS_KEY, SECRET_KEY, storage_section

    s3.bucket("data")
    s3.put("data/in/iris.csv", (REPO / "samples" / "iris.csv").read_bytes())
    job = write_job(
        Path("job.toml"),
        '[input]\npath = "s3://data/in/"\nid_column = "id"\n[service]\nurl = "embedded:iris"\n'
        '[output]\npath = "s3://data/out/{name}.parquet"\n' + storage_section(s3.endpoint),
    )
    printed = validate_and_run(invoke, job, must_succeed=True)
    # The output read back where it is: with the job's [storage], then the AWS variables.
    inspect = ("inspect", "s3://data/out/job.parquet", "--html", "report.html", "--errors")
    looked = invoke(*inspect, "--job", str(job))
    assert looked.exit_code == 0, looked.stderr
    printed += [looked.stdout, looked.stderr]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    looked = invoke(*inspect)
    assert looked.exit_code == 0, looked.stderr
    printed += [looked.stdout, looked.stderr]
    with monkeypatch.context() as patch:  # keys refused: the messages name where they are
        patch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        for args in (
            ("validate", str(job)),
            ("run", str(job), "--log-format", "json"),
            inspect,
            (*inspect, "--job", str(job)),
        ):
            refused = invoke(*args)
            assert refused.exit_code == 2
            assert "refused the credentials" in refused.stderr
            printed += [refused.stdout, refused.stderr]
    # The keys from files, and a job that names them wrongly (a value pasted as a name).
    Path("access.key").write_text(ACCESS_KEY)
    Path("secret.key").write_text(SECRET_KEY)
    text = (
        job.read_text()
        .replace('access_key_env = "TEST_S3_ACCESS_KEY"', 'access_key_file = "access.key"')
        .replace('secret_key_env = "TEST_S3_SECRET_KEY"', 'secret_key_file = "secret.key"')
    )
    write_job(job, text)
    printed += validate_and_run(invoke, job, must_succeed=True)
    pasted = write_job(Path("pasted.toml"), text.replace('"secret.key"', f'"{SECRET_KEY}"'))
    wrong = invoke("run", str(pasted))
    assert wrong.exit_code == 2
    printed += [wrong.stdout, wrong.stderr]
    env_file = env_file_outside(
        tmp_path_factory.mktemp("env"),
        {"TEST_S3_ACCESS_KEY": ACCESS_KEY, "TEST_S3_SECRET_KEY": SECRET_KEY},
    )
    cron = invoke("cron", str(job), "--schedule", "0 2 * * *", "--env-file", str(env_file))
    printed += [cron.stdout, cron.stderr]
    assert "storage.secret_key_file: cannot read the file it names" in wrong.stderr
    # The files that hold the keys on purpose are left out.
    kept = ("access.key", "secret.key", "pasted.toml")
    files = [p for p in files_under(Path()) if p.name not in kept]
    assert s3.exists("data/out/job.parquet")
    objects = {key: s3.get(key) for key in s3.keys("data")}
    assert_nowhere([ACCESS_KEY, SECRET_KEY], [*printed, repr(objects)], files)


def test_openai_api_keys_appear_nowhere(
    invoke, monkeypatch, fake_crontab, tmp_path_factory
) -> None:
    # A careless OpenAI-compatible server quotes the Bearer key: in a 400's error body (an
    # error row), a 503's (retried), a header, and in the reply's content (a result).
    key_env, key_file = "sk-env-secret-0123456789", "sk-file-secret-9876543210"

    async def handle(call: Call) -> web.Response:
        authorization = call.headers["Authorization"]
        assert authorization.startswith("Bearer sk-")
        quoted = f"key {authorization.removeprefix('Bearer ')}"
        error = {"error": {"message": f"refused {quoted}", "type": "invalid_request_error"}}
        if call.number % 3 == 0:
            return web.json_response(error, status=400, headers={"X-Echo": authorization})
        if call.number % 3 == 1:
            return web.json_response(error, status=503)
        reply = {
            "choices": [
                {
                    "message": {"role": "assistant", "content": f"bug, {quoted}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
        return web.json_response(reply)

    monkeypatch.setenv("LLM_KEY", key_env)
    secret_file = tmp_path_factory.mktemp("keys") / "key"
    secret_file.write_text(key_file + "\n")
    data = write_csv(Path("data.csv"), ["id", "text"], [(i, f"ticket {i}") for i in range(9)])
    printed: list[str] = []
    with ThreadedServer(handle, path="/v1/chat/completions") as server:
        base = server.url.removesuffix("/chat/completions")
        for name, source in (
            ("env", 'api_key_env = "LLM_KEY"'),
            ("file", f'api_key_file = "{secret_file}"'),
        ):
            job = write_job(
                Path(f"{name}.toml"),
                f'name = "{name}"\n[input]\npath = "{data}"\nid_column = "id"\n'
                f'[service]\nurl = "{base}"\nprotocol = "openai-chat"\n'
                f'[service.openai]\nmodel = "m"\nprompt = "Label: {{text}}"\n{source}\n'
                "[batch]\nconcurrency = 1\n[retry]\nbackoff_initial = 0.001\nmax_attempts = 2\n",
            )
            printed += validate_and_run(invoke, job, must_succeed=False)
    headers = {call.headers["Authorization"] for call in server.calls}
    assert headers == {f"Bearer {key_env}", f"Bearer {key_file}"}
    env_file = env_file_outside(tmp_path_factory.mktemp("env"), {"LLM_KEY": key_env})
    printed += cron_and_inspect(invoke, Path("env.toml"), env_file)
    files = files_under(Path())
    rows = [row for path in sorted(Path().rglob("*.parquet")) for row in read_output(path)]
    # every path ran: a scrubbed error and a scrubbed result
    assert any("refused key ****" in (row["_error"] or "") for row in rows)
    assert any(row.get("content") == "bug, key ****" for row in rows)
    assert any("Bearer ****" in text or "Authorization" in text for text in printed)
    assert_nowhere([key_env, key_file], printed, files)


def test_openai_keys_echoed_into_batch_file_answers_appear_nowhere(invoke, monkeypatch) -> None:
    # protocol = "openai-batch" keeps each answer whole (response_body, the batch output
    # shape): a server quoting the key there, or in an error, leaves no trace of it.
    key = "sk-batch-secret-1234567890"

    async def handle(call: Call) -> web.Response:
        quoted = call.headers["Authorization"]
        if call.number % 2:
            error = {"error": {"message": f"refused {quoted}", "type": "invalid_request_error"}}
            return web.json_response(error, status=400)
        return web.json_response({"echo": quoted, "usage": {"prompt_tokens": 1}})

    monkeypatch.setenv("OPENAI_API_KEY", key)
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {"m": i}}
        for i in range(4)
    ]
    Path("batch.jsonl").write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in lines))
    printed: list[str] = []
    with ThreadedServer(handle, path="/v1/chat/completions") as server:
        for output in ("results.jsonl", "results.parquet"):
            job = write_job(
                Path("batch.toml"),
                'name = "batch"\nmax_error_rate = 1\n[input]\npath = "batch.jsonl"\n'
                f'[service]\nurl = "{server.url.removesuffix("/chat/completions")}"\n'
                f'protocol = "openai-batch"\n[output]\npath = "{output}"\n'
                "[retry]\nmax_attempts = 1\n",
            )
            printed += validate_and_run(invoke, job, must_succeed=False)
            result = invoke("inspect", output, "--errors")
            printed += [result.stdout, result.stderr]
    assert {call.headers["Authorization"] for call in server.calls} == {f"Bearer {key}"}
    answers = Path("results.jsonl").read_text()
    assert '"echo": "Bearer ****"' in answers and "refused Bearer ****" in answers
    assert_nowhere([key], printed, files_under(Path()))
