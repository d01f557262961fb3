"""The README's commands and the shipped jobs are run or checked here, so they cannot rot."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

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
