"""The columns of a tabular input: which are sent, which are read, checked against the schema.

``input.columns`` names the columns sent (by default every column but ``input.id_column``
and pandas' index); the columns read are those plus the id, or all of them to keep the
input. A column the job names but the input lacks is an ``InputError`` that lists the
columns there are and suggests a close name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pyarrow as pa

from batchrunner.errors import InputError, did_you_mean
from batchrunner.storage import InputPath

__all__ = ["check_unique", "read_columns", "send_columns"]

_PANDAS_INDEX = re.compile(r"__index_level_\d+__\Z")  # pandas' index, not a feature


def send_columns(
    schema: pa.Schema, columns: Sequence[str] | None, id_column: str | None, where: str
) -> list[str]:
    """The columns sent: ``columns`` (``input.columns``) checked against the schema, or by
    default every column but the id and pandas' index. ``where`` names the schema's source."""
    names = schema.names
    if id_column is not None and id_column not in names:
        raise _missing_column("input.id_column", id_column, names, where)
    if columns is None:
        send = [n for n in names if n != id_column and not _PANDAS_INDEX.match(n)]
        if not send:
            raise InputError(
                f"{where}: no column to send besides input.id_column {id_column!r}; "
                f"the input needs at least one more column"
                if id_column is not None
                else f"{where}: no columns found"
            )
        return send
    if isinstance(columns, str):
        raise InputError(f"input.columns must be a list of names, got the text {columns!r}")
    send = list(columns)
    if not send:
        raise InputError(
            "input.columns is empty: list the columns to send, or leave it out to send every "
            "column but input.id_column"
        )
    for name in send:
        if name not in names:
            raise _missing_column("input.columns", name, names, where)
    twice = sorted({n for n in send if send.count(n) > 1})
    if twice:
        raise InputError(f"input.columns lists {twice[0]!r} more than once")
    return send


def read_columns(
    schema: pa.Schema, send: list[str], id_column: str | None, keep_input: bool
) -> list[str]:
    """The columns read from the files: all of them to keep the input, else only those used."""
    if keep_input:
        return list(schema.names)
    return list(dict.fromkeys([*send, *([id_column] if id_column is not None else [])]))


def check_unique(names: Sequence[str], read: list[str], path: InputPath) -> None:
    """Raise an InputError when a read column's name appears twice in ``path``'s ``names``."""
    for name in read:
        if names.count(name) > 1:
            raise InputError(
                f"{path}: the column name {name!r} appears more than once; rename one "
                f"so that the job can tell them apart"
            )


def _missing_column(setting: str, name: str, names: Sequence[str], where: str) -> InputError:
    shown = ", ".join(repr(n) for n in names[:40]) + (", ..." if len(names) > 40 else "")
    return InputError(
        f"{setting}: no column {name!r} in {where}{did_you_mean(name, names)}; "
        f"the columns are: {shown or '(none)'}"
    )
