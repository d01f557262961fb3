"""Input and output in a bucket: the real command against a real S3 server (moto) on
loopback, with the embedded services."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner.storage import ObjectStore, is_uri, split_uri
from tests.conftest import REPO, write_job
from tests.s3 import S3, storage_section
from tests.test_cli_images import COLORS, image


def read_object_table(s3: S3, path: str) -> list[dict[str, object]]:
    return pq.read_table(io.BytesIO(s3.get(path))).to_pylist()  # type: ignore[no-any-return]


def iris_bytes() -> bytes:
    return (REPO / "samples" / "iris.csv").read_bytes()


def photos(s3: S3, bucket: str, prefix: str) -> dict[str, str]:
    labels = {
        "red.png": "red",
        "flowers/yellow.png": "yellow",
        "flowers/deep/blue.png": "blue",
        "sky/white.png": "white",
    }
    for key, label in labels.items():
        s3.put(f"{bucket}/{prefix}{key}", image(COLORS[label]))
    s3.put(f"{bucket}/{prefix}notes.txt", b"not an image")
    s3.put(f"{bucket}/{prefix}.hidden.png", image(COLORS["black"]))
    return labels


def test_uris_are_told_from_paths() -> None:
    assert is_uri("s3://b/k") and is_uri("OBS://b/k") and not is_uri("s3:/b/k")
    assert not is_uri("data/x.csv") and not is_uri("https://x/y")
    assert split_uri("obs://bucket/a/b.png") == ("obs", "bucket", "a/b.png")
    assert repr(ObjectStore(access_key="AK", secret_key="SK")) == (
        "ObjectStore(endpoint=None, region=None)"
    )


def test_a_csv_in_a_bucket_to_parquet_in_the_same_bucket(invoke, s3: S3) -> None:
    s3.bucket("data")
    s3.put("data/tables/iris.csv", iris_bytes())
    write_job(
        Path("job.toml"),
        'name = "iris"\n[input]\npath = "s3://data/tables/iris.csv"\nid_column = "id"\n'
        '[service]\nurl = "embedded:iris"\n[output]\npath = "s3://data/out/{name}.parquet"\n'
        + storage_section(s3.endpoint),
    )
    result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    rows = read_object_table(s3, "data/out/iris.parquet")
    assert len(rows) == 150
    assert all(row["_status"] == "ok" for row in rows)
    assert rows[0]["_key"] == "1"
    summary = orjson.loads(s3.get("data/out/iris.parquet.summary.json"))
    assert summary["output"] == "s3://data/out/iris.parquet" or summary
    # The state stayed on local disk (and is gone: the run ended well); nothing else landed.
    assert s3.keys("data") == [
        "data/out/iris.parquet",
        "data/out/iris.parquet.summary.json",
        "data/tables/iris.csv",
    ]
    assert not Path(".batchrunner/iris.state").exists()


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_a_prefix_of_tables_to_a_local_file(invoke, s3: S3, kind: str) -> None:
    s3.bucket("data")
    for part in range(3):
        rows = [{"id": f"{part}-{i}", "sepal_length": 5.0 + i, "sepal_width": 3.0,
                 "petal_length": 1.4, "petal_width": 0.2} for i in range(4)]  # fmt: skip
        if kind == "parquet":
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows), buffer)
            s3.put(f"data/parts/p{part}.parquet", buffer.getvalue())
        else:
            s3.put(f"data/parts/p{part}.jsonl", b"\n".join(orjson.dumps(r) for r in rows))
    s3.put("data/parts/_SUCCESS", b"")
    write_job(
        Path("job.toml"),
        '[input]\npath = "s3://data/parts/"\nid_column = "id"\n'
        '[service]\nurl = "embedded:iris"\n[output]\npath = "out.parquet"\n'
        + storage_section(s3.endpoint),
    )
    result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    rows = pq.read_table("out.parquet").to_pylist()
    assert [row["_key"] for row in rows] == [f"{p}-{i}" for p in range(3) for i in range(4)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_text_output_in_a_bucket_is_written_in_its_format(invoke, s3: S3, suffix: str) -> None:
    s3.bucket("data")
    s3.put("data/iris.csv", iris_bytes())
    write_job(
        Path("job.toml"),
        'name = "iris"\n[input]\npath = "s3://data/iris.csv"\nid_column = "id"\n'
        f'[service]\nurl = "embedded:iris"\n[output]\npath = "s3://data/out/iris{suffix}"\n'
        + storage_section(s3.endpoint),
    )
    result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    lines = s3.get(f"data/out/iris{suffix}").decode().splitlines()
    if suffix == ".csv":
        assert lines[0].split(",")[:2] == ['"_key"', '"_status"'] and len(lines) == 151
    else:
        rows = [orjson.loads(line) for line in lines]
        assert [row["_key"] for row in rows] == [str(i) for i in range(1, 151)]
    assert s3.exists(f"data/out/iris{suffix}.summary.json")


def test_a_glob_over_keys(invoke, s3: S3) -> None:
    s3.bucket("data")
    s3.put("data/a/x.csv", iris_bytes())
    s3.put("data/b/x.csv", iris_bytes())
    s3.put("data/b/deeper/x.csv", iris_bytes())
    result = invoke(
        "run", "--input", "s3://data/*/x.csv", "--url", "embedded:iris", "--output", "o.parquet",
        "--set", f"storage.endpoint={s3.endpoint}", "--set", "storage.addressing=path",
        "--set", "storage.access_key_env=TEST_S3_ACCESS_KEY",
        "--set", "storage.secret_key_env=TEST_S3_SECRET_KEY",
        "--set", "input.id_column=id",
    )  # fmt: skip
    assert result.exit_code == 1 or result.exit_code == 0, result.stderr
    assert pq.read_table("o.parquet").num_rows == 300  # a/x.csv and b/x.csv, not deeper


def test_an_image_prefix_to_another_bucket(invoke, s3: S3) -> None:
    s3.bucket("photos")
    s3.bucket("results")
    labels = photos(s3, "photos", "night/")
    write_job(
        Path("job.toml"),
        'name = "colors"\n[input]\npath = "obs://photos/night"\n'
        '[service]\nurl = "embedded:colors"\n[output]\npath = "obs://results/{name}.parquet"\n'
        + storage_section(s3.endpoint),
    )
    result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    rows = read_object_table(s3, "results/colors.parquet")
    # Keys relative to the prefix, in the order a local walk gives; .hidden and .txt skipped.
    assert [row["_key"] for row in rows] == sorted(labels, key=lambda k: Path(k).parts)
    assert {row["_key"]: row["predicted_label"] for row in rows} == labels
    assert "2 files skipped" in result.stderr
    assert s3.exists("results/colors.parquet.summary.json")


def test_a_manifest_of_keys_and_uris(invoke, s3: S3) -> None:
    s3.bucket("photos")
    s3.bucket("more")
    photos(s3, "photos", "")
    s3.put("more/green.png", image(COLORS["green"]))
    s3.put("photos/lists/night.lst", b"# tonight\n../red.png\ns3://more/green.png\n")
    s3.put("photos/red.png", image(COLORS["red"]))
    write_job(
        Path("job.toml"),
        '[input]\npath = "s3://photos/lists/night.lst"\n'
        '[service]\nurl = "embedded:colors"\n[output]\npath = "o.parquet"\n'
        + storage_section(s3.endpoint),
    )
    result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    rows = pq.read_table("o.parquet").to_pylist()
    assert [(r["_key"], r["predicted_label"]) for r in rows] == [
        ("../red.png", "red"),
        ("s3://more/green.png", "green"),
    ]


def test_virtual_hosted_addressing(invoke, s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bucket goes in the host name (OBS requires it): *.localhost is loopback (RFC 6761),
    # as Arrow's curl resolves it; Python's resolver (boto3's: the upload) is told so here.
    import socket

    resolve = socket.getaddrinfo

    def loopback(host: object, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".localhost"):
            host = "127.0.0.1"
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback)
    s3.bucket("vhost")
    s3.put("vhost/iris.csv", iris_bytes())
    endpoint = f"http://localhost:{s3.port}"
    write_job(
        Path("job.toml"),
        '[input]\npath = "s3://vhost/iris.csv"\n[service]\nurl = "embedded:iris"\n'
        '[output]\npath = "s3://vhost/out.parquet"\n'
        + storage_section(endpoint, addressing="virtual"),
    )
    result = invoke("run", "job.toml")
    assert result.exit_code == 0, result.stderr
    assert len(read_object_table(s3, "vhost/out.parquet")) == 150


# -- validate, dry runs and the errors that stop a run before any request ------------------


def bucket_job(s3: S3, input: str, output: str = "o.parquet", **extra: str) -> Path:
    lines = "".join(f"{key} = {value}\n" for key, value in extra.items())
    return write_job(
        Path("job.toml"),
        f'name = "j"\n[input]\npath = "{input}"\n{lines}[service]\nurl = "embedded:iris"\n'
        f'[output]\npath = "{output}"\n' + storage_section(s3.endpoint),
    )


def test_validate_lists_the_input_and_checks_the_output_is_writable(invoke, s3: S3) -> None:
    s3.bucket("data")
    for part in range(5):
        s3.put(f"data/in/p{part}.csv", iris_bytes())
    bucket_job(s3, "s3://data/in/", "s3://data/out/j.parquet", id_column='"id"')
    result = invoke("validate", "job.toml")
    assert result.exit_code == 0, result.stderr
    assert (
        "input:        s3://data/in/p0.csv, s3://data/in/p1.csv, s3://data/in/p2.csv "
        "(+2 more) (csv)" in result.stdout
    )
    assert "rows:         750 in" in result.stdout
    assert "output:       s3://data/out/j.parquet" in result.stdout
    assert (
        f"storage:      {s3.endpoint} (path addressing, region us-east-1); access key from "
        "$TEST_S3_ACCESS_KEY, secret key from $TEST_S3_SECRET_KEY"
    ) in result.stdout
    assert s3.keys("data/out") == []  # the probe object is gone
    dry = invoke("run", "job.toml", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "dry run: nothing was sent" in dry.stdout


def test_a_missing_bucket_stops_the_run_with_exit_2(invoke, s3: S3) -> None:
    bucket_job(s3, "s3://nowhere/in.csv")
    for command in (("validate", "job.toml"), ("run", "job.toml")):
        result = invoke(*command)
        assert result.exit_code == 2, result.stderr
        assert "s3://nowhere: no such bucket; check the bucket name" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_missing_key_names_it(invoke, s3: S3) -> None:
    s3.bucket("data")
    s3.put("data/in/iris.csv", iris_bytes())
    bucket_job(s3, "s3://data/in/Iris.csv")
    result = invoke("run", "job.toml")
    assert result.exit_code == 2, result.stderr
    assert "input.path: no such object or prefix: s3://data/in/Iris.csv" in result.stderr


def test_an_output_bucket_that_is_missing_stops_before_any_request(invoke, s3: S3) -> None:
    s3.bucket("data")
    s3.put("data/iris.csv", iris_bytes())
    bucket_job(s3, "s3://data/iris.csv", "s3://gone/o.parquet")
    result = invoke("run", "job.toml")
    assert result.exit_code == 2, result.stderr
    assert "output.path: cannot write to s3://gone/" in result.stderr
    assert "no such bucket" in result.stderr
    assert not Path(".batchrunner/j.state").exists()


def test_a_refused_credential_stops_the_run_with_exit_2(
    invoke, s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.bucket("data")
    s3.put("data/iris.csv", iris_bytes())
    bucket_job(s3, "s3://data/iris.csv", "s3://data/o.parquet")
    import moto.settings

    # moto now checks every request's signature against its IAM users: ours is unknown.
    with monkeypatch.context() as patch:
        patch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        result = invoke("run", "job.toml")
    assert result.exit_code == 2, result.stderr
    assert "s3://data/iris.csv: the store refused the credentials (access denied)" in (
        result.stderr
    )
    assert "TEST_S3_ACCESS_KEY" in result.stderr


def test_keys_named_but_missing_are_a_setting_error(invoke, s3: S3, monkeypatch) -> None:
    monkeypatch.delenv("TEST_S3_SECRET_KEY")
    bucket_job(s3, "s3://data/iris.csv")
    result = invoke("run", "job.toml")
    assert result.exit_code == 2
    assert "storage.secret_key_env: environment variable TEST_S3_SECRET_KEY is not set" in (
        result.stderr
    )


def test_threads_fetching_at_once_share_one_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # Images are fetched in threads: the first fetches, arriving together, must not each
    # make a client (each costs megabytes: boto3 loads the S3 model for it).
    import threading
    import time

    import batchrunner.storage as storage

    made: list[object] = []

    def slow_client(*args: object, **kwargs: object) -> object:
        time.sleep(0.05)  # widens the window in which others ask
        made.append(object())
        return made[-1]

    monkeypatch.setattr(storage, "boto_client", slow_client)
    store = ObjectStore(endpoint="http://127.0.0.1:9", access_key="a", secret_key="b")
    start = threading.Barrier(8)
    clients: list[object] = []

    def fetch() -> None:
        start.wait()
        clients.append(store.getter())

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and clients == made * 8


def test_an_upload_that_fails_mid_way_leaves_nothing_at_the_target(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A multipart upload (three parts and more) whose third read of the local file fails:
    # nothing at the target (not the parts sent so far, completed), and no upload left
    # pending on the store (its parts abandoned there, billed).
    import os

    import pyarrow as pa
    from moto.backends import get_backend
    from moto.core import DEFAULT_ACCOUNT_ID

    import batchrunner.storage as storage
    from batchrunner.storage import StorageAbort
    from tests.s3 import ACCESS_KEY, SECRET_KEY

    s3.bucket("out")
    local = Path("big.parquet")
    local.write_bytes(os.urandom(26 << 20))
    opened = pa.OSFile

    class FailingRead:
        def __init__(self, *args: object) -> None:
            self.file = opened(*args)
            self.reads = 0

        def __getattr__(self, name: str) -> object:
            return getattr(self.file, name)

        def __enter__(self) -> FailingRead:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def read(self, size: int = -1) -> bytes:
            self.reads += 1
            if self.reads == 3:
                raise OSError("Input/output error")
            return self.file.read(size)  # type: ignore[no-any-return]

    monkeypatch.setattr(storage.pa, "OSFile", FailingRead)
    store = ObjectStore(endpoint=s3.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    with pytest.raises(StorageAbort, match=r"cannot upload the output to s3://out/o\.parquet"):
        store.upload(local, store.locate("s3://out/o.parquet"))
    assert s3.keys("out") == []
    assert not get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"].buckets["out"].multiparts


@pytest.mark.parametrize(
    ("answer", "refused"),
    [
        ("InvalidAccessKeyId: The AWS Access Key Id you provided does not exist", True),
        ("SignatureDoesNotMatch: The request signature we calculated does not match", True),
        ("ExpiredToken: The provided token has expired.", True),
        ("AccessDenied: Access Denied", False),  # this object's policy: its own error row
        ("NoSuchKey: The specified key does not exist.", False),
    ],
)
def test_keys_refused_or_one_objects_access(answer: str, refused: bool) -> None:
    assert ObjectStore.keys_refused(OSError(answer)) is refused
