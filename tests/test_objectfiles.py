"""An object opened for Arrow's readers: random access by ranges, each range tried again
on the store's transient errors (a real S3 server, through a proxy that injects them)."""

from __future__ import annotations

import gzip
import io

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from batchrunner.objectfiles import ObjectFile, readable, seekable
from batchrunner.storage import READ_ATTEMPTS, ObjectStore
from tests.s3 import ACCESS_KEY, S3, SECRET_KEY, SLOW_DOWN, Fault, FaultyProxy


def proxied_store(proxy: FaultyProxy, pauses: list[float]) -> ObjectStore:
    store = ObjectStore(endpoint=proxy.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    store.sleep = pauses.append
    return store


def slow_down_every_other_get() -> Fault:
    """Every other GET (the first, the third...) answered 503 SlowDown."""
    gets: list[str] = []

    def fault(number: int, method: str, path: str) -> str | None:
        if method != "GET":
            return None
        gets.append(path)
        return SLOW_DOWN if len(gets) % 2 else None

    return fault


def test_small_ranges_answered_slowdown_are_read_again(s3: S3) -> None:
    s3.bucket("files")
    data = bytes(range(256)) * 4
    s3.put("files/blob.bin", data)
    pauses: list[float] = []
    with FaultyProxy(s3.endpoint, slow_down_every_other_get()) as proxy:
        store = proxied_store(proxy, pauses)
        file = ObjectFile(store.locate("s3://files/blob.bin"))
        assert file.size() == len(data)
        assert [file.read(100) for _ in range(11)] == [
            data[i : i + 100] for i in range(0, 1100, 100)
        ]
        assert file.read(100) == b""  # past the end: nothing, and nothing asked
        file.seek(-24, io.SEEK_END)
        assert file.read() == data[-24:]
        native = pa.PythonFile(file, mode="r")
        assert native.read_at(10, 500) == data[500:510]
    # Each 100-byte range was refused once (its body overflows the range) and read again.
    assert proxy.faults.count(SLOW_DOWN) >= 10
    assert pauses == [0.1] * len(pauses) and len(pauses) >= 10


def test_tables_and_compressed_text_through_the_store(s3: S3) -> None:
    s3.bucket("files")
    table = pa.table({"id": [str(i) for i in range(300)], "x": [i / 3 for i in range(300)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=50)
    s3.put("files/t.parquet", buffer.getvalue())
    text = io.BytesIO()
    pcsv.write_csv(table, text)
    s3.put("files/t.csv.gz", text.getvalue())  # (Arrow compresses it, by the name)
    assert gzip.decompress(s3.fs.open_input_stream("files/t.csv.gz", compression=None).read())
    pauses: list[float] = []
    with FaultyProxy(s3.endpoint, slow_down_every_other_get()) as proxy:
        store = proxied_store(proxy, pauses)
        with pq.ParquetFile(seekable(store.locate("s3://files/t.parquet"))) as parquet:
            assert parquet.read().equals(table)
        csv = pcsv.read_csv(readable(store.locate("s3://files/t.csv.gz")))
        assert csv.column("x").to_pylist() == table.column("x").to_pylist()
    # Ranges larger than a SlowDown's body: the SDK tried them again itself.
    assert proxy.faults.count(SLOW_DOWN) >= 3


def test_a_store_that_keeps_failing_is_an_error_naming_the_object(s3: S3) -> None:
    s3.bucket("files")
    s3.put("files/x.csv", b"id\n1\n")
    pauses: list[float] = []

    def always(number: int, method: str, path: str) -> str | None:
        return SLOW_DOWN if method == "GET" else None

    with FaultyProxy(s3.endpoint, always) as proxy:
        store = proxied_store(proxy, pauses)
        file = ObjectFile(store.locate("s3://files/x.csv"))
        with pytest.raises(OSError, match=r"^s3://files/x.csv: .*Failed to flush"):
            file.read()
    assert pauses == [0.1, 0.2, 0.4, 0.8][: READ_ATTEMPTS - 1]


def test_a_missing_object_is_not_tried_again(s3: S3) -> None:
    s3.bucket("files")
    pauses: list[float] = []
    store = ObjectStore(endpoint=s3.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    store.sleep = pauses.append
    with pytest.raises(OSError, match=r"^s3://files/gone\.csv: "):
        ObjectFile(store.locate("s3://files/gone.csv"))
    assert pauses == []
