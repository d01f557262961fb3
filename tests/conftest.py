from __future__ import annotations

import csv
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batchrunner.cli import app
from tests.rays import local_ray  # noqa: F401  (a fixture)
from tests.s3 import ACCESS_KEY, S3, SECRET_KEY, moto_server

REPO = Path(__file__).resolve().parent.parent
# Known secrets: tests check that they never leak.
TOKEN = "test-token-5f1b0c7e9a2d4e68b3c1"
PASSWORD = "pass-word-9c2e4a71b80d3f56"
APPCODE = "app-code-3d7f0b5c1e9a2864"


@pytest.fixture(autouse=True)
def _in_tmp_cwd(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    # Relative paths in jobs resolve against the working folder: give each test its own.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELARTS_TOKEN", TOKEN)
    # The IAM token cache: never the user's own, and (as for real) not in the working folder.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield


@pytest.fixture
def cache_dir() -> Path:
    """The folder where this test's runs cache IAM tokens."""
    return Path(os.environ["XDG_CACHE_HOME"]) / "batchrunner"


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


def iris_csv(copies: int = 1) -> Path:
    """The iris sample's id and features, ``copies`` times over with distinct ids."""
    with (REPO / "samples" / "iris.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    features = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    table = [
        (f"{copy}-{row['id']}", *(row[f] for f in features))
        for copy in range(copies)
        for row in rows
    ]
    return write_csv(Path("iris.csv"), ["id", *features], table)


@pytest.fixture
def iris_job(tmp_path: Path) -> Path:
    """The shipped job and sample, copied into the test's working folder."""
    (tmp_path / "samples").mkdir()
    shutil.copy(REPO / "samples" / "iris.csv", tmp_path / "samples" / "iris.csv")
    (tmp_path / "jobs").mkdir()
    return Path(shutil.copy(REPO / "jobs" / "iris.toml", tmp_path / "jobs" / "iris.toml"))


@pytest.fixture
def features_csv(tmp_path: Path) -> Path:
    """Ten rows, ids 100..109, two numeric features."""
    rows = [(100 + i, i * 0.5, i % 3) for i in range(10)]
    return write_csv(tmp_path / "features.csv", ["id", "x", "y"], rows)


# A stand-in for crontab(1), first on PATH in tests that use it: the table lives in a file
# beside it and every call is recorded. Like cronie, it answers "no crontab for <user>" when
# there is no table and refuses a table whose last line has no line break.
FAKE_CRONTAB = """#!{python}
import pathlib, sys
folder = pathlib.Path(__file__).parent
table = folder / "table"
with (folder / "calls").open("a") as calls:
    calls.write(" ".join(sys.argv[1:]) + "\\n")
if (folder / "broken").exists():
    sys.exit("crontab: your UID isn't in the passwd file.")
if sys.argv[1:] == ["-l"]:
    if not table.exists():
        sys.exit("no crontab for tester")
    sys.stdout.write(table.read_text())
elif sys.argv[1:] == ["-"]:
    text = sys.stdin.read()
    if text and not text.endswith("\\n"):
        sys.exit("new crontab file is missing newline before EOF, can't install.")
    table.write_text(text)
else:
    sys.exit("usage: crontab [-l | -]")
"""


class FakeCrontab:
    """The stand-in's table and calls."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def table(self) -> str | None:
        path = self.folder / "table"
        return path.read_text() if path.exists() else None

    @table.setter
    def table(self, text: str) -> None:
        (self.folder / "table").write_text(text)

    @property
    def calls(self) -> list[str]:
        path = self.folder / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def break_it(self) -> None:
        """From now on every call fails as a misconfigured system's would."""
        (self.folder / "broken").touch()


@pytest.fixture
def fake_crontab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCrontab:
    # Always the stand-in, even where a real crontab exists: tests never touch a real table.
    folder = tmp_path / "fake-bin"
    folder.mkdir()
    script = folder / "crontab"
    script.write_text(FAKE_CRONTAB.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")
    return FakeCrontab(folder)


# -- a real S3 server (moto) on loopback --------------------------------------------------


@pytest.fixture(scope="session")
def _moto() -> Iterator[tuple[str, int]]:
    yield from moto_server()


@pytest.fixture
def s3(_moto: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """The server, with every bucket removed after the test; the keys in the environment
    that ``storage_section`` names (and not in AWS_*: jobs must say where keys are)."""
    monkeypatch.setenv("TEST_S3_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("TEST_S3_SECRET_KEY", SECRET_KEY)
    server = S3(*_moto)
    yield server
    server.remove_buckets()


REAL_SERVER_FIXTURES = ("mlserver", "mlflow", "kserve")


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    # The real servers the selected tests use start now, in the background (tests/realservers).
    from tests.realservers import PRESTART

    wanted = {
        name
        for item in items
        for name in getattr(item, "fixturenames", ())
        if name in REAL_SERVER_FIXTURES
    }
    PRESTART.begin(sorted(wanted, key=REAL_SERVER_FIXTURES.index))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.realservers import PRESTART

    PRESTART.close()
