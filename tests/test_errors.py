"""Tests for batchrunner.errors: the helpers that write parts of messages."""

from __future__ import annotations

from batchrunner.errors import clip, closest_name, did_you_mean


def test_did_you_mean_a_close_spelling() -> None:
    names = ["sepal_length", "species"]
    assert did_you_mean("sepal_lenght", names) == " (did you mean 'sepal_length'?)"
    assert did_you_mean("zzz", names) == ""
    assert did_you_mean("x", []) == ""


def test_a_name_equal_but_for_case_wins() -> None:
    # difflib alone finds nothing alike in "ID" and "id"; nor is "Ab" closest to "aB" for it.
    assert did_you_mean("ID", ["x", "id"]) == " (did you mean 'id'?)"
    assert closest_name("aB", ["Abc", "ab"]) == "ab"
    assert closest_name("nothing", ["id"]) is None


def test_clip() -> None:
    assert clip("short") == "short"
    assert clip("abcdefgh", 5) == "ab..."
    assert clip("x" * 80) == "x" * 80
    assert clip("x" * 81) == "x" * 77 + "..."
