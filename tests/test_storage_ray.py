"""``--engine ray`` with its input and output in a bucket (a real S3 server, moto, on
loopback) on a local Ray of two nodes: Ray reads the input from the bucket, the actors
(on the node that is not the driver's) write their parts to a prefix beside the output,
and the driver commits the output as one object. Nothing of it is on the local disk but
the manifest and the lock."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest

from batchrunner.service import ServiceOptions
from tests.conftest import REPO, TOKEN, write_job
from tests.rays import session_folder
from tests.s3 import ACCESS_KEY, S3, SECRET_KEY, storage_section
from tests.servers import ThreadedService
from tests.test_cli_images import COLORS, image
from tests.test_engine_ray import Gateway, on_ray
from tests.test_secrets import assert_nowhere, files_under

pytestmark = [pytest.mark.ray, on_ray]

PARTS = "results/.batchrunner/photos.state/ray/parts/"


def read_object(s3: S3, path: str) -> list[dict[str, Any]]:
    return pq.read_table(io.BytesIO(s3.get(path))).to_pylist()  # type: ignore[no-any-return]


def ray_logs(ray: Any) -> list[Path]:
    """The files of the Ray session (its logs): the keys must be in none of them."""
    return [
        path
        for path in files_under(Path(session_folder(ray)))
        if path.stat().st_size < 50 << 20 and not path.is_socket()
    ]


def test_an_image_prefix_on_ray_resumes_from_its_parts_in_the_bucket(
    invoke, local_ray, s3: S3
) -> None:
    s3.bucket("photos")
    s3.bucket("results")
    colors = sorted(COLORS)  # each image's color is in its key
    keys = [f"{index % 2}/{index:02d}-{colors[index % len(colors)]}.png" for index in range(16)]
    for key in keys:
        s3.put(f"photos/drop/{key}", image(COLORS[key.split("-")[1][:-4]]))
    gateway = Gateway(allowed=8)  # 16 files in blocks of 4: at least one block finishes
    with ThreadedService(ServiceOptions(model="colors", token=TOKEN), [gateway.middleware]) as s:
        write_job(
            Path("photos.toml"),
            f'name = "photos"\n[input]\npath = "s3://photos/drop/"\n[service]\nurl = "{s.url}"\n'
            '[batch]\nconcurrency = 2\n[output]\npath = "s3://results/photos.parquet"\n'
            + storage_section(s3.endpoint),
        )
        first = invoke("run", "photos.toml", "--engine", "ray")
        assert first.exit_code == 3, first.stderr
        assert f"finished blocks are kept in s3://{PARTS}: re-run" in first.stderr
        kept = s3.keys(PARTS)
        assert kept and all(key.endswith(".parquet") for key in kept)
        assert not s3.exists("results/photos.parquet")
        # On the local disk: the manifest and the lock, no part (the actors wrote to the bucket).
        local = sorted(str(path) for path in files_under(Path(".batchrunner")))
        assert local == [".batchrunner/photos.lock", ".batchrunner/photos.state/ray/manifest.json"]
        gateway.refusing, gateway.requests = False, 0
        second = invoke("run", "photos.toml", "--engine", "ray")
    assert second.exit_code == 0, second.stderr
    assert "resuming: " in second.stderr
    assert 0 < gateway.requests < 16  # the finished blocks were not sent again
    rows = read_object(s3, "results/photos.parquet")
    assert [row["_key"] for row in rows] == sorted(keys, key=lambda key: (key[0], key))
    assert {row["_status"] for row in rows} == {"ok"}
    assert {row["_key"]: row["predicted_label"] for row in rows} == {
        key: key.split("-")[1][:-4] for key in keys
    }
    summary = orjson.loads(s3.get("results/photos.parquet.summary.json"))
    assert summary["engine"] == "ray"
    assert summary["requests"] == gateway.requests
    assert 0 < summary["blocks"]["reused"] < summary["blocks"]["total"] == 4
    schema = pq.read_schema(io.BytesIO(s3.get("results/photos.parquet")))
    assert orjson.loads(schema.metadata[b"batchrunner.summary"])["run_id"] == summary["run_id"]
    assert s3.keys("results") == ["results/photos.parquet", "results/photos.parquet.summary.json"]
    assert not Path(".batchrunner/photos.state").exists()
    printed = [first.stdout, first.stderr, second.stdout, second.stderr]
    objects = repr({key: s3.get(key) for key in s3.keys("results")})
    logs = ray_logs(local_ray)
    assert any(path.name.startswith("worker-") for path in logs)  # the actors' own logs
    assert_nowhere(
        [ACCESS_KEY, SECRET_KEY, TOKEN],
        [*printed, objects],
        [*files_under(Path()), *logs],
    )


def test_a_table_in_a_bucket_on_ray_gives_the_rows_of_the_local_engine(
    invoke, local_ray, s3: S3
) -> None:
    s3.bucket("data")
    s3.put("data/in/iris.csv", (REPO / "samples" / "iris.csv").read_bytes())
    with ThreadedService(ServiceOptions(model="iris", token=TOKEN)) as service:
        write_job(
            Path("iris.toml"),
            f'name = "iris"\n[input]\npath = "s3://data/in/"\nid_column = "id"\n'
            f'[service]\nurl = "{service.url}"\n[batch]\nsize = 20\nconcurrency = 2\n'
            '[output]\npath = "s3://data/out/{name}.csv"\n' + storage_section(s3.endpoint),
        )
        local = invoke("run", "iris.toml", "--output", "s3://data/out/local.csv")
        assert local.exit_code == 0, local.stderr
        result = invoke("run", "iris.toml", "--engine", "ray")
    assert result.exit_code == 0, result.stderr
    ray_text = s3.get("data/out/iris.csv").decode()
    local_text = s3.get("data/out/local.csv").decode()
    compared = ("_key", "_status", "predictresult")

    def rows(text: str) -> list[tuple[str, ...]]:
        import csv

        return sorted(
            (tuple(row[name] for name in compared) for row in csv.DictReader(io.StringIO(text))),
            key=lambda row: int(row[0]),
        )

    assert len(rows(ray_text)) == 150
    assert rows(ray_text) == rows(local_text)
    summary = orjson.loads(s3.get("data/out/iris.csv.summary.json"))
    assert (summary["engine"], summary["rows"]["total"]) == ("ray", 150)
    assert s3.keys("data/out") == [
        "data/out/iris.csv",
        "data/out/iris.csv.summary.json",
        "data/out/local.csv",
        "data/out/local.csv.summary.json",
    ]


def test_each_image_object_is_fetched_by_the_actors_with_one_request(
    invoke, local_ray, s3: S3
) -> None:
    # As on the local engine: one GET an image, not a HEAD for its size and then a GET.
    from tests.s3 import FaultyProxy

    s3.bucket("photos")
    keys = [f"p{index}/{color}.png" for index in range(2) for color in ("red", "blue")]
    for key in keys:
        s3.put(f"photos/in/{key}", image(COLORS[key.split("/")[1][:-4]]))
    asked: list[tuple[str, str]] = []

    def record(number: int, method: str, path: str) -> None:
        asked.append((method, path))

    with (
        FaultyProxy(s3.endpoint, record) as proxy,
        ThreadedService(ServiceOptions(model="colors", token=TOKEN)) as service,
    ):
        write_job(
            Path("photos.toml"),
            f'name = "photos"\n[input]\npath = "s3://photos/in/"\n'
            f'[service]\nurl = "{service.url}"\n[batch]\nconcurrency = 2\n'
            '[output]\npath = "s3://photos/out/photos.parquet"\n' + storage_section(proxy.endpoint),
        )
        result = invoke("run", "photos.toml", "--engine", "ray")
    assert result.exit_code == 0, result.stderr
    fetched = sorted(
        (method, path.removeprefix("/photos/in/"))
        for method, path in asked
        if path.endswith(".png")
    )
    assert fetched == sorted(("GET", key) for key in keys)
    assert {
        row["_key"]: row["predicted_label"] for row in read_object(s3, "photos/out/photos.parquet")
    } == {key: key.split("/")[1][:-4] for key in keys}
