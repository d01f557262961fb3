"""Real inference servers nobody on this team wrote, started from the tests on loopback.

Each runs from its own virtual environment, made by ``.ci/server-envs.sh`` (``.ci/run``
makes them and says where in ``BATCHRUNNER_SERVER_ENVS``): ``mlserver`` (Seldon MLServer
with its scikit-learn runtime), ``mlflow`` (``mlflow models serve``) and ``kserve`` (KServe's
model server, a ``kserve.Model`` subclass of a few lines). Each serves a logistic regression
trained here on iris. Without the environments the tests skip, saying why; with
``BATCHRUNNER_REQUIRE_SERVERS=1`` (set by ``.ci/run``) a missing one fails instead.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ENVS_VARIABLE = "BATCHRUNNER_SERVER_ENVS"
REQUIRE_VARIABLE = "BATCHRUNNER_REQUIRE_SERVERS"
STARTUP_TIMEOUT_S = 120.0
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
IRIS_CSV = Path(__file__).parent.parent / "samples" / "iris.csv"


PENDING_VARIABLE = "BATCHRUNNER_SERVER_ENVS_PENDING"
PENDING_TIMEOUT_S = 900.0


def _wait_until_made(root: str, name: str) -> None:
    """With ``BATCHRUNNER_SERVER_ENVS_PENDING=1`` (``.ci/run`` makes the environments while
    the project installs and its tests start), wait for ``name``'s to be finished."""
    if os.environ.get(PENDING_VARIABLE) != "1":
        return
    deadline = time.monotonic() + PENDING_TIMEOUT_S
    while not Path(root, name, ".ready").exists() and time.monotonic() < deadline:
        time.sleep(1.0)


def server_env(name: str) -> Path:
    """The virtual environment of server ``name``; skips (or, in CI, fails) without it."""
    root = os.environ.get(ENVS_VARIABLE)
    if root:
        _wait_until_made(root, name)
    python = Path(root, name, "bin", "python") if root else None
    if python is not None and python.exists():
        return python.parent.parent
    reason = (
        f"the {name} environment is absent: set {ENVS_VARIABLE} to the folder "
        f".ci/server-envs.sh made (e.g. .ci/server-envs.sh .servers)"
    )
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(reason + f"; {REQUIRE_VARIABLE}=1 makes this a failure", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


TRAIN = """
import csv, json, sys
import joblib
from sklearn.linear_model import LogisticRegression
features = {features!r}
rows = list(csv.DictReader(open({iris!r})))
X = [[float(r[f]) for f in features] for r in rows]
y = [r["species"] for r in rows]
model = LogisticRegression(max_iter=1000).fit(X, y)
joblib.dump(model, sys.argv[1])
"""

PREDICT = """
import csv, json, sys
import joblib
model = joblib.load(sys.argv[1])
rows = list(csv.DictReader(open(sys.argv[2])))
X = [[float(r[f]) for f in {features!r}] for r in rows]
json.dump([str(p) for p in model.predict(X)], open(sys.argv[3], "w"))
"""


def iris_rows(path: Path, rows: int, *, bad_index: int | None = None) -> Path:
    """A CSV of ``rows`` iris rows (the sample, cycled) with ids 0, 1, ...; the row at
    ``bad_index`` has text where the model expects a number."""
    with IRIS_CSV.open() as handle:
        iris = list(csv.DictReader(handle))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", *FEATURES])
        for index in range(rows):
            values = [iris[index % len(iris)][f] for f in FEATURES]
            if index == bad_index:
                values[0] = "x"
            writer.writerow([index, *values])
    return path


def train(env: Path, folder: Path) -> Path:
    """A logistic regression fitted on iris by the server's own scikit-learn."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.joblib"
    script = TRAIN.format(features=FEATURES, iris=str(IRIS_CSV))
    subprocess.run([env / "bin" / "python", "-c", script, path], check=True, timeout=120)
    return path


def own_predictions(env: Path, model: Path, csv_path: Path) -> list[str]:
    """What the model's own ``predict`` says for the rows of ``csv_path``."""
    out = csv_path.with_suffix(".predictions.json")
    script = PREDICT.format(features=FEATURES)
    subprocess.run(
        [env / "bin" / "python", "-c", script, model, csv_path, out], check=True, timeout=120
    )
    return list(json.loads(out.read_text()))


@dataclass
class Server:
    """A server process on a loopback port; ``restart`` kills it and starts it again."""

    command: list[str]
    cwd: Path
    env: dict[str, str]
    port: int
    ready_path: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with (self.cwd / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed whole, workers too
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + self.ready_path, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.command[0]} not ready in {STARTUP_TIMEOUT_S} s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def log_tail(self) -> str:
        path = self.cwd / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


@contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _environ(env: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    # Servers start helpers (uvicorn) by name: their environment's bin/ goes first.
    environ["PATH"] = f"{env / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
    return environ


def mlserver(folder: Path) -> tuple[Server, Path]:
    """MLServer serving model ``iris`` (scikit-learn runtime) from ``folder``."""
    env = server_env("mlserver")
    model = train(env, folder / "iris")
    (folder / "iris" / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "iris",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib"},
            }
        )
    )
    port = free_port()
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    command = [str(env / "bin" / "mlserver"), "start", str(folder)]
    return Server(command, folder, _environ(env), port, "/v2/models/iris/ready"), model


