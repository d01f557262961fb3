"""Runs over a bucket that last: incremental nights over an image prefix, a run killed and
resumed with its output on the bucket, the store failing for a while (real S3 server)."""

from __future__ import annotations

import io
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner.storage import ObjectStore, is_transient
from tests.conftest import write_job
from tests.s3 import (
    ACCESS_KEY,
    DROP,
    REFUSED,
    S3,
    SECRET_KEY,
    SLOW_DOWN,
    Fault,
    FaultyProxy,
    storage_section,
)
from tests.test_cli_images import COLORS, image
from tests.test_storage import iris_bytes, read_object_table


def same_size(*pictures: bytes) -> list[bytes]:
    """The pictures padded to one length (decoders ignore what follows the end)."""
    longest = max(map(len, pictures))
    return [picture + bytes(longest - len(picture)) for picture in pictures]


def replace_in_the_same_second(s3: S3, bucket: str, key: str, data: bytes) -> None:
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
    before = backend.get_object(bucket, key).last_modified
    s3.put(f"{bucket}/{key}", data)
    backend.get_object(bucket, key).last_modified = before


def night(invoke: Any, s3: S3, number: int) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    output = f"s3://results/night{number}.parquet"
    result = invoke("run", "photos.toml", "--output", output)
    assert result.exit_code == 0, result.stderr
    rows = read_object_table(s3, f"results/night{number}.parquet")
    summary = orjson.loads(s3.get(f"results/night{number}.parquet.summary.json"))
    return result, rows, summary


def test_three_nights_over_an_image_prefix(invoke, s3: S3) -> None:
    s3.bucket("photos")
    s3.bucket("results")
    red, blue = same_size(image(COLORS["red"]), image(COLORS["blue"]))
    for key in ("a/1.png", "a/2.png", "b/3.png", "b/4.png"):
        s3.put(f"photos/drop/{key}", red)
    write_job(
        Path("photos.toml"),
        'name = "photos"\n[input]\npath = "s3://photos/drop/"\nincremental = true\n'
        '[service]\nurl = "embedded:colors"\n' + storage_section(s3.endpoint),
    )
    _, rows, summary = night(invoke, s3, 1)
    assert [row["_key"] for row in rows] == ["a/1.png", "a/2.png", "b/3.png", "b/4.png"]
    assert summary["requests"] == 4

    # Night two: three objects arrive, two are replaced: the same key and size, new bytes,
    # in the same second (the listing's times are whole seconds): only the ETag differs.
    for key in ("a/0.png", "c/5.png", "c/6.png"):
        s3.put(f"photos/drop/{key}", red)
    for key in ("a/2.png", "b/4.png"):
        replace_in_the_same_second(s3, "photos", f"drop/{key}", blue)
    _, rows, summary = night(invoke, s3, 2)
    assert {row["_key"]: row["predicted_label"] for row in rows} == {
        "a/0.png": "red",
        "a/2.png": "blue",
        "b/4.png": "blue",
        "c/5.png": "red",
        "c/6.png": "red",
    }
    assert summary["requests"] == 5
    assert summary["rows"]["skipped"] == 2

    # Night three: nothing new, nothing sent.
    _, rows, summary = night(invoke, s3, 3)
    assert rows == []
    assert summary["requests"] == 0
    assert summary["rows"]["skipped"] == 7


# -- the store failing for a while ---------------------------------------------------------


def every_third_fails(limit: int) -> Fault:
    """SlowDown, then a dropped connection, on every third request of the first ``limit``
    (listings, HEADs, object reads alike), and on the first two writes (the probe, the
    output's upload)."""
    writes: list[str] = []

    def fault(number: int, method: str, path: str) -> str | None:
        if method in ("PUT", "POST"):
            writes.append(path)
            return (SLOW_DOWN, DROP)[len(writes) - 1] if len(writes) <= 2 else None
        if number >= limit or number % 3 != 1:
            return None
        return SLOW_DOWN if number % 2 else DROP

    return fault


