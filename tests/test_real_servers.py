"""The protocols against real servers: Seldon MLServer (oip-v2, both layouts), MLflow
(mlflow), KServe's model server (kserve-v1 and oip-v2). See ``tests/realservers.py``.

Each: 1,200 rows in batches with predictions equal to the model's own ``predict``, a row
the model refuses (a string where a number is expected) isolated by splitting, and the
server killed mid-run and started again with nothing lost. These servers run in processes
of their own, so the restart takes real seconds, bounded by the retry settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import realservers
from tests.conftest import read_output, write_job
from tests.realservers import Server

ROWS = 1200
BAD_ROW = "617"


def _rows_csv(path: Path, *, bad: bool = False) -> Path:
    # bad: a string where the model expects a number, in row BAD_ROW
    return realservers.iris_rows(path, ROWS, bad_index=int(BAD_ROW) if bad else None)


def _job(folder: Path, url: str, protocol: str, extra: str = "", **batch: object) -> Path:
    settings = {"size": 50, "concurrency": 4, **batch}
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    return write_job(
        folder / "job.toml",
        f"""
name = "real"
[input]
path = "rows.csv"
id_column = "id"
[service]
url = "{url}"
protocol = "{protocol}"
{extra}
[batch]
{lines}
[retry]
max_attempts = 4
backoff_initial = 0.01
backoff_max = 0.05
[output]
path = "out.parquet"
""",
    )


def _labels(rows: list[dict[str, object]], column: str) -> list[object]:
    return [row[column] for row in rows]


def _check_all_rows(expected: list[str], column: str) -> None:
    rows = read_output("out.parquet")
    assert [row["_status"] for row in rows] == ["ok"] * ROWS
    assert _labels(rows, column) == expected


def _check_isolated(expected: list[str], column: str) -> None:
    rows = read_output("out.parquet")
    failed = [row["_key"] for row in rows if row["_status"] == "error"]
    assert failed == [BAD_ROW]
    good = [row for row in rows if row["_key"] != BAD_ROW]
    assert _labels(good, column) == [p for i, p in enumerate(expected) if str(i) != BAD_ROW]


def _run_while_restarting(server: Server, job: Path) -> dict[str, object]:
    """Run ``job`` in a process of its own, kill the server once the run has finished some
    batches, start it again, and return the run's summary."""
    command = [sys.executable, "-m", "batchrunner", "run", str(job), "--no-progress"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as run:
        try:
            state = Path(".batchrunner")
            deadline = time.monotonic() + 60
            while not any(state.glob("*.state/*")) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            if run.poll() is not None:
                _, stderr = run.communicate()
                pytest.fail(f"the run ended before the server could be killed: {stderr!r}")
            server.kill()
            time.sleep(1.0)
            server.start()
            _, stderr = run.communicate(timeout=240)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
    assert run.returncode == 0, stderr.decode(errors="replace")
    return dict(json.loads(Path("out.parquet.summary.json").read_text()))


RESTART = {"size": 5, "concurrency": 2, "rate_limit": 40}
# patient enough for a slow restart: MLflow's server took over 30 s to come back on a loaded
# CI machine, so the budget is 100 attempts (the most allowed) of up to 4 s (full jitter:
# ~2 s each), about 3 minutes
RESTART_RETRY = "max_attempts = 100\nbackoff_initial = 0.5\nbackoff_max = 4.0"


def _patient(job: Path) -> None:
    text = job.read_text()
    text = text.replace(
        "max_attempts = 4\nbackoff_initial = 0.01\nbackoff_max = 0.05", RESTART_RETRY
    )
    job.write_text(text)


# --- Seldon MLServer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlserver() -> Iterator[tuple[Server, Path]]:
    server, model = realservers.PRESTART.get("mlserver")  # started while other tests ran
    try:
        yield server, model
    finally:
        server.kill()


def _expected(env_name: str, model: Path, tmp_path: Path) -> list[str]:
    rows = _rows_csv(tmp_path / "expected.csv")
    return realservers.own_predictions(realservers.server_env(env_name), model, rows)


def test_mlserver_oip_tensor_layout(invoke, tmp_path: Path, mlserver) -> None:
    server, model = mlserver
    _rows_csv(Path("rows.csv"))
    job = _job(tmp_path, f"{server.base}/v2/models/iris/infer", "oip-v2")
    validated = invoke("validate", str(job))
    assert validated.exit_code == 0, validated.stderr
    result = invoke("run", str(job), "--no-progress")
    assert result.exit_code == 0, result.stderr
    _check_all_rows(_expected("mlserver", model, tmp_path), "predict")


def test_mlserver_oip_columns_layout_isolates_a_row_it_refuses(
    invoke, tmp_path: Path, mlserver
) -> None:
    server, model = mlserver
    _rows_csv(Path("rows.csv"), bad=True)  # sepal_length becomes text: the columns layout
    job = _job(tmp_path, f"{server.base}/v2/models/iris/infer", "oip-v2")
    result = invoke("run", str(job), "--no-progress")
    assert result.exit_code == 1, result.stderr  # one error row, over max_error_rate 0
    _check_isolated(_expected("mlserver", model, tmp_path), "predict")


def test_mlserver_killed_mid_run_and_restarted_loses_nothing(tmp_path: Path, mlserver) -> None:
    server, model = mlserver
    _rows_csv(Path("rows.csv"))
    job = _job(tmp_path, f"{server.base}/v2/models/iris/infer", "oip-v2", **RESTART)
    _patient(job)
    summary = _run_while_restarting(server, job)
    assert int(str(summary["retries"])) > 0
    _check_all_rows(_expected("mlserver", model, tmp_path), "predict")


# --- MLflow ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow() -> Iterator[tuple[Server, Path]]:
    server, model = realservers.PRESTART.get("mlflow")  # started while other tests ran
    try:
        yield server, model
    finally:
        server.kill()


def test_mlflow_rows_and_a_row_it_refuses(invoke, tmp_path: Path, mlflow) -> None:
    server, model = mlflow
    expected = _expected("mlflow", model, tmp_path)
    _rows_csv(Path("rows.csv"))
    job = _job(tmp_path, f"{server.base}/invocations", "mlflow")
    validated = invoke("validate", str(job))
    assert validated.exit_code == 0, validated.stderr
    result = invoke("run", str(job), "--no-progress")
    assert result.exit_code == 0, result.stderr
    _check_all_rows(expected, "prediction")
    _rows_csv(Path("rows.csv"), bad=True)
    result = invoke("run", str(job), "--no-progress", "--set", "output.path=out.parquet")
    assert result.exit_code == 1, result.stderr
    _check_isolated(expected, "prediction")


def test_mlflow_killed_mid_run_and_restarted_loses_nothing(tmp_path: Path, mlflow) -> None:
    server, model = mlflow
    _rows_csv(Path("rows.csv"))
    job = _job(tmp_path, f"{server.base}/invocations", "mlflow", **RESTART)
    _patient(job)
    summary = _run_while_restarting(server, job)
    assert int(str(summary["retries"])) > 0
    _check_all_rows(_expected("mlflow", model, tmp_path), "prediction")


# --- KServe ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kserve() -> Iterator[tuple[Server, Path]]:
    server, model = realservers.PRESTART.get("kserve")  # started while other tests ran
    try:
        yield server, model
    finally:
        server.kill()


def test_kserve_v1_rows_and_a_row_it_refuses(invoke, tmp_path: Path, kserve) -> None:
    server, model = kserve
    expected = _expected("kserve", model, tmp_path)
    _rows_csv(Path("rows.csv"))
    job = _job(tmp_path, f"{server.base}/v1/models/iris:predict", "kserve-v1")
    validated = invoke("validate", str(job))
    assert validated.exit_code == 0, validated.stderr
    result = invoke("run", str(job), "--no-progress")
    assert result.exit_code == 0, result.stderr
    _check_all_rows(expected, "prediction")
    _rows_csv(Path("rows.csv"), bad=True)
    result = invoke("run", str(job), "--no-progress")
    assert result.exit_code == 1, result.stderr
    _check_isolated(expected, "prediction")


def test_kserve_oip_v2_both_layouts(invoke, tmp_path: Path, kserve) -> None:
    server, model = kserve
    expected = _expected("kserve", model, tmp_path)
    _rows_csv(Path("rows.csv"))
    job = _job(tmp_path, f"{server.base}/v2/models/iris/infer", "oip-v2")
    validated = invoke("validate", str(job))
    assert validated.exit_code == 0, validated.stderr
    result = invoke("run", str(job), "--no-progress")
    assert result.exit_code == 0, result.stderr
    _check_all_rows(expected, "predict")
    _rows_csv(Path("rows.csv"), bad=True)
    result = invoke("run", str(job), "--no-progress")
    assert result.exit_code == 1, result.stderr
    _check_isolated(expected, "predict")


def test_kserve_killed_mid_run_and_restarted_loses_nothing(tmp_path: Path, kserve) -> None:
    server, model = kserve
    _rows_csv(Path("rows.csv"))
    job = _job(tmp_path, f"{server.base}/v1/models/iris:predict", "kserve-v1", **RESTART)
    _patient(job)
    summary = _run_while_restarting(server, job)
    assert int(str(summary["retries"])) > 0
    _check_all_rows(_expected("kserve", model, tmp_path), "prediction")
