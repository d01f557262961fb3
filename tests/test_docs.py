"""The README's commands and the shipped jobs are run or checked here, so they cannot rot."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from batchrunner.job import load_job
from tests.conftest import REPO, FakeCrontab

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
        service = document.setdefault("service", {})
        # [service.embedded] sets faults of the embedded service: it needs an embedded URL.
        url = "embedded:iris" if "embedded" in service else "https://gw.example/v1/infers/x"
        service.setdefault("url", url)
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


def readme_section(heading: str) -> str:
    return README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_nightly_section_from_nothing_to_an_installed_line(
    invoke, fake_crontab: FakeCrontab, tmp_path: Path
) -> None:
    # Follow "Run it nightly" word for word, in a fresh folder, with a stand-in crontab.
    section = readme_section("Run it nightly")
    blocks = [textwrap.dedent(b) for b in re.findall(r"```(?:sh|toml)?\n(.*?)```", section, re.S)]
    job_text = next(block for block in blocks if block.startswith("# jobs/"))
    job = Path(job_text.splitlines()[0].removeprefix("# "))
    job.parent.mkdir()
    job.write_text(job_text)
    commands = [line for block in blocks for line in block.splitlines()]
    make_env_file = next(line for line in commands if line.startswith("install -m 600"))
    subprocess.run(make_env_file, shell=True, check=True)
    with open("nightly.env", "a") as env_file:  # "then add one line ... with your editor"
        env_file.write("MODELARTS_TOKEN=t0k3n\n")

    cron_commands = [line for line in commands if line.startswith("batchrunner cron")]
    assert len(cron_commands) == 2
    for command in cron_commands:
        result = invoke(*shlex.split(command)[1:])
        assert result.exit_code == 0, result.stderr
        assert "warning" not in result.stderr

    # the line in the table is the one the section shows, in this folder and this venv
    shown = next(block for block in blocks if block.startswith("0 2 * * * "))
    shown = shown.replace("/home/me/.venvs/batchrunner/bin", str(Path(sys.executable).parent))
    assert fake_crontab.table == shown.replace("/home/me/scoring", str(tmp_path))

    remove = re.search(r"`(batchrunner cron \S+ --remove)`", section)
    assert remove is not None
    assert invoke(*shlex.split(remove.group(1))[1:]).exit_code == 0
    assert fake_crontab.table == ""
