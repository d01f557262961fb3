"""``batchrunner run JOB.toml --engine ray``: the same job on a local Ray with 2 CPUs.

The tests marked ``ray`` are skipped when Ray is not installed (``pip install -e '.[ray]'``);
the others check what needs no Ray: the install hint, the refusals, the concurrency split.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batchrunner.engines.ray import check_ray_job, secret_environ, split_concurrency
from batchrunner.errors import InputError
from batchrunner.job import load_job
from batchrunner.service import FaultSettings, ServiceOptions, fault_middleware
from tests.conftest import REPO, TOKEN
from tests.servers import ThreadedService

COMPARED = ["_key", "_status", "predictresult"]
# Ray's own modules warn about Ray's own settings: not this project's to fix.
on_ray = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture
def iris_job(tmp_path: Path) -> Path:
    (tmp_path / "samples").mkdir()
    shutil.copy(REPO / "samples" / "iris.csv", tmp_path / "samples" / "iris.csv")
    (tmp_path / "jobs").mkdir()
    return Path(shutil.copy(REPO / "jobs" / "iris.toml", tmp_path / "jobs" / "iris.toml"))


@pytest.fixture(scope="session")
def local_ray() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


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


def test_concurrency_is_split_across_actors() -> None:
    assert split_concurrency(8, 2) == [4, 4]
    assert split_concurrency(7, 2) == [4, 3]
    assert split_concurrency(2, 4) == [1, 1]  # never more actors than requests in flight
    assert sum(split_concurrency(9, 4)) == 9


def test_actors_get_only_the_job_secrets(iris_job: Path) -> None:
    job = load_job(iris_job, assignments=["service.url=http://127.0.0.1:9/v1/infers/iris"])
    environ = {"MODELARTS_TOKEN": TOKEN, "OTHER_SECRET": "x", "HOME": "/root"}
    assert secret_environ(job, environ) == {"MODELARTS_TOKEN": TOKEN, "HOME": "/root"}


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
        "out/ray.parquet: 150 rows\n\n"
        "run summary: none (a folder of parts, as --engine ray writes, has none)\n\n"
        "rows by status\n  ok  150\n"
    )


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
