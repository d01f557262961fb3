"""A bad day at the service, rehearsed with the embedded service's fault injection."""

from __future__ import annotations

import csv
from pathlib import Path

import orjson

from batchrunner.service.faults import FaultSettings, poisoned
from tests.conftest import REPO, read_output, write_csv, write_job

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_features(copies: int) -> list[tuple[str, ...]]:
    with (REPO / "samples" / "iris.csv").open() as handle:
        rows = [tuple(row[name] for name in FEATURES) for row in csv.DictReader(handle)]
    return [(f"r{n}", *row) for n in range(copies) for row in rows]


def test_bad_day_loses_nothing_and_doubles_nothing(invoke) -> None:
    rows = iris_features(10)  # 1,500 rows, 150 requests
    data = write_csv(
        Path("flowers.csv"), ["id", *FEATURES], [(f"{i}", *r[1:]) for i, r in enumerate(rows)]
    )
    job = write_job(
        Path("bad-day.toml"),
        f'[input]\npath = "{data}"\nid_column = "id"\n'
        '[service]\nurl = "embedded:iris"\n'
        "[service.embedded]\nerror_rate = 0.05\ndrop_rate = 0.02\nhtml_rate = 0.01\n"
        "capacity = 4\nretry_after = 0.01\nlatency_ms = 2\nseed = 7\n"
        "[batch]\nsize = 10\nconcurrency = 8\n"
        "[retry]\nmax_attempts = 12\nbackoff_initial = 0.005\nbackoff_max = 0.05\n",
    )
    result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    out = read_output("out/bad-day.parquet")
    assert [r["_key"] for r in out] == [str(i) for i in range(len(rows))]
    assert all(r["_status"] == "ok" for r in out)
    retried = sum(r["_attempts"] > 1 for r in out) // 10
    assert retried > 0  # the faults happened, and were ridden out
    print(f"\n[bad day] {retried} of 150 batches needed more than one attempt; 0 rows lost")


def test_one_poison_row_in_a_batch_of_100(invoke) -> None:
    rows = iris_features(1)[:100]
    rows[37] = ("r", "5.0", "n/a", "1.4", "0.2")  # the model cannot score this one
    data = write_csv(
        Path("batch.csv"), ["id", *FEATURES], [(f"{i}", *r[1:]) for i, r in enumerate(rows)]
    )
    job = write_job(
        Path("poison.toml"),
        f'[input]\npath = "{data}"\nid_column = "id"\n'
        '[service]\nurl = "embedded:iris"\n[batch]\nsize = 100\n',
    )
    result = invoke("run", str(job))
    assert result.exit_code == 1
    out = read_output("out/poison.parquet")
    errors = [r for r in out if r["_status"] == "error"]
    assert [r["_key"] for r in errors] == ["37"]
    assert errors[0]["_error_kind"] == "model_error"
    assert errors[0]["_error"].startswith("HTTP 400 MR.0105:")
    assert "sepal_width" in errors[0]["_error"]
    assert sum(r["_status"] == "ok" for r in out) == 99
    assert all(r["predictresult"] for r in out if r["_status"] == "ok")


def test_poisoned_rows_from_fault_injection_are_isolated(invoke) -> None:
    settings = FaultSettings(poison_rate=0.02, seed=3)
    rows = iris_features(2)
    records = [dict(zip(FEATURES, (float(v) for v in r[1:]), strict=True)) for r in rows]
    expected_bad = {i for i, record in enumerate(records) if poisoned(record, 0.02, 3)}
    assert expected_bad  # the seed poisons a few rows
    data = write_csv(Path("d.csv"), FEATURES, [r[1:] for r in rows])
    job = write_job(
        Path("p.toml"),
        f'[input]\npath = "{data}"\n[service]\nurl = "embedded:iris"\n'
        f"[service.embedded]\npoison_rate = {settings.poison_rate}\nseed = {settings.seed}\n"
        "[batch]\nsize = 25\n",
    )
    result = invoke("run", str(job), "--set", "max_error_rate=0.1")
    assert result.exit_code == 0, result.stderr
    out = read_output("out/p.parquet")
    assert {int(r["_key"]) for r in out if r["_status"] == "error"} == expected_bad
    assert "splits" in Path("out/p.parquet.summary.json").read_text()


def test_oversized_batch_is_split_before_sending(invoke) -> None:
    rows = iris_features(1)
    data = write_csv(Path("d.csv"), FEATURES, [r[1:] for r in rows])
    result = invoke(
        "run", "--input", str(data), "--url", "embedded:iris", "--batch-size", "150",
        "--set", "batch.max_request_bytes=2000",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert all(r["_status"] == "ok" for r in read_output("out/d.parquet"))
    summary = orjson.loads(Path("out/d.parquet.summary.json").read_bytes())
    assert summary["splits"] >= 3  # 150 rows of ~100 bytes each: halves of halves
    assert summary["requests"] > 4


def test_faults_need_the_embedded_service(invoke) -> None:
    write_csv(Path("d.csv"), ["x"], [(1,)])
    job = write_job(
        Path("j.toml"),
        '[input]\npath = "d.csv"\n[service]\nurl = "https://example.invalid/v1/infers/x"\n'
        "[service.embedded]\nerror_rate = 0.5\n",
    )
    result = invoke("run", str(job))
    assert result.exit_code == 2
    assert "[service.embedded] sets faults of the embedded service" in result.stderr