@pytest.mark.parametrize("kind", ["images", "table"])
def test_a_store_that_fails_for_a_while_loses_nothing(invoke, s3: S3, kind: str) -> None:
    s3.bucket("data")
    if kind == "images":
        labels = {f"p{i}/{color}.png": color for i in range(3) for color in ("red", "blue")}
        for key, color in labels.items():
            s3.put(f"data/in/{key}", image(COLORS[color]))
        source, url = "s3://data/in/", "embedded:colors"
    else:
        s3.put("data/in/iris.csv", iris_bytes())
        source, url = "s3://data/in/iris.csv", "embedded:iris"
    with FaultyProxy(s3.endpoint, every_third_fails(60)) as proxy:
        write_job(
            Path("job.toml"),
            f'name = "j"\n[input]\npath = "{source}"\n'
            + ('id_column = "id"\n' if kind == "table" else "")
            + f'[service]\nurl = "{url}"\n[output]\npath = "s3://data/out/j.parquet"\n'
            + storage_section(proxy.endpoint),
        )
        result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    assert proxy.faults.count(SLOW_DOWN) >= 2 and proxy.faults.count(DROP) >= 2
    rows = read_object_table(s3, "data/out/j.parquet")
    assert all(row["_status"] == "ok" for row in rows)
    if kind == "images":
        assert {row["_key"]: row["predicted_label"] for row in rows} == labels
    else:
        assert len(rows) == 150 and len({row["_key"] for row in rows}) == 150


def test_each_image_object_is_fetched_with_one_request(invoke, s3: S3) -> None:
    # One GET, not a HEAD for the size and then a GET: on a real store each is a round
    # trip, inside the request's slot.
    s3.bucket("data")
    keys = [f"p{i}/{color}.png" for i in range(3) for color in ("red", "blue")]
    for key in keys:
        s3.put(f"data/in/{key}", image(COLORS[key.split("/")[1][:-4]]))
    asked: list[tuple[str, str]] = []

    def record(number: int, method: str, path: str) -> None:
        asked.append((method, path))

    with FaultyProxy(s3.endpoint, record) as proxy:
        write_job(
            Path("job.toml"),
            'name = "j"\n[input]\npath = "s3://data/in/"\n[service]\nurl = "embedded:colors"\n'
            '[output]\npath = "out/j.parquet"\n' + storage_section(proxy.endpoint),
        )
        result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    fetched = sorted(
        (method, path.removeprefix("/data/in/")) for method, path in asked if path.endswith(".png")
    )
    assert fetched == sorted(("GET", key) for key in keys)


