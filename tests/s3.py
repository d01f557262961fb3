"""A real S3 server on loopback for the tests: moto's, in a thread, on a free port.

``S3`` holds the server's endpoint and a pyarrow filesystem to put and read objects with;
``storage_section`` is the ``[storage]`` a job needs to reach it (keys from the environment,
as a user would give them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow.fs as pafs

# Known secrets: tests check that they never leak.
ACCESS_KEY = "AKIATESTKEY7Q3XW9ZE"
SECRET_KEY = "s3-secret-4b8e2f6a1c9d7e305f"


class S3:
    """A running moto S3 server and a filesystem on it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.endpoint = f"http://{host}:{port}"
        self.fs = pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=f"{host}:{port}",
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def bucket(self, name: str) -> str:
        self.fs.create_dir(name)
        return name

    def put(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def get(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            data: bytes = stream.read()
            return data

    def remove_buckets(self) -> None:
        for info in self.fs.get_file_info(pafs.FileSelector("/", recursive=False)):
            self.fs.delete_dir(info.path)

    def exists(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type == pafs.FileType.File)

    def keys(self, prefix: str) -> list[str]:
        selector = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
        return sorted(
            info.path for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File
        )


def storage_section(endpoint: str, *, addressing: str = "path") -> str:
    return (
        f'[storage]\nendpoint = "{endpoint}"\nregion = "us-east-1"\naddressing = "{addressing}"\n'
        'access_key_env = "TEST_S3_ACCESS_KEY"\nsecret_key_env = "TEST_S3_SECRET_KEY"\n'
    )


def moto_server() -> Iterator[tuple[str, int]]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield host, port
    finally:
        server.stop()
