"""TLS: verified by default, a CA bundle to trust a private CA, and an explicit opt-out."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from batchrunner.client import tls_context
from tests.conftest import read_output, write_csv
from tests.servers import Call, ThreadedServer, answer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture
def https_server(tmp_path: Path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handle(call: Call) -> web.Response:
        return answer(call)

    with ThreadedServer(handle, ssl_context=context) as server:
        server.cert = cert  # type: ignore[attr-defined]
        yield server


def run_against(invoke, server: ThreadedServer, *settings: str):
    data = write_csv(Path("d.csv"), ["x"], [(1,), (2,)])
    assignments = [part for setting in settings for part in ("--set", setting)]
    return invoke("run", "--input", str(data), "--url", server.url, *assignments)


def test_an_untrusted_certificate_stops_the_run(invoke, https_server: ThreadedServer) -> None:
    result = run_against(invoke, https_server)
    assert result.exit_code == 3
    assert "TLS certificate of 127.0.0.1 not trusted" in result.stderr
    assert "set service.ca_bundle" in result.stderr
    assert https_server.calls == []


def test_ca_bundle_trusts_a_private_ca(invoke, https_server: ThreadedServer) -> None:
    cert = https_server.cert  # type: ignore[attr-defined]
    result = run_against(invoke, https_server, f'service.ca_bundle="{cert}"')
    assert result.exit_code == 0, result.stderr
    assert [row["_status"] for row in read_output("out/d.parquet")] == ["ok", "ok"]


def test_verify_tls_false_skips_the_check(invoke, https_server: ThreadedServer) -> None:
    result = run_against(invoke, https_server, "service.verify_tls=false")
    assert result.exit_code == 0, result.stderr
    assert len(https_server.calls) == 1


def test_missing_ca_bundle_is_a_setting_error(invoke, https_server: ThreadedServer) -> None:
    result = run_against(invoke, https_server, 'service.ca_bundle="nowhere.pem"')
    assert result.exit_code == 2
    assert "service.ca_bundle: no such file: nowhere.pem" in result.stderr


def console_run(server: ThreadedServer, tmp_path: Path, env: dict[str, str], *settings: str):
    """The whole console command in its own process: start-up's ``lean_process`` has left
    aiohttp's default TLS contexts without CAs there, so only batchrunner's own decide."""
    data = write_csv(tmp_path / "d.csv", ["x"], [(1,), (2,)])
    assignments = [part for setting in settings for part in ("--set", setting)]
    command = [sys.executable, "-m", "batchrunner", "run", "--input", str(data)]
    command += ["--url", server.url, "--output", str(tmp_path / "out.parquet"), *assignments]
    environment = {**os.environ, "MODELARTS_TOKEN": "tls-test-token", **env}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60)


def test_the_console_verifies_with_the_systems_cas(https_server: ThreadedServer, tmp_path: Path):
    cert = str(https_server.cert)  # type: ignore[attr-defined]
    refused = console_run(https_server, tmp_path, {})
    assert refused.returncode == 3 and "not trusted" in refused.stderr
    assert https_server.calls == []
    # The system's CAs are read for an https URL: here, the ones SSL_CERT_FILE names.
    trusted = console_run(https_server, tmp_path, {"SSL_CERT_FILE": cert})
    assert trusted.returncode == 0, trusted.stderr
    bundle = console_run(https_server, tmp_path, {}, f'service.ca_bundle="{cert}"')
    assert bundle.returncode == 0, bundle.stderr


def test_a_context_for_each_url() -> None:
    plain = tls_context("http://127.0.0.1:8080/v1/infers/x", True, None)
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname
    assert plain.cert_store_stats()["x509_ca"] == 0  # trusts nothing: no TLS goes there
    unchecked = tls_context("https://gateway/v1/infers/x", False, None)
    assert unchecked.verify_mode == ssl.CERT_NONE and not unchecked.check_hostname
    verified = tls_context("HTTPS://gateway/v1/infers/x", True, None)
    assert verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname
