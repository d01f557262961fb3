"""What --help shows is what the code says: plain text, bracketed words and defaults kept;
and the options the README promises exist (issue 12, items 17 and 19)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq


def test_help_keeps_bracketed_text_and_defaults(invoke) -> None:
    run = invoke("run", "--help")
    assert run.exit_code == 0
    assert "pip install 'batchrunner[ray]'" in " ".join(run.stdout.split())
    cron = " ".join(invoke("cron", "--help").stdout.split())
    assert "[logs/<job>.log]" in cron  # the default of --log
    assert "Required (except with --remove)" in cron


def test_max_error_rate_option_decides_the_exit_code(invoke, iris_job: Path) -> None:
    # Every row refused (the iris model needs its four features): 100% errors.
    broken = ["--set", "input.columns=['species']", "--set", "retry.max_attempts=1"]
    strict = invoke("run", str(iris_job), *broken)
    assert strict.exit_code == 1, strict.stderr
    lenient = invoke("run", str(iris_job), *broken, "--no-resume", "--max-error-rate", "1")
    assert lenient.exit_code == 0, lenient.stderr
    assert pq.read_table("out/iris.parquet").num_rows == 150
    refused = invoke("run", str(iris_job), "--max-error-rate", "2")
    assert refused.exit_code == 2


def test_state_dir_option_puts_the_state_there(invoke, iris_job: Path) -> None:
    result = invoke("run", str(iris_job), "--state-dir", "state-here", "--dry-run")
    assert result.exit_code == 0, result.stderr
    done = invoke("run", str(iris_job), "--state-dir", "state-here")
    assert done.exit_code == 0, done.stderr
    assert Path("state-here/iris.lock").exists()
    assert not Path("out/.batchrunner").exists()
