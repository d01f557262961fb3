"""An OpenAI batch file: ``{"custom_id", "method", "url", "body"}`` a line (``protocol =
"openai-batch"``), the input a provider's batch API takes, read as rows to send one by one.

Each line becomes a row of four text columns, ``custom_id`` (its key), ``method``, ``url``
and ``body`` (the body as the line wrote it, JSON text, sent unchanged). The file is checked
when it is opened, before anything is sent: every line a JSON object with a non-empty
``custom_id`` string (each once), ``method`` and ``url`` strings and an object ``body``; a
line that is not names its line number (``InputError``, exit 2). Blank lines are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson
import pyarrow as pa

from batchrunner.errors import InputError
from batchrunner.items import Batch
from batchrunner.storage import InputPath

__all__ = ["BATCH_FILE_COLUMNS", "BatchFileSource", "open_batch_file"]

BATCH_FILE_COLUMNS = ("custom_id", "method", "url", "body")
FORMAT = "openai-batch"


def _line_fields(line: bytes, number: int, path: Path) -> tuple[str, str, str, str]:
    where = f"{path}, line {number}"
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{where}: not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InputError(f"{where}: not a JSON object")
    custom_id = document.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError(f'{where}: needs a "custom_id" text (the line\'s key)')
    method, url, body = document.get("method"), document.get("url"), document.get("body")
    if not isinstance(method, str) or not isinstance(url, str):
        raise InputError(f'{where}: needs "method" and "url" texts, as the batch format has')
    if not isinstance(body, dict):
        raise InputError(f'{where}: "body" must be a JSON object (the request\'s body)')
    return custom_id, method, url, orjson.dumps(body).decode()


class BatchFileSource:
    """The lines of one batch file, as rows (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        seen: dict[str, int] = {}
        for number, fields in self._lines():
            first = seen.setdefault(fields[0], number)
            if first != number:
                raise InputError(
                    f"{path}, line {number}: custom_id {fields[0]!r} comes again (first on line "
                    f"{first}); each request needs its own, to join its result to it"
                )
        self._rows = len(seen)

    def _lines(self) -> Iterator[tuple[int, tuple[str, str, str, str]]]:
        try:
            with self.path.open("rb") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        yield number, _line_fields(line, number, self.path)
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    @property
    def paths(self) -> Sequence[InputPath]:
        return [self.path]

    @property
    def format(self) -> str:
        return FORMAT

    @property
    def send_columns(self) -> Sequence[str]:
        return BATCH_FILE_COLUMNS

    def count_rows(self) -> int | None:
        return self._rows

    def scan_count(self) -> int:
        return self._rows

    def estimated_rows(self) -> int | None:
        return None

    def iter_batches(
        self, size: int, *, limit: int | None = None, start_seq: int = 0
    ) -> Iterator[Batch]:
        """Batches of ``size`` lines in file order (``start_seq`` batches skipped)."""
        wanted = self._rows if limit is None else min(limit, self._rows)
        pending: list[tuple[str, str, str, str]] = []
        seq = 0
        for taken, (_, fields) in enumerate(self._lines(), start=1):
            if taken > wanted:
                break
            pending.append(fields)
            if len(pending) == size or taken == wanted:
                if seq >= start_seq:
                    yield _batch(seq, pending)
                seq += 1
                pending = []


def _batch(seq: int, lines: list[tuple[str, str, str, str]]) -> Batch:
    columns = list(zip(*lines, strict=True))
    rows = pa.RecordBatch.from_arrays(
        [pa.array(column, pa.string()) for column in columns], names=list(BATCH_FILE_COLUMNS)
    )
    return Batch(seq=seq, keys=list(columns[0]), rows=rows)


def open_batch_file(path: str) -> BatchFileSource:
    """Open and check the batch file at ``path`` (a local file)."""
    local = Path(path)
    if not local.is_file():
        raise InputError(f"input.path: {path} is not a file; an OpenAI batch file is one .jsonl")
    return BatchFileSource(local)