def mlflow(folder: Path) -> tuple[Server, Path]:
    """``mlflow models serve`` of a scikit-learn model saved by MLflow."""
    env = server_env("mlflow")
    model = train(env, folder)
    saved = folder / "mlflow-model"
    script = (
        "import sys, joblib, mlflow.sklearn; "
        "mlflow.sklearn.save_model(joblib.load(sys.argv[1]), sys.argv[2])"
    )
    subprocess.run([env / "bin" / "python", "-c", script, model, saved], check=True, timeout=300)
    port = free_port()
    command = [
        str(env / "bin" / "mlflow"),
        "models",
        "serve",
        "-m",
        str(saved),
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    return Server(command, folder, _environ(env), port, "/ping"), model


KSERVE_SERVER = """
import sys
import joblib
import numpy as np
import kserve
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse


class Iris(kserve.Model):
    def __init__(self, path):
        super().__init__("iris")
        self.model = joblib.load(path)
        self.ready = True

    def predict(self, payload, headers=None):
        if isinstance(payload, InferRequest):  # v2: one [N, 4] tensor or one tensor a column
            if len(payload.inputs) == 1:
                features = payload.inputs[0].as_numpy()
            else:
                features = payload.as_dataframe()[{features!r}]
        else:  # v1
            features = payload["instances"]
        try:
            labels = self.model.predict(np.asarray(features, dtype=float))
        except (TypeError, ValueError) as exc:
            raise InvalidInput(str(exc))
        labels = [str(label) for label in labels]
        if isinstance(payload, InferRequest):
            output = InferOutput("predict", [len(labels)], "BYTES", labels)
            return InferResponse(payload.id, "iris", [output])
        return {{"predictions": labels}}


if __name__ == "__main__":
    server = kserve.ModelServer(
        http_port=int(sys.argv[2]), grpc_port=int(sys.argv[3]), enable_grpc=False
    )
    server.start([Iris(sys.argv[1])])
"""


def kserve(folder: Path) -> tuple[Server, Path]:
    """KServe's model server with a ``kserve.Model`` subclass over the trained model."""
    env = server_env("kserve")
    model = train(env, folder)
    script = folder / "server.py"
    script.write_text(textwrap.dedent(KSERVE_SERVER.format(features=FEATURES)))
    port = free_port()
    command = [str(env / "bin" / "python"), str(script), str(model), str(port), str(free_port())]
    return Server(command, folder, _environ(env), port, "/v1/models/iris"), model


FACTORIES = {"mlserver": mlserver, "mlflow": mlflow, "kserve": kserve}


class Prestart:
    """Starts the servers a session's tests will need in a background thread, one after the
    other, as soon as the tests are collected: their start-up (a model trained, a server
    process importing its framework, tens of seconds each) then overlaps the other tests
    instead of adding to the suite's time. ``get`` waits for one (starting it now if it was
    not asked for); ``close`` stops them all. Nothing starts without the environments."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future[tuple[Server, Path]]] = {}
        self._folders: list[Path] = []

    def begin(self, names: Iterable[str]) -> None:
        for name in names:
            root = os.environ.get(ENVS_VARIABLE)
            pending = os.environ.get(PENDING_VARIABLE) == "1"
            if name in self._futures or not root:
                continue
            if not pending and not Path(root, name, "bin").exists():
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="server-prestart")
            self._futures[name] = self._pool.submit(self._prepare, name)

    def get(self, name: str) -> tuple[Server, Path]:
        server_env(name)  # skips (or fails) here without the environment
        self.begin([name])
        return self._futures[name].result()

    def _prepare(self, name: str) -> tuple[Server, Path]:
        root = os.environ.get(ENVS_VARIABLE)
        if root:
            _wait_until_made(root, name)
        folder = Path(tempfile.mkdtemp(prefix=f"batchrunner-{name}-"))
        self._folders.append(folder)
        server, model = FACTORIES[name](folder)
        server.start()
        return server, model

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for future in self._futures.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result()[0].kill()
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._futures.clear()


PRESTART = Prestart()
