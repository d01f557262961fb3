"""What ``validate`` asks a server about its model before any request is sent.

Where the protocol can say (OIP v2's model metadata, KServe v1's model status, MLflow's
``/ping``), the codec names the URL and judges the answer: inputs that do not match the
columns sent are a ``SettingError`` naming both sides; a server that cannot be asked is a
``ServiceError``. The embedded service is started for the question, as a run starts it.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pyarrow as pa

from batchrunner.auth import Secret
from batchrunner.client import ServiceClient
from batchrunner.credentials import read_credentials
from batchrunner.errors import RequestError, ServiceError
from batchrunner.job.settings import Job
from batchrunner.protocols import Codec


async def ask_service(job: Job, codec: Codec, schema: pa.Schema) -> str | None:
    """Ask the service what it expects and check ``schema`` against it; return what was
    asked and found, in words, or None when the protocol has no such question."""
    service = job.service
    async with AsyncExitStack() as stack:
        url = service.url
        token: Secret | None = None
        app_code: Secret | None = None
        if service.embedded_model is not None:
            from batchrunner.service import ServiceOptions, start_service

            options = ServiceOptions(model=service.embedded_model, protocol=service.protocol)
            running = await start_service(options)
            stack.push_async_callback(running.close)
            url, token = running.url, Secret(running.token)
        probe = codec.probe_url(url)
        if probe is None:
            return None
        if service.embedded_model is None:
            credentials = read_credentials(service)
            app_code = credentials.app_code
            if credentials.tokens is not None:
                token = await credentials.tokens.current()
        client = ServiceClient(
            url,
            None,
            app_code=app_code,
            timeout=service.timeout,
            connect_timeout=service.connect_timeout,
            verify_tls=service.verify_tls,
            ca_bundle=service.ca_bundle,
            max_connections=1,
        )
        async with client:
            try:
                response = await client.get(probe, token=token)
                codec.check_probe(response.status, response.body, schema)
            except RequestError as exc:
                raise ServiceError(f"could not ask the service at {probe}: {exc.message}") from None
        shown = probe if service.embedded_model is None else f"{service.url} ({probe})"
        return f"GET {shown}: HTTP {response.status}, no mismatch with the columns sent"