@pytest.mark.parametrize("paged", [False, True], ids=["arrow", "boto3"])
def test_a_small_object_answered_slowdown_is_read_again(s3: S3, paged: bool) -> None:
    # Arrow reads a 20-byte object into a 20-byte buffer: the SlowDown body overflows it,
    # and the SDK gives up ("Failed to flush response stream"); the store tries again.
    # With boto3, one GET, tried again by the store alone (its pauses: its own sleep).
    s3.bucket("small")
    s3.put("small/x.png", b"tiny" * 5)
    answered: list[int] = []

    def fault(number: int, method: str, path: str) -> str | None:
        answered.append(number)
        return SLOW_DOWN if method == "GET" and len(answered) <= 3 else None

    with FaultyProxy(s3.endpoint, fault) as proxy:
        store = ObjectStore(endpoint=proxy.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        pauses: list[float] = []
        store.sleep = pauses.append
        store.paged = paged
        assert store.read(store.locate("s3://small/x.png"), 1000) == b"tiny" * 5
    if paged:
        assert proxy.faults == [SLOW_DOWN] * 3 and pauses == [0.1, 0.2, 0.4]
    else:
        assert proxy.faults and pauses == [0.1, 0.2][: len(pauses)] and pauses


BLOCK = 64 << 10  # input.block_size's least: a table just larger ends in a small read


def table_just_over_a_block(kind: str) -> bytes:
    """Iris-like rows in ``kind``, just over one read block: the last read of a CSV or
    JSON-lines file is a few dozen bytes, shorter than a SlowDown's body; a Parquet file's
    footer and column chunks are read in small ranges too."""
    rows: list[dict[str, Any]] = []
    lines: list[bytes] = []
    size = 0
    while size < BLOCK + 20:
        number = len(rows)
        row = {"id": str(number), "sepal_length": 5.0 + number % 30 / 10, "sepal_width": 3.1,
               "petal_length": 1.4 + number % 50 / 10, "petal_width": 0.2}  # fmt: skip
        rows.append(row)
        line = (
            orjson.dumps(row) + b"\n"
            if kind == "jsonl"
            else ",".join(map(str, row.values())).encode() + b"\n"
        )
        lines.append(line)
        size += len(line)
    if kind == "csv":
        header = b"id,sepal_length,sepal_width,petal_length,petal_width\n"
        return header + b"".join(lines)
    if kind == "jsonl":
        return b"".join(lines)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, row_group_size=500)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_a_table_is_read_whole_through_a_store_that_fails_for_a_while(
    invoke, s3: S3, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every other read of the table, for its first 20 reads, is answered 503 SlowDown (each
    # fourth of them a dropped connection instead): small ranges included.
    monkeypatch.setattr("batchrunner.storage.READ_BACKOFF", 0.001)
    s3.bucket("data")
    data = table_just_over_a_block(kind)
    s3.put(f"data/in/table.{kind}", data)
    reads: list[int] = []

    def fault(number: int, method: str, path: str) -> str | None:
        if method != "GET" or not path.startswith("/data/in/"):
            return None
        reads.append(number)
        if len(reads) > 20 or len(reads) % 2 == 0:
            return None
        return DROP if len(reads) % 8 == 7 else SLOW_DOWN

    with FaultyProxy(s3.endpoint, fault) as proxy:
        write_job(
            Path("job.toml"),
            f'name = "j"\n[input]\npath = "s3://data/in/table.{kind}"\nid_column = "id"\n'
            f"block_size = {BLOCK}\n"
            '[service]\nurl = "embedded:iris"\n[batch]\nsize = 500\n'
            '[output]\npath = "s3://data/out/j.parquet"\n' + storage_section(proxy.endpoint),
        )
        result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    assert proxy.faults.count(SLOW_DOWN) >= 3 and DROP in proxy.faults
    rows = read_object_table(s3, "data/out/j.parquet")
    expected = pq.read_table(io.BytesIO(data)) if kind == "parquet" else None
    count = expected.num_rows if expected is not None else data.count(b"\n") - (kind == "csv")
    assert [row["_key"] for row in rows] == [str(i) for i in range(count)]
    assert all(row["_status"] == "ok" for row in rows)


def test_what_is_tried_again() -> None:
    assert is_transient(OSError("AWS Error SLOW_DOWN during GetObject operation"))
    assert is_transient(OSError("Failed to flush response stream (eof: 0, bad: 1)"))
    assert is_transient(OSError("curl error: Connection reset by peer"))
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during GetObject operation"))
    assert not is_transient(OSError("Path does not exist 'b/x.png'"))


# -- killed mid-run, then resumed, the output on the bucket ---------------------------------


def results(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each key's results: the fields the model answered (not timings nor attempts)."""
    return {row["_key"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in rows}


def journal_bytes(state: Path) -> int:
    return (
        sum(part.stat().st_size for part in state.rglob("*") if part.is_file())
        if (state.exists())
        else 0
    )


def test_a_run_killed_mid_way_resumes_into_the_bucket(invoke, s3: S3) -> None:
    s3.bucket("data")
    s3.put("data/iris.csv", iris_bytes())
    write_job(
        Path("job.toml"),
        'name = "j"\n[input]\npath = "s3://data/iris.csv"\nid_column = "id"\n'
        '[service]\nurl = "embedded:iris"\n[service.embedded]\nlatency_ms = 150\n'
        "[batch]\nsize = 10\nconcurrency = 1\n"
        '[output]\npath = "s3://data/out/j.parquet"\n' + storage_section(s3.endpoint),
    )
    state = Path(".batchrunner/j.state")
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "run", "job.toml"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        start = None
        while time.monotonic() < deadline and process.poll() is None:
            size = journal_bytes(state)
            if start is None and size:
                start = size  # the manifest is written: requests are going out
            elif start is not None and size > start + 2000:
                break  # a few batches are in the journal
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not s3.exists("data/out/j.parquet")  # whole or absent

    result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    rows = read_object_table(s3, "data/out/j.parquet")
    assert [row["_key"] for row in rows] == [str(i) for i in range(1, 151)]
    assert all(row["_status"] == "ok" for row in rows)
    summary = orjson.loads(s3.get("data/out/j.parquet.summary.json"))
    kept = re.search(r"resuming: (\d+) rows in (\d+) finished batches are kept", result.stderr)
    assert kept is not None, result.stderr
    resumed, batches = map(int, kept.groups())
    assert 0 < resumed < 150 and resumed == batches * 10
    assert summary["rows"]["total"] == 150
    assert summary["requests"] == 15 - batches  # only unfinished batches were sent
    # The same results as a run that was never killed.
    clean = invoke("run", "job.toml", "--output", "clean.parquet", "--set", "run.state_dir=s2")
    assert clean.exit_code == 0, clean.stderr
    assert results(rows) == results(pq.read_table("clean.parquet").to_pylist())


# -- a large prefix: memory does not grow with the count ------------------------------------

MEASURE_RUN = """
import gc, sys, time
import orjson
import batchrunner
job = batchrunner.load_job(sys.argv[1])
samples = []
def sample(snapshot):
    # Cheap figures (tracemalloc would make this run three times slower): the interpreter's
    # allocated blocks and the objects the collector tracks.
    done = snapshot.rows_ok + snapshot.rows_error
    samples.append((done, sys.getallocatedblocks(), len(gc.get_objects())))
report = batchrunner.run(job, resume=False, on_progress=sample, progress_interval=0.2)
print(orjson.dumps({"samples": samples, "ok": report.rows_ok}).decode())
"""
LARGE_PREFIX = 10_000


@pytest.mark.slow
def test_a_run_over_10000_image_objects_holds_flat_memory(s3: S3) -> None:
    # The 10,000 small image objects, each fetched from the server, sent to the
    # service and written, in a process of its own (the server keeps this one). Objects are
    # put straight into the server's store: over HTTP one by one they take a minute.
    # About 35 s on two cores: moto's GET costs ~1.3 ms of its process, boto3's ~1.3 ms of
    # the run's, the rest of the run ~1.4 ms an image.
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    s3.bucket("many")
    backend = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
    picture = image(COLORS["red"])
    for index in range(LARGE_PREFIX):
        backend.put_object("many", f"in/{index // 1000}/photo-{index:05d}.png", picture)
    write_job(
        Path("job.toml"),
        'name = "many"\n[input]\npath = "s3://many/in/"\n[service]\nurl = "embedded:colors"\n'
        '[batch]\nconcurrency = 8\n[output]\npath = "s3://many/out/many.parquet"\n'
        + storage_section(s3.endpoint),
    )
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_RUN, "job.toml"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    measured = orjson.loads(done.stdout)
    assert measured["ok"] == LARGE_PREFIX
    assert pq.read_table(io.BytesIO(s3.get("many/out/many.parquet"))).num_rows == LARGE_PREFIX
    samples = measured["samples"]
    early = [s for s in samples if 1_000 <= s[0] <= 3_000]
    late = [s for s in samples if s[0] >= 6_000]
    assert early and late, samples
    # Flat, window against window (medians: a journal's part being written holds ~3% more
    # for a moment, wherever it falls): within 1% of the ~190,000 objects the collector
    # tracks (one kept per image would add 4,000 and more), 2% of the ~865,000 blocks.
    for column, margin in ((1, 1.02), (2, 1.01)):
        before = statistics.median(s[column] for s in early)
        assert statistics.median(s[column] for s in late) < before * margin, samples


def test_keys_refused_mid_run_stop_it_with_exit_3_and_a_rerun_resumes(invoke, s3: S3) -> None:
    # The keys stop working after the 12th image (revoked, or expired): every later image
    # would fail alike, so the run stops at once, its finished batches kept, rather than
    # writing an error row per image. (A single object refused with AccessDenied, its ACL,
    # stays that image's error.)
    s3.bucket("data")
    keys = [f"p{i // 10}/{i:02d}.png" for i in range(40)]
    for index, key in enumerate(keys):
        s3.put(f"data/in/{key}", image(COLORS["red" if index % 2 else "blue"]))
    fetched: list[int] = []
    keys_work_again = False

    def revoked(number: int, method: str, path: str) -> str | None:
        if method == "GET" and path.endswith(".png") and not keys_work_again:
            fetched.append(number)
            return REFUSED if len(fetched) > 12 else None
        return None

    with FaultyProxy(s3.endpoint, revoked) as proxy:
        write_job(
            Path("job.toml"),
            'name = "j"\n[input]\npath = "s3://data/in/"\n[service]\nurl = "embedded:colors"\n'
            '[batch]\nconcurrency = 2\n[output]\npath = "s3://data/out/j.parquet"\n'
            + storage_section(proxy.endpoint),
        )
        stopped = invoke("run", "job.toml")
        first = read_object_table(s3, "data/out/j.parquet")
        keys_work_again = True
        resumed = invoke("run", "job.toml")
    assert stopped.exit_code == 3, stopped.stderr
    assert "the store refused the credentials" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert len(fetched) < 20  # it stopped, it did not try every image
    # As any aborted run: the finished rows, the rest not sent (never one error row per
    # image for keys that no image would have been read with).
    statuses = Counter((row["_status"], row["_error_kind"]) for row in first)
    assert set(statuses) == {("ok", None), ("error", "not_sent")}, statuses
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    rows = read_object_table(s3, "data/out/j.parquet")
    assert [row["_key"] for row in rows] == keys
    assert all(row["_status"] == "ok" for row in rows)
