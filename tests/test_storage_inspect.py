"""`inspect` of an output in a bucket, read where it is (a real S3 server, moto), through a
job's [storage] or the standard AWS variables."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchrunner
from tests.conftest import write_job
from tests.s3 import ACCESS_KEY, S3, SECRET_KEY, storage_section
from tests.test_storage import iris_bytes


def run_to_the_bucket(invoke, s3: S3, output: str = "s3://data/out/iris.parquet") -> Path:
    s3.bucket("data")
    s3.put("data/in/iris.csv", iris_bytes())
    job = write_job(
        Path("job.toml"),
        'name = "iris"\n[input]\npath = "s3://data/in/iris.csv"\nid_column = "id"\n'
        f'[service]\nurl = "embedded:iris"\n[output]\npath = "{output}"\n'
        + storage_section(s3.endpoint),
    )
    result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    return job


@pytest.fixture
def aws_variables(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard AWS variables, pointing at the test's server (and no profile)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(Path("no-aws-config")))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(Path("no-aws-credentials")))


def test_an_output_in_a_bucket_is_inspected_with_the_jobs_storage(invoke, s3: S3) -> None:
    job = run_to_the_bucket(invoke, s3)
    result = invoke("inspect", "s3://data/out/iris.parquet", "--job", str(job))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("s3://data/out/iris.parquet: 150 rows\n")
    assert "run summary (from the file's metadata): iris" in result.stdout
    assert "ok" in result.stdout and "150" in result.stdout
    head = invoke("inspect", "s3://data/out/iris.parquet", "--job", str(job), "--head", "2")
    assert head.exit_code == 0, head.stderr
    assert head.stdout.startswith("s3://data/out/iris.parquet: first 2 of 150 rows")
    fields = pq.read_table(io.BytesIO(s3.get("data/out/iris.parquet"))).schema.names
    field = next(name for name in fields if not name.startswith("_"))
    counts = invoke("inspect", "s3://data/out/iris.parquet", "--job", str(job), "--counts", field)
    assert counts.exit_code == 0, counts.stderr
    assert f"{field} in s3://data/out/iris.parquet: 150 rows" in counts.stdout
    html = invoke(
        "inspect", "s3://data/out/iris.parquet", "--job", str(job), "--html", "report.html"
    )
    assert html.exit_code == 0, html.stderr
    assert "iris: batchrunner report" in Path("report.html").read_text()


def test_the_standard_aws_variables_reach_the_bucket(invoke, s3: S3, aws_variables) -> None:
    run_to_the_bucket(invoke, s3)
    result = invoke("inspect", "s3://data/out/iris.parquet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("s3://data/out/iris.parquet: 150 rows\n")
    inspection = batchrunner.read_output("s3://data/out/iris.parquet")
    assert inspection.rows == 150 and dict(inspection.statuses) == {"ok": 150}


def test_a_csv_output_and_its_summary_beside_it(invoke, s3: S3, aws_variables) -> None:
    run_to_the_bucket(invoke, s3, "s3://data/out/iris.csv")
    result = invoke("inspect", "obs://data/out/iris.csv")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("obs://data/out/iris.csv: 150 rows\n")
    assert "run summary (from iris.csv.summary.json): iris" in result.stdout


def test_a_prefix_of_parquet_parts(invoke, s3: S3, aws_variables) -> None:
    s3.bucket("data")
    for part in range(2):
        rows = [{"_key": f"{part}-{i}", "_status": "ok", "label": "a"} for i in range(3)]
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        s3.put(f"data/ray/out.parquet/part-{part}.parquet", buffer.getvalue())
    s3.put("data/ray/out.parquet.summary.json", orjson.dumps({"job": "parts", "rows": {}}))
    result = invoke("inspect", "s3://data/ray/out.parquet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("s3://data/ray/out.parquet/: 6 rows\n")
    assert "run summary (from out.parquet.summary.json): parts" in result.stdout


def test_a_missing_object_or_bucket_is_exit_2(invoke, s3: S3, aws_variables) -> None:
    run_to_the_bucket(invoke, s3)
    missing = invoke("inspect", "s3://data/out/Iris.parquet")
    assert missing.exit_code == 2
    assert missing.stderr == (
        "error: no such object or prefix: s3://data/out/Iris.parquet; keys are "
        "case-sensitive: check it against a listing of s3://data/out/\n"
    )
    nowhere = invoke("inspect", "s3://nowhere/iris.parquet")
    assert nowhere.exit_code == 2
    assert "error: s3://nowhere: no such bucket; check the bucket name" in nowhere.stderr
    not_parquet = invoke("inspect", "s3://data/in/iris.csv")
    assert not_parquet.exit_code == 2
    assert "Traceback" not in not_parquet.stderr + nowhere.stderr + missing.stderr
