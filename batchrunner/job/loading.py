"""Loading a job: parse TOML -> apply overrides (``--input``, ``--set section.key=value``,
...) -> expand ``${ENV}`` in strings -> validate. Every problem is a ``SettingError`` naming
the setting (``batch.size must be >= 1, got 0``), with a "did you mean" for unknown keys.
Also the check, once the input is found, that no setting is for the other input kind.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from batchrunner.errors import SettingError, did_you_mean
from batchrunner.job.common import SECRET_POINTERS
from batchrunner.job.settings import IMAGES, Job

#: Command-line options and the setting each one overrides.
OPTION_SETTINGS = {
    "input": "input.path",
    "output": "output.path",
    "url": "service.url",
    "concurrency": "batch.concurrency",
    "batch_size": "batch.size",
    "metrics_file": "report.metrics_file",
    "state_dir": "run.state_dir",
    "max_error_rate": "max_error_rate",
}


def load_job(
    path: str | Path | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    assignments: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Job:
    """Load, override, expand and validate a job.

    ``path`` is the TOML file (None: the job comes from options alone). ``overrides`` maps
    dotted setting names to values (None values are ignored); ``assignments`` are
    ``section.key=value`` strings as given to ``--set``.
    """
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        raw = _read_toml(Path(path))
        source = str(path)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _assign(raw, dotted, value)
    for assignment in assignments:
        dotted, value = parse_assignment(assignment)
        _assign(raw, dotted, value)
    if "name" not in raw:
        raw["name"] = _default_name(path, raw)
    raw = _expand_env(raw, os.environ if environ is None else environ, ())
    try:
        return Job.model_validate(raw)
    except ValidationError as exc:
        raise SettingError(_describe(exc, source)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingError(f"job file not found: {path}") from None
    except OSError as exc:
        raise SettingError(f"cannot read job file {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"{path}: not valid TOML: {exc}") from None


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is read as TOML if it parses, else as text."""
    dotted, sep, text = assignment.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted or not re.fullmatch(r"[A-Za-z_][\w.]*", dotted):
        raise SettingError(
            f"--set {assignment!r}: expected section.key=value, e.g. --set batch.size=100"
        )
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return dotted, value


def _assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    node = raw
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise SettingError(f"cannot set {dotted}: {section} is a value, not a section")
        node = child
    node[key] = value


def _default_name(path: str | Path | None, raw: Mapping[str, Any]) -> str:
    if path is not None:
        stem = Path(path).stem
    else:
        input_path = str(raw.get("input", {}).get("path", "job"))
        stem = Path(input_path.rstrip("/*")).stem or "job"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "job"


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, environ: Mapping[str, str], where: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, environ, (*where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, environ, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise SettingError(
            f"{'.'.join(where)}: environment variable {name} is not set "
            f"(used as ${{{name}}}); set it, or write ${{{name}:-default}}"
        )

    return _ENV_REFERENCE.sub(substitute, value)


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid job ({source}):"]
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            lines.append(f"  unknown setting {location}{_unknown_setting_hint(error['loc'])}")
        elif kind == "missing":
            lines.append(f"  {location}: required setting is missing")
        else:
            message = error["msg"]
            message = message[0].lower() + message[1:] if message else message
            message = message.removeprefix("value error, ")
            if _shows_input(error["loc"], error["input"]):
                message += f", got {error['input']!r}"
            lines.append(f"  {location}: {message}")
    return "\n".join(lines)


def _shows_input(location: tuple[int | str, ...], value: Any) -> bool:
    # A whole section (a rule across its settings) is not worth echoing; a secret pointer
    # may hold a pasted secret, so it is never echoed.
    return not isinstance(value, dict) and not (location and location[-1] in SECRET_POINTERS)


def _unknown_setting_hint(location: tuple[int | str, ...]) -> str:
    model: type[BaseModel] = Job
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        # A section may be optional (`EmbeddedSettings | None`): its model is in the union.
        options = get_args(annotation) or (annotation,)
        sections = [o for o in options if isinstance(o, type) and issubclass(o, BaseModel)]
        if not sections:
            return ""
        model = sections[0]
    known = list(model.model_fields)
    return f"{did_you_mean(str(location[-1]), known)}; known settings here: {', '.join(known)}"


# Settings that mean something for one input kind only: given for the other kind, they are
# a mistake (a job pointed at the wrong input), never silently ignored.
_IMAGE_ONLY = ("input.extensions", "input.recursive", "input.follow_links", "service.file_field")
_TABLE_ONLY = (
    "input.id_column",
    "input.columns",
    "input.csv_delimiter",
    "input.encoding",
    "input.binary",
    "output.keep_input",
)


def _given(job: Job, dotted: str) -> bool:
    section, key = dotted.split(".")
    settings: BaseModel = getattr(job, section)
    return key in settings.model_fields_set


def check_input_kind(job: Job, kind: str, path: str) -> None:
    """Refuse settings that do not apply to the input's kind (``TABULAR`` or ``IMAGES``).

    ``path`` is the input as found, for the message. Image input sends one file per
    request, so an explicit ``batch.size`` other than 1 is refused; left out, it is 1.
    """
    if kind == IMAGES:
        wrong = [dotted for dotted in _TABLE_ONLY if _given(job, dotted)]
        if _given(job, "batch.size") and job.batch.size != 1:
            wrong.append("batch.size")
        what, reason = "image input", "each file is sent as it is, one file per request"
    else:
        wrong = [dotted for dotted in _IMAGE_ONLY if _given(job, dotted)]
        what, reason = "a table", "they apply to image input only"
    if not wrong:
        return
    message = (
        f"input.path {path!r} is read as {what}, so {', '.join(wrong)} cannot be used "
        f"({reason}); remove {'it' if len(wrong) == 1 else 'them'}"
    )
    if job.input.format is None:
        message += f", or set input.format if {path!r} is not {what}"
    raise SettingError(message)
