"""``batchrunner run JOB.toml --engine ray``: the same job on a local Ray of two nodes
(see ``tests.rays``).

The tests marked ``ray`` are skipped when Ray is not installed (``pip install -e '.[ray]'``);
the others check what needs no Ray: the install hint, the refusals, the concurrency split.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from batchrunner.engines.blockscoring import ActorSecrets, secret_environ
from batchrunner.engines.ray import check_ray_job, split_concurrency
from batchrunner.errors import InputError
from batchrunner.job import IMAGES, load_job
from batchrunner.service import FaultSettings, ServiceOptions, fault_middleware
from batchrunner.storage import ObjectStore
from tests.conftest import REPO, TOKEN, iris_csv, write_job
from tests.s3 import ACCESS_KEY, SECRET_KEY
from tests.servers import ThreadedService

COMPARED = ["_key", "_status", "predictresult"]
# Ray's own modules warn about Ray's own settings: not this project's to fix.
on_ray = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def rows_by_key(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.select(COMPARED).to_pylist()
    return sorted(rows, key=lambda row: int(row["_key"]))


def test_without_ray_the_run_says_how_to_install_it(
    invoke, iris_job: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is missing
    result = invoke("run", str(iris_job), "--engine", "ray")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --engine ray needs Ray: pip install 'batchrunner[ray]'"
    assert not Path("out").exists()


def test_what_ray_refuses(iris_job: Path) -> None:
    job = load_job(iris_job)
    with pytest.raises(InputError, match=r"^--engine ray needs a service URL: the embedded"):
        check_ray_job(job)
    job = load_job(iris_job, assignments=["service.url=http://127.0.0.1:9/v1/infers/iris"])
    check_ray_job(job)
    unkeyed = job.model_copy(update={"input": job.input.model_copy(update={"id_column": None})})
    with pytest.raises(InputError, match=r"^--engine ray needs input.id_column"):
        check_ray_job(unkeyed)
    check_ray_job(unkeyed, IMAGES)  # images are keyed by their paths


def test_concurrency_is_split_across_actors() -> None:
    assert split_concurrency(8, 2) == [4, 4]
    assert split_concurrency(7, 2) == [4, 3]
    assert split_concurrency(2, 4) == [1, 1]  # never more actors than requests in flight
    assert sum(split_concurrency(9, 4)) == 9


def test_actors_get_only_the_job_secrets(iris_job: Path) -> None:
    job = load_job(iris_job, assignments=["service.url=http://127.0.0.1:9/v1/infers/iris"])
    environ = {"MODELARTS_TOKEN": TOKEN, "OTHER_SECRET": "x", "HOME": "/root"}
    assert secret_environ(job, environ) == {"MODELARTS_TOKEN": TOKEN, "HOME": "/root"}
    # What a Ray error naming the actors' arguments would show of them: nothing secret.
    store = ObjectStore(endpoint="http://127.0.0.1:9", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    secrets = ActorSecrets(secret_environ(job, environ), store)
    assert repr(secrets) == "ActorSecrets(<hidden>)"
    assert secrets.environ["MODELARTS_TOKEN"] == TOKEN and secrets.store is store


@pytest.mark.ray
@on_ray
def test_iris_on_ray_gives_the_rows_of_the_local_engine(invoke, local_ray, iris_job) -> None:
    local = invoke("run", str(iris_job), "--output", "out/local.parquet")
    assert local.exit_code == 0, local.stderr
    with ThreadedService(ServiceOptions(model="iris", token=TOKEN)) as service:
        result = invoke(
            "run", str(iris_job), "--engine", "ray",
            "--url", service.url, "--output", "out/ray.parquet",
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert Path("out/ray.parquet").is_dir()  # a folder of parts
    ray_table = ds.dataset("out/ray.parquet", format="parquet").to_table()
    assert ray_table.schema.names[:8] == pq.read_schema("out/local.parquet").names[:8]
    assert rows_by_key(ray_table) == rows_by_key(pq.read_table("out/local.parquet"))
    shown = invoke("inspect", "out/ray.parquet")
    assert shown.exit_code == 0
    assert shown.stdout.startswith(
        "out/ray.parquet: 150 rows\n\nrun summary (from ray.parquet.summary.json): iris: done\n"
    )
    assert "\nrows by status\n  ok  150\n" in shown.stdout


@pytest.mark.ray
@on_ray
def test_a_faulty_service_loses_nothing_on_ray(invoke, local_ray, iris_job) -> None:
    faults = FaultSettings(error_rate=0.3, drop_rate=0.1, seed=7)
    with ThreadedService(
        ServiceOptions(model="iris", token=TOKEN), [fault_middleware(faults)]
    ) as s:
        result = invoke(
            "run", str(iris_job), "--engine", "ray", "--url", s.url,
            "--batch-size", "10", "--set", "retry.backoff_initial=0.01",
            "--set", "retry.backoff_max=0.05", "--set", "retry.max_attempts=30",
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    table = ds.dataset("out/iris.parquet", format="parquet").to_table()
    assert table.num_rows == 150
    assert sorted(int(key) for key in table.column("_key").to_pylist()) == list(range(1, 151))
    assert set(table.column("_status").to_pylist()) == {"ok"}
    assert max(table.column("_attempts").to_pylist()) > 1  # the faults were met, and retried


@pytest.mark.ray
@on_ray
def test_a_refused_token_stops_the_ray_run_with_exit_3_and_no_output(
    invoke, local_ray, iris_job
) -> None:
    with ThreadedService(ServiceOptions(model="iris", token="another-token")) as service:
        result = invoke("run", str(iris_job), "--engine", "ray", "--url", service.url)
    assert result.exit_code == 3
    assert "error: HTTP 401 APIG.0301: Incorrect IAM authentication information" in result.stderr
    assert not Path("out/iris.parquet").exists()
    assert TOKEN not in result.stderr


@pytest.fixture
def colors_job(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "samples" / "images", tmp_path / "samples" / "images")
    (tmp_path / "jobs").mkdir()
    return Path(shutil.copy(REPO / "jobs" / "colors.toml", tmp_path / "jobs" / "colors.toml"))


def read_parts(folder: str) -> ds.Dataset:
    """A folder of parts as one dataset (parts may differ: a block of error rows only)."""
    files = ds.dataset(folder, format="parquet").files
    schema = pa.unify_schemas(
        [pq.read_schema(file) for file in files], promote_options="permissive"
    )
    return ds.dataset(folder, format="parquet", schema=schema)


@pytest.mark.ray
@on_ray
def test_colors_on_ray_gives_the_rows_and_summary_of_the_local_engine(
    invoke, local_ray, colors_job
) -> None:
    # Two images over the body limit and one corrupt file: error rows, as locally.
    settings = ("--set", "batch.max_request_bytes=6000", "--set", "max_error_rate=0.5")
    local = invoke("run", str(colors_job), "--output", "out/local.parquet", *settings)
    assert local.exit_code == 0, local.stderr
    with ThreadedService(ServiceOptions(model="colors", token=TOKEN)) as service:
        result = invoke(
            "run", str(colors_job), "--engine", "ray", "--url", service.url,
            "--output", "out/ray.parquet", "--concurrency", "2", *settings,
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    local_table = pq.read_table("out/local.parquet")
    compared = [name for name in local_table.schema.names if name != "_latency_ms"]
    ray_rows = read_parts("out/ray.parquet").to_table(columns=compared).to_pylist()
    local_rows = local_table.select(compared).to_pylist()
    assert sorted(ray_rows, key=by_key) == sorted(local_rows, key=by_key)
    assert {row["_error_kind"] for row in local_rows} == {None, "file_too_large", "model_error"}
    summary = orjson.loads(Path("out/ray.parquet.summary.json").read_bytes())
    expected = orjson.loads(Path("out/local.parquet.summary.json").read_bytes())
    assert summary["engine"] == "ray"
    assert summary["actors"] == 2
    assert summary["blocks"] == {"total": 3, "reused": 0}  # 10 files in blocks of 4
    for field in ("rows", "error_rate", "outcome", "errors"):
        assert summary[field] == expected[field], field
    # the same requests, but for retries (a slow moment on a loaded machine may cost one)
    sent = summary["requests"] - summary["retries"]
    assert sent == expected["requests"] - expected["retries"]
    assert summary["latency_ms"]["p50"] > 0
    assert not Path("out/.batchrunner/colors.state").exists()  # gone with the success


def by_key(row: dict[str, Any]) -> str:
    return str(row["_key"])


@dataclass
class Gateway:
    """A gateway in front of the service: counts the requests, and lets only ``allowed``
    through (the others are refused: the token has expired) while ``refusing``."""

    allowed: int
    refusing: bool = True
    requests: int = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests += 1
        if self.refusing and self.requests > self.allowed:
            body = {"error_code": "APIG.0301", "error_msg": "token expires", "request_id": "0"}
            return web.json_response(body, status=401)
        return await handler(request)


@pytest.mark.ray
@on_ray
def test_a_refused_ray_run_keeps_its_finished_blocks_and_a_re_run_sends_only_the_rest(
    invoke, local_ray
) -> None:
    iris_csv(copies=4).rename("iris4.csv")  # 600 rows: 60 requests of 10, blocks of 40 rows
    job = write_job(Path("iris4.toml"), JOB_600)
    local = invoke("run", str(job), "--output", "out/local.parquet")
    assert local.exit_code == 0, local.stderr
    gateway = Gateway(allowed=30)
    with ThreadedService(ServiceOptions(model="iris", token=TOKEN), [gateway.middleware]) as s:
        first = invoke("run", str(job), "--engine", "ray", "--url", s.url)
        gateway.refusing, gateway.requests = False, 0
        second = invoke("run", str(job), "--engine", "ray", "--url", s.url)
    assert first.exit_code == 3, first.stderr
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("error: HTTP 401 APIG.0301: token expires (the service refused")
    assert re.search(
        r"not expired\); [1-9]\d* finished blocks are kept in \S+/out/.batchrunner/iris4.state/"
        r"ray/parts: re-run the same command to resume \(they are not sent again\)$",
        last,
    ), last
    assert second.exit_code == 0, second.stderr
    assert "resuming: " in second.stderr
    assert 0 < gateway.requests < 60  # the finished blocks were not sent again
    summary = orjson.loads(Path("out/iris4.parquet.summary.json").read_bytes())
    assert summary["requests"] == gateway.requests
    assert summary["rows"]["total"] == 600
    assert 0 < summary["blocks"]["reused"] < summary["blocks"]["total"]
    ray_rows = read_parts("out/iris4.parquet").to_table(columns=COMPARED).to_pylist()
    local_rows = pq.read_table("out/local.parquet", columns=COMPARED).to_pylist()
    assert sorted(ray_rows, key=by_key) == sorted(local_rows, key=by_key)
    assert TOKEN not in first.stderr + second.stderr


JOB_600 = """
name = "iris4"

[input]
path = "iris4.csv"
id_column = "id"

[service]
url = "embedded:iris"

[batch]
size = 10
concurrency = 2

[output]
path = "out/{name}.parquet"
"""
