"""Notifications: a command given the summary on stdin, an incoming webhook received by a real
local server; a notifier that fails or hangs never changes the run's exit code."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from batchrunner.job import NotifySettings
from batchrunner.notify import RunEnd, send_notifications, wants
from tests.conftest import write_csv, write_job
from tests.servers import Call, ThreadedServer

WEBHOOK_PATH = "/services/T0001/B0002/hook-secret-4b7e1d9c0a2f"
#: A command that saves what it reads on stdin in received.json.
SAVE_STDIN = [
    sys.executable,
    "-c",
    "import sys, pathlib; pathlib.Path('received.json').write_bytes(sys.stdin.buffer.read())",
]


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(orjson.dumps(item).decode() for item in items) + "]"


def job_file(notify: str, *, bad: int = 0) -> Path:
    rows = [(f"r{i}", 5.1, 3.5, 1.4, "" if i < bad else 0.2) for i in range(4)]
    data = write_csv(
        Path("data.csv"),
        ["id", "sepal_length", "sepal_width", "petal_length", "petal_width"],
        rows,
    )
    return write_job(
        Path("nightly.toml"),
        f'name = "nightly"\n[input]\npath = "{data}"\nid_column = "id"\n'
        f'[service]\nurl = "embedded:iris"\n[batch]\nsize = 2\n[notify]\n{notify}\n',
    )


def test_a_failed_run_runs_the_command_with_the_summary(invoke) -> None:
    result = invoke("run", str(job_file(f"command = {toml_list(SAVE_STDIN)}", bad=1)))
    assert result.exit_code == 1
    received = orjson.loads(Path("received.json").read_bytes())
    assert received["job"] == "nightly"
    assert received["event"] == "failure"
    assert received["exit_code"] == 1
    assert "error rate 25.00% is above max_error_rate 0.00%" in received["message"]
    assert received["summary"] == orjson.loads(
        Path("out/nightly.parquet.summary.json").read_bytes()
    )
    assert "notified: failure" in result.stderr


def test_success_is_told_only_when_asked(invoke) -> None:
    quiet = invoke("run", str(job_file(f"command = {toml_list(SAVE_STDIN)}")))
    assert quiet.exit_code == 0
    assert not Path("received.json").exists()  # on = ["failure"] by default
    told = invoke(
        "run",
        str(job_file(f'on = ["failure", "success"]\ncommand = {toml_list(SAVE_STDIN)}')),
    )
    assert told.exit_code == 0
    received = orjson.loads(Path("received.json").read_bytes())
    assert (received["event"], received["exit_code"]) == ("success", 0)
    assert received["message"].startswith("4 rows ok, 0 errors in ")


def test_invalid_input_of_a_valid_job_is_a_failure(invoke) -> None:
    job = job_file(f"command = {toml_list(SAVE_STDIN)}")
    Path("data.csv").unlink()
    result = invoke("run", str(job))
    assert result.exit_code == 2
    received = orjson.loads(Path("received.json").read_bytes())
    assert received["exit_code"] == 2
    assert received["summary"] is None
    assert "data.csv" in received["message"]


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ([sys.executable, "-c", "import sys; print('no mail today', file=sys.stderr); sys.exit(3)"],
         f"{sys.executable} failed with exit code 3: no mail today"),
        ([sys.executable, "-c", "import time; time.sleep(30)"],
         f"{sys.executable} did not finish within 0.3 s; it was stopped"),
        (["/no/such/notifier"], "cannot run /no/such/notifier"),
    ],
)  # fmt: skip
def test_a_failing_or_hanging_command_changes_nothing(invoke, command, problem) -> None:
    notify = f"command = {toml_list(command)}\ntimeout = 0.3"
    result = invoke("run", str(job_file(notify, bad=1)))
    assert result.exit_code == 1  # the run's own exit code
    assert f"notify.command: {problem}" in result.stderr
    assert "(the run's exit code stays 1)" in result.stderr


@pytest.fixture
def webhook():
    async def handle(call: Call) -> web.Response:
        return web.Response(text="ok")

    with ThreadedServer(handle, path=WEBHOOK_PATH) as server:
        yield server


def test_the_webhook_receives_a_text_and_the_summary(invoke, webhook, monkeypatch) -> None:
    monkeypatch.setenv("HOOK_URL", webhook.url)
    result = invoke("run", str(job_file('webhook_url_env = "HOOK_URL"', bad=1)))
    assert result.exit_code == 1
    assert len(webhook.calls) == 1
    call = webhook.calls[0]
    assert call.headers["Content-Type"] == "application/json"
    assert set(call.body) == {"text", "summary"}
    assert call.body["text"].startswith("batchrunner job nightly FAILED (exit 1): 3 rows ok, ")
    assert call.body["summary"]["rows"]["error"] == 1
    assert WEBHOOK_PATH not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("status", "problem"),
    [(500, "the webhook answered HTTP 500"), (None, "the webhook did not answer within 0.3 s")],
)
def test_a_failing_or_hanging_webhook_changes_nothing(invoke, monkeypatch, status, problem) -> None:
    async def handle(call: Call) -> web.Response:
        if status is None:
            await asyncio.sleep(5)  # cut short when the server stops
        return web.Response(status=status or 200, text=f"bad {WEBHOOK_PATH}")

    with ThreadedServer(handle, path=WEBHOOK_PATH) as server:
        monkeypatch.setenv("HOOK_URL", server.url)
        result = invoke("run", str(job_file('webhook_url_env = "HOOK_URL"\ntimeout = 0.3')))
    assert result.exit_code == 0
    assert server.calls == []  # success: nobody is told
    # now a failure, told to a webhook that fails
    with ThreadedServer(handle, path=WEBHOOK_PATH) as server:
        monkeypatch.setenv("HOOK_URL", server.url)
        result = invoke("run", str(job_file('webhook_url_env = "HOOK_URL"\ntimeout = 0.3', bad=1)))
        assert len(server.calls) == 1
    assert result.exit_code == 1
    assert f"notify.webhook_url_env: {problem} (the run's exit code stays 1)" in result.stderr
    assert WEBHOOK_PATH not in result.stderr + result.stdout


def test_a_redirect_is_not_followed(invoke, monkeypatch) -> None:
    async def elsewhere(call: Call) -> web.Response:
        return web.Response(text="ok")

    with ThreadedServer(elsewhere) as other:

        async def redirect(call: Call) -> web.Response:
            return web.Response(status=307, headers={"Location": other.url})

        with ThreadedServer(redirect, path=WEBHOOK_PATH) as hook:
            monkeypatch.setenv("HOOK_URL", hook.url)
            result = invoke("run", str(job_file('webhook_url_env = "HOOK_URL"', bad=1)))
            assert len(hook.calls) == 1
        assert other.calls == []
    assert result.exit_code == 1
    assert "the webhook answered HTTP 307" in result.stderr


def test_a_missing_webhook_variable_is_logged(invoke, monkeypatch) -> None:
    monkeypatch.delenv("HOOK_URL", raising=False)
    result = invoke("run", str(job_file('webhook_url_env = "HOOK_URL"', bad=1)))
    assert result.exit_code == 1
    assert "notify.webhook_url_env: environment variable HOOK_URL is not set or empty" in (
        result.stderr
    )


def test_an_unreachable_webhook_is_masked(tmp_path: Path) -> None:
    settings = NotifySettings(webhook_url_env="HOOK_URL", timeout=0.5)
    url = f"http://127.0.0.1:9{WEBHOOK_PATH}"  # port 9 (discard): nobody listens here
    problems = send_notifications(
        settings, RunEnd("nightly", 1, "failed"), environ={"HOOK_URL": url}
    )
    assert len(problems) == 1
    assert problems[0].startswith("notify.webhook_url_env: cannot reach the webhook: ")
    assert "hook-secret" not in problems[0]


def test_which_ends_are_told() -> None:
    failures = NotifySettings(command=("true",))
    both = NotifySettings(command=("true",), on=("failure", "success"))
    cases = [(0, False, True), (1, True, True), (2, True, True), (3, True, True)]
    cases += [(130, True, True), (75, False, False)]
    for code, failure_told, success_told in cases:
        end = RunEnd("job", code, "")
        assert wants(failures, end) is failure_told
        assert wants(both, end) is (success_told if code == 0 else failure_told)


def test_notify_settings_are_checked(invoke) -> None:
    result = invoke("validate", str(job_file('on = ["failure"]')))
    assert result.exit_code == 2
    assert "notify: say how to notify: command = [...]" in result.stderr
    result = invoke("validate", str(job_file('webhook_url_env = "https://hooks.slack.com/x"')))
    assert result.exit_code == 2
    assert "hooks.slack.com" not in result.stderr  # a pasted secret is not echoed
    assert "notify.webhook_url_env" in result.stderr
