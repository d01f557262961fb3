"""A known token must appear in no output, log, summary or file."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from batchrunner.auth import Secret, mask_headers
from tests.conftest import TOKEN, write_csv, write_job
from tests.servers import Call, ThreadedServer, answer, gateway_error


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


def test_token_appears_nowhere(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        assert call.headers["X-Auth-Token"] == TOKEN  # it is sent, and only here
        if call.number == 1:
            return gateway_error(503, "APIG.0203", "busy")
        if call.number == 4:
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
        for args in (
            ("validate", str(job)),
            ("run", str(job), "--dry-run"),
            ("run", str(job), "--log-format", "json"),
            ("run", str(job), "--log-format", "text", "--progress"),
        ):
            result = invoke(*args)
            printed += [result.stdout, result.stderr]
    assert any("not sent" in text for text in printed)  # the 401 path ran
    for text in printed:
        assert TOKEN not in text
    files = [p for p in Path().rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    assert any(p.name.endswith(".summary.json") for p in files)
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path
