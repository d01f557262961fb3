"""The README's commands and the shipped jobs are run or checked here, so they cannot rot."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from batchrunner.job import load_job
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
JOBS = sorted((REPO / "jobs").glob("*.toml"))


def shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = next(line for b in shell_blocks() for line in b.splitlines() if "pytest" in line)
    assert test_command.strip() in (REPO / ".ci" / "run").read_text()


def test_readme_quick_start_runs_a_shipped_job() -> None:
    quick_start = shell_blocks()[0]
    job = re.search(r"batchrunner run (jobs/\S+\.toml)", quick_start)
    assert job is not None
    assert (REPO / job.group(1)).is_file()


def test_every_command_in_the_readme_table_exists(invoke) -> None:
    for command in re.findall(r"^\| `batchrunner (\w+)", README, flags=re.M):
        assert invoke(command, "--help").exit_code == 0, command


@pytest.mark.parametrize("job", JOBS, ids=[job.stem for job in JOBS])
def test_shipped_jobs_are_valid_and_run(invoke, job: Path, tmp_path: Path) -> None:
    shutil.copytree(REPO / "samples", tmp_path / "samples", symlinks=False)
    result = invoke("validate", str(job))
    assert result.exit_code == 0, result.stderr
    result = invoke("run", str(job), "--limit", "20")
    assert result.exit_code == 0, result.stderr


def test_every_toml_block_in_the_readme_is_a_valid_job(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        document = tomllib.loads(block)
        # A fragment (one section) is completed into a job with the least it needs.
        document.setdefault("input", {"path": "data.csv"})
        document.setdefault("service", {}).setdefault("url", "https://gw.example/v1/infers/x")
        path = tmp_path / "job.toml"
        path.write_text(tomli_w_dumps(document))
        load_job(path)  # raises SettingError, naming the setting, if the README drifted


def tomli_w_dumps(document: dict[str, object], prefix: str = "") -> str:
    """Just enough TOML writing for the README's blocks: tables of scalars and lists."""
    scalars = {k: v for k, v in document.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in document.items() if isinstance(v, dict)}
    text = f"[{prefix}]\n" if prefix and scalars else ""
    text += "".join(f"{key} = {json.dumps(value)}\n" for key, value in scalars.items())
    for key, table in tables.items():
        text += tomli_w_dumps(table, f"{prefix}.{key}" if prefix else key)
    return text
