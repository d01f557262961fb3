"""Tests for batchrunner.sources.jsonl_files: bad lines and empty files in JSON lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchrunner.errors import InputError
from batchrunner.sources import open_tabular
from tests.tabular_files import write_jsonl


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3\n{"a": 4}\n')
    with pytest.raises(InputError, match=r"x\.jsonl, line 3: not valid JSON"):
        open_tabular(path)
    late = tmp_path / "late.jsonl"
    late.write_text('{"a": 1}\n' * 300 + '{"a": \n')
    source = open_tabular(late, block_bytes=256)
    with pytest.raises(InputError, match=r"late\.jsonl, line 301: not valid JSON"):
        list(source.iter_batches(50))
    with pytest.raises(InputError, match="line 301"):
        source.scan_count()


def test_json_array_file_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[{"a": 1}, {"a": 2}]\n')
    with pytest.raises(InputError, match=r"line 1: expected a JSON object, got an array.*jq"):
        open_tabular(path)


def test_empty_files_among_others(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("")
    write_jsonl(tmp_path / "b.jsonl", [{"v": 1}, {"v": 2}])
    (tmp_path / "c.jsonl").write_text("\n")
    write_jsonl(tmp_path / "d.jsonl", [{"v": 3}])
    source = open_tabular(tmp_path)
    assert [k for b in source.iter_batches(2) for k in b.keys] == ["0", "1", "2"]
    assert source.scan_count() == 3
