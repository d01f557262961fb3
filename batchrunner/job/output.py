"""Where a run's output goes: ``output.path`` with its placeholders filled (``{name}
{date} {time} {run_id}``), checked, and the glob of every run's output file."""

from __future__ import annotations

import glob
import string
from datetime import datetime
from pathlib import Path

from batchrunner.errors import SettingError
from batchrunner.job.settings import Job

OUTPUT_PLACEHOLDERS = ("name", "date", "time", "run_id")
OUTPUT_SUFFIXES = (".parquet", ".csv", ".jsonl")  # the formats of ``formats``


def output_name_glob(job: Job) -> str:
    """A glob matching the file name of every run's output (placeholders of the date, time
    and run id as ``*``), for finding what earlier runs of the job left beside it."""
    name = Path(job.output.path).name
    wild = "\x00"
    try:
        filled = name.format(name=job.name, date=wild, time=wild, run_id=wild)
    except (KeyError, ValueError, IndexError):
        return glob.escape(name)
    return "*".join(glob.escape(part) for part in filled.split(wild))


def resolve_output_path(job: Job, started: datetime, run_id: str) -> Path:
    """``output.path`` with its placeholders filled: ``{name} {date} {time} {run_id}``.

    ``started`` is the run's start in local time: each night's run writes its own file.
    A bucket location (``s3://``, ``obs://``) is refused here: see ``resolve_output``.
    """
    text = resolve_output(job, started, run_id)
    if "://" in text:
        raise SettingError(f"output.path: a local path is needed here, got {text!r}")
    return Path(text)


def resolve_output(job: Job, started: datetime, run_id: str) -> str:
    """``output.path`` with its placeholders filled, as text: a local path or a URI."""
    template = job.output.path
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise SettingError(f"output.path: {exc} in {template!r}") from None
    for name in fields:
        if name not in OUTPUT_PLACEHOLDERS:
            raise SettingError(
                f"output.path: unknown placeholder {{{name}}} in {template!r}; "
                f"known: {', '.join('{' + p + '}' for p in OUTPUT_PLACEHOLDERS)}"
            )
    text = template.format(
        name=job.name,
        date=started.strftime("%Y-%m-%d"),
        time=started.strftime("%H%M%S"),
        run_id=run_id,
    )
    suffix = "." + text.rpartition(".")[2].lower() if "." in text.rpartition("/")[2] else ""
    if suffix not in OUTPUT_SUFFIXES or text.endswith("/"):
        raise SettingError(f"output.path: must end in .parquet (or .csv, .jsonl), got {text!r}")
    if job.input.incremental and suffix != ".parquet":
        raise SettingError(
            f"output.path: input.incremental remembers items from a Parquet output; got {text!r}"
        )
    folder = template.rpartition("/")[0]
    if job.input.incremental and any(name for _, name, _, _ in string.Formatter().parse(folder)):
        raise SettingError(
            f"output.path: with input.incremental the output's folder must stay the same from "
            f"run to run (the remembered items live in its .batchrunner/ folder): put the "
            f"placeholders in the file name, e.g. 'out/{{name}}-{{date}}.parquet', "
            f"got {template!r}"
        )
    return text if "://" in text else str(Path(text))
