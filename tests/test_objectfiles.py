"""An object opened for Arrow's readers: random access by ranges, each range tried again
on the store's transient errors (a real S3 server, through a proxy that injects them)."""

from __future__ import annotations

import gzip
import io

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from batchrunner.objectfiles import ObjectFile, readable, retrying_filesystem, seekable
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


class SmallRanges:
    """Each range shorter than a SlowDown's body answered SlowDown once: the SDK gives
    those up at once (larger ones it tries again itself, with a backoff of its own: slow
    for a test). ``proxy`` is set once the proxy is made."""

    def __init__(self) -> None:
        self.proxy: FaultyProxy | None = None
        self.refused: set[str] = set()

    def __call__(self, number: int, method: str, path: str) -> str | None:
        assert self.proxy is not None
        wanted = self.proxy.ranges[-1]
        start, _, end = wanted.removeprefix("bytes=").partition("-")
        if method != "GET" or not end or int(end) - int(start) >= 100 or wanted in self.refused:
            return None
        self.refused.add(wanted)
        return SLOW_DOWN


def faulty(s3: S3, fault: SmallRanges) -> FaultyProxy:
    fault.proxy = FaultyProxy(s3.endpoint, fault)
    return fault.proxy


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
    pq.write_table(table.slice(0, 12), buffer, row_group_size=3, compression="none")
    table = table.slice(0, 12)
    s3.put("files/t.parquet", buffer.getvalue())
    text = io.BytesIO()
    pcsv.write_csv(table, text)
    s3.put("files/t.csv.gz", text.getvalue())  # (Arrow compresses it, by the name)
    assert gzip.decompress(s3.fs.open_input_stream("files/t.csv.gz", compression=None).read())
    pauses: list[float] = []
    with faulty(s3, SmallRanges()) as proxy:
        store = proxied_store(proxy, pauses)
        with pq.ParquetFile(
            seekable(store.locate("s3://files/t.parquet")), pre_buffer=False
        ) as parquet:
            assert pa.Table.from_batches(parquet.iter_batches(batch_size=50)).equals(table)
        csv = pcsv.read_csv(readable(store.locate("s3://files/t.csv.gz")))
        assert csv.column("x").to_pylist() == table.column("x").to_pylist()
    assert proxy.faults and pauses == [0.1] * len(proxy.faults)


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


def test_a_dataset_on_the_retrying_filesystem(s3: S3) -> None:
    # What `inspect` reads an output in a bucket through: a folder of parts; read chunk by
    # chunk (no read-ahead), their small column chunks answered SlowDown now and then.
    import pyarrow.dataset as ds

    s3.bucket("files")
    parts = [pa.table({"_key": [f"{p}-{i}" for i in range(8)], "x": list(range(8))})
             for p in range(2)]  # fmt: skip
    for number, part in enumerate(parts):
        buffer = io.BytesIO()
        pq.write_table(part, buffer, row_group_size=2, compression="none")
        s3.put(f"files/out.parquet/part-{number}.parquet", buffer.getvalue())
    pauses: list[float] = []
    unbuffered = ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=False)
    )
    with faulty(s3, SmallRanges()) as proxy:
        store = proxied_store(proxy, pauses)
        filesystem = retrying_filesystem(store)
        dataset = ds.dataset("files/out.parquet", filesystem=filesystem, format=unbuffered)
        table = dataset.to_table(use_threads=False).sort_by("_key")
    assert table.equals(pa.concat_tables(parts).sort_by("_key"))
    assert proxy.faults and pauses  # small ranges, tried again by us
