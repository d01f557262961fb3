from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchrunner.cli import app

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-5f1b0c7e9a2d4e68b3c1"  # a known token: tests check that it never leaks


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Relative paths in jobs resolve against the working folder: give each test its own.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELARTS_TOKEN", TOKEN)
    yield


Invoke = Callable[..., Any]


@pytest.fixture
def invoke() -> Invoke:
    """Run the real command in-process: ``invoke("run", "job.toml")``."""
    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None) -> Any:
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    return run


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_job(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def read_output(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()  # type: ignore[no-any-return]


@pytest.fixture
def features_csv(tmp_path: Path) -> Path:
    """Ten rows, ids 100..109, two numeric features."""
    rows = [(100 + i, i * 0.5, i % 3) for i in range(10)]
    return write_csv(tmp_path / "features.csv", ["id", "x", "y"], rows)
