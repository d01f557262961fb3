"""Bad job files and bad input stop the run before any request, with exit 2 and a message
naming the setting, file, line or column."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import write_csv, write_job
from tests.servers import Call, ThreadedServer, answer


@pytest.fixture
def server():
    async def handle(call: Call) -> web.Response:
        return answer(call)

    with ThreadedServer(handle) as running:
        yield running


def job_text(url: str, data: str = "data.csv", extra: str = "") -> str:
    return f'name = "bad"\n[input]\npath = "{data}"\n{extra}\n[service]\nurl = "{url}"\n'


@pytest.fixture
def data() -> Path:
    return write_csv(Path("data.csv"), ["id", "sepal_length", "petal_width"], [(1, 5.1, 0.2)])


CASES = [
    ("[batch]\nsize = 0\n", "batch.size: input should be greater than or equal to 1, got 0"),
    ("[batch]\nconcurency = 2\n", "unknown setting batch.concurency (did you mean 'concurrency'?)"),
    ('[batch]\nsize = "ten"\n', "batch.size: input should be a valid integer"),
    ("[service.extra]\na = 1\n", "unknown setting service.extra"),
    ("colour = 1\n", "unknown setting colour"),
    ("max_error_rate = 2\n", "max_error_rate: input should be less than or equal to 1"),
]


@pytest.mark.parametrize(("extra", "message"), CASES)
def test_bad_settings_exit_2_naming_the_setting(
    invoke, server, data, extra: str, message: str
) -> None:
    text = job_text(server.url)
    # top-level keys must come before the first table
    text = extra + text if not extra.startswith("[") else text + extra
    write_job(Path("job.toml"), text)
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert message in result.stderr
    assert server.calls == []


def test_missing_input_file(invoke, server) -> None:
    write_job(Path("job.toml"), job_text(server.url, data="nope.csv"))
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert "nope.csv" in result.stderr
    assert server.calls == []


def test_missing_column_with_did_you_mean(invoke, server, data) -> None:
    extra = 'columns = ["sepal_lenght", "petal_width"]'
    write_job(Path("job.toml"), job_text(server.url, extra=extra))
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert "input.columns" in result.stderr
    assert "sepal_lenght" in result.stderr
    assert "did you mean 'sepal_length'" in result.stderr
    assert server.calls == []


def test_missing_id_column(invoke, server, data) -> None:
    write_job(Path("job.toml"), job_text(server.url, extra='id_column = "ID"'))
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert "input.id_column" in result.stderr
    assert "did you mean 'id'" in result.stderr


def test_malformed_csv_line_names_file_and_line(invoke, server) -> None:
    Path("data.csv").write_text("id,x\n1,2\n2,3\n3,4,5\n4,5\n")
    write_job(Path("job.toml"), job_text(server.url))
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert "data.csv" in result.stderr
    assert "line 4" in result.stderr


def test_missing_token_is_an_error_before_any_request(invoke, server, data, monkeypatch) -> None:
    monkeypatch.delenv("MODELARTS_TOKEN")
    write_job(Path("job.toml"), job_text(server.url))
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert "environment variable MODELARTS_TOKEN is not set" in result.stderr
    assert server.calls == []


def test_token_file(invoke, server, data, monkeypatch) -> None:
    monkeypatch.delenv("MODELARTS_TOKEN")
    Path("token").write_text("from-a-file\n")
    write_job(Path("job.toml"), job_text(server.url) + 'token_file = "token"\n')
    result = invoke("run", "job.toml", "--set", "max_error_rate=1")
    assert result.exit_code == 0, result.stderr
    assert server.calls[0].headers["X-Auth-Token"] == "from-a-file"


def test_missing_job_file(invoke) -> None:
    result = invoke("run", "missing.toml")
    assert result.exit_code == 2
    assert "job file not found: missing.toml" in result.stderr


def test_bad_set_assignment(invoke, server, data) -> None:
    write_job(Path("job.toml"), job_text(server.url))
    result = invoke("run", "job.toml", "--set", "batch.size")
    assert result.exit_code == 2
    assert "expected section.key=value" in result.stderr


def test_unknown_output_placeholder(invoke, server, data) -> None:
    write_job(Path("job.toml"), job_text(server.url) + '[output]\npath = "out/{nite}.parquet"\n')
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert "unknown placeholder {nite}" in result.stderr
    assert server.calls == []


def test_validate_reports_the_same_errors(invoke, server, data) -> None:
    write_job(Path("job.toml"), job_text(server.url, extra='columns = ["nope"]'))
    result = invoke("validate", "job.toml")
    assert result.exit_code == 2
    assert "input.columns" in result.stderr


def test_serve_with_iam_needs_the_password_in_the_environment(invoke, monkeypatch) -> None:
    monkeypatch.delenv("BATCHRUNNER_SERVE_IAM_PASSWORD", raising=False)
    result = invoke("serve", "--port", "0", "--iam-user", "alice")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: --iam-user: set the user's password in the environment variable "
        "BATCHRUNNER_SERVE_IAM_PASSWORD (a password never goes on the command line)\n"
    )
