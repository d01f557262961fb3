"""The library API: the README's Python snippets run as written, and the API's own promises
(typed errors, no printing, the command line's exit codes) hold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import batchrunner
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def python_blocks() -> list[str]:
    start = README.index("## Use it from Python")
    end = README.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", README[start:end], flags=re.S)


def test_the_readme_script_runs_as_written(iris_job: Path, tmp_path: Path) -> None:
    script = python_blocks()[0]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "150 rows in 6 requests"
    assert lines[1] == "done 150 ok, 0 errors -> out/iris.parquet"
    assert lines[2] == "{'ok': 150}"
    assert pq.read_table(tmp_path / "out" / "iris.parquet").num_rows == 150


def test_the_readme_scheduler_task_runs_and_returns_the_output(
    iris_job: Path, tmp_path: Path
) -> None:
    namespace: dict[str, object] = {}
    exec(python_blocks()[1], namespace)
    task = namespace["score_iris_nightly"]
    assert callable(task)
    output = Path(str(task()))
    table = pq.read_table(output)
    assert table.num_rows == 150
    assert set(table.column("_status").to_pylist()) == {"ok"}
    assert output.name == "iris-nightly.parquet"


def test_a_run_reports_the_command_lines_exit_code(iris_job: Path) -> None:
    job = batchrunner.load_job(iris_job, overrides={"service.url": "embedded:linear"})
    report = batchrunner.run(job)
    assert (report.outcome, report.exit_code) == (batchrunner.Outcome.DONE, 0)
    assert report.engine is batchrunner.Engine.LOCAL
    assert (report.rows, report.rows_ok, report.rows_error) == (150, 150, 0)
    assert report.summary_path.is_file()
    assert report.summary.to_json()["rows"] == {
        "total": 150,
        "ok": 150,
        "error": 0,
        "skipped": 0,
        "resumed": 0,
    }
    assert json.loads(report.summary_path.read_text())["run_id"] == report.summary.run_id
    # The figures the summary was built from, in one typed snapshot; no Ray figures here.
    assert report.stats.requests == report.summary.requests > 0
    assert report.stats.rows_ok == 150 and report.ray is None


def test_too_many_errors_is_exit_code_1_and_the_output_is_written(iris_job: Path) -> None:
    # The iris model refuses a record without its four features: every row is an error.
    job = batchrunner.job_from_settings(
        name="broken",
        input={"path": "samples/iris.csv", "id_column": "id", "columns": ["species"]},
        service={"url": "embedded:iris"},
        retry={"max_attempts": 1},
    )
    report = batchrunner.run(job)
    assert report.outcome is batchrunner.Outcome.TOO_MANY_ERRORS
    assert report.exit_code == 1
    assert report.error_rate == 1.0
    assert batchrunner.read_output(report.output).rows == 150


def test_a_bad_setting_raises_a_setting_error_naming_it() -> None:
    with pytest.raises(batchrunner.SettingError, match=r"batch\.size"):
        batchrunner.job_from_settings(
            input={"path": "x.csv"}, service={"url": "embedded:iris"}, batch={"size": 0}
        )
    assert issubclass(batchrunner.SettingError, batchrunner.JobError)
    assert issubclass(batchrunner.JobError, batchrunner.BatchRunnerError)


def test_a_missing_input_raises_and_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    job = batchrunner.job_from_settings(
        input={"path": "nowhere.csv"}, service={"url": "embedded:iris"}
    )
    with pytest.raises(batchrunner.InputError, match=r"nowhere\.csv"):
        batchrunner.run(job)
    captured = capfd.readouterr()
    assert captured.out == ""


def test_limit_is_refused_on_ray_before_anything_starts(iris_job: Path) -> None:
    with pytest.raises(batchrunner.InputError, match="limit"):
        batchrunner.run(batchrunner.load_job(iris_job), engine="ray", limit=5)


def test_the_declared_api_is_importable_and_typed() -> None:
    for name in batchrunner.__all__:
        assert getattr(batchrunner, name) is not None
    with pytest.raises(AttributeError):
        batchrunner.nothing_here  # noqa: B018
    assert (REPO / "batchrunner" / "py.typed").is_file()
