"""Start-up (issue 16): the command's process leaves pandas and pydantic's plugin discovery
out; the library API leaves the host program's modules alone; a Ray run still has pandas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_csv

CHECK = """
import sys
from batchrunner.startup import lean_process
lean_process(sys.argv[1:])
import pyarrow as pa
pa.array([1, 2, 3])  # pyarrow looks for pandas the first time it builds an array
import os
print("pandas" in sys.modules, os.environ.get("PYDANTIC_DISABLE_PLUGINS"))
"""


def check(*argv: str) -> str:
    command = [sys.executable, "-c", CHECK, *argv]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_the_command_leaves_pandas_and_pydantic_plugins_out() -> None:
    assert check("run", "job.toml") == "False __all__"


def test_a_ray_run_keeps_pandas() -> None:
    assert check("run", "job.toml", "--engine", "ray").startswith("True")
    assert check("run", "job.toml", "--engine=ray").startswith("True")


def test_the_whole_command_never_imports_pandas(tmp_path: Path) -> None:
    data = write_csv(
        tmp_path / "d.csv",
        ["sepal_length", "sepal_width", "petal_length", "petal_width"],
        [(5.1, 3.5, 1.4, 0.2)] * 20,
    )
    command = [
        sys.executable, "-X", "importtime", "-m", "batchrunner", "run", "--input", str(data),
        "--url", "embedded:iris", "--output", str(tmp_path / "out.parquet"), "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "pyarrow.lib" in imported
    assert not any(name.startswith("pandas.") for name in imported)


WITHOUT_DATEUTIL = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[3]]

class Count:
    looked = 0

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "dateutil":
            Count.looked += 1
        return None

sys.meta_path.insert(0, Count())
import batchrunner.sink  # the library alone leaves the host's modules alone
assert "dateutil" not in sys.modules
if sys.argv[2] == "command":
    from batchrunner.startup import lean_process
    lean_process(["run", "job.toml"])
import pyarrow as pa
Count.looked = 0
for _ in range(20):
    pa.array([{"label": "rose"}])  # pyarrow's inference tries to import dateutil each time
print(Count.looked)
"""


def without_dateutil(tmp_path: Path, how: str) -> int:
    """Dateutil lookups in a process that has not got it (as a plain install has not): the
    same installed packages but dateutil, each linked into one folder."""
    import pyarrow

    import batchrunner

    installed = Path(pyarrow.__file__).parent.parent
    project = Path(batchrunner.__file__).parent.parent  # an editable install is a .pth: -S skips it
    packages = tmp_path / "packages"
    if not packages.exists():
        packages.mkdir()
        for entry in installed.iterdir():
            if not entry.name.lower().startswith(("dateutil", "python_dateutil")):
                (packages / entry.name).symlink_to(entry)
    command = [sys.executable, "-S", "-c", WITHOUT_DATEUTIL, str(packages), how, str(project)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout)


def test_the_command_knows_dateutil_is_absent_and_does_not_search_for_it(
    tmp_path: Path,
) -> None:
    # Each failed search walks sys.path again (~80 us, per result column per batch).
    assert without_dateutil(tmp_path, "command") == 0
    assert without_dateutil(tmp_path, "library") > 0  # the library leaves sys.modules alone


POOLS = """
import os, sys
import batchrunner.cli  # the console's module: it names Arrow's pool before pyarrow loads
import pyarrow as pa, pyarrow.parquet as pq
from batchrunner.wiring import use_lean_memory_pool
use_lean_memory_pool()
pq.write_table(pa.table({"x": list(range(100_000))}), sys.argv[1])
pq.read_table(sys.argv[1])
print(pa.default_memory_pool().backend_name, pa.mimalloc_memory_pool().max_memory())
"""


def test_all_of_arrow_allocates_from_one_lean_pool(tmp_path: Path) -> None:
    # The Parquet writer and reader (Arrow's C++ code) take the pool named when it loaded:
    # told only later, they kept mimalloc beside jemalloc (peak RSS ~200 MB instead of 150).
    if not sys.platform.startswith("linux"):
        return  # jemalloc is where pyarrow's wheels have it
    env = {key: value for key, value in os.environ.items() if key != "ARROW_DEFAULT_MEMORY_POOL"}
    command = [sys.executable, "-c", POOLS, str(tmp_path / "t.parquet")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["jemalloc", "0"], done.stderr


TLS_DEFAULTS = """
import ssl, sys
from batchrunner.startup import lean_process
create, paths = ssl.create_default_context, ssl.SSLContext.set_default_verify_paths
lean_process(["run", "job.toml"])
import aiohttp.connector as connector
print(connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
      connector._SSL_CONTEXT_VERIFIED.verify_mode == ssl.CERT_REQUIRED,
      ssl.create_default_context is create, ssl.SSLContext.set_default_verify_paths is paths)
"""


def test_aiohttps_unused_default_tls_contexts_read_no_ca_bundle() -> None:
    """They trust nothing (fail closed), and ssl is left as it was for everyone else."""
    command = [sys.executable, "-c", TLS_DEFAULTS]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert output.split() == ["0", "True", "True", "True"]
