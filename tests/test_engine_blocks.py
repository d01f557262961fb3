"""The finished blocks a Ray run keeps for resume: no Ray needed."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from batchrunner.engines.blocks import block_name, open_ray_state, reusable_part, write_part
from batchrunner.report import (
    DispatchStatistics,
    FinishTally,
    LatencyHistogram,
    ReadStatistics,
    RunStatistics,
)

IDENTITY = {"url": "http://127.0.0.1:9/v1/infers/iris", "batch_size": 10, "files": []}


def finished_block(rows_ok: int, errors: dict[str, int]) -> tuple[pa.Table, RunStatistics]:
    finishing = FinishTally(rows_ok=rows_ok)
    for kind, rows in errors.items():
        finishing.rows_error += rows
        finishing.record_error_rows(kind, rows, "k1", f"{kind} happened")
    keys = [f"k{index}" for index in range(finishing.rows_ok + finishing.rows_error)]
    return pa.table({"_key": keys}), RunStatistics(finishing=finishing.statistics())


def test_a_block_is_named_by_its_keys_in_order() -> None:
    assert block_name(["1", "2"]) == block_name(["1", "2"])
    assert block_name(["1", "2"]) != block_name(["2", "1"])
    assert len(block_name([])) == 32


def test_a_part_is_reused_with_its_counts_unless_it_holds_rows_worth_another_try(
    tmp_path: Path,
) -> None:
    table, stats = finished_block(3, {"model_error": 1})
    write_part(tmp_path / "a.parquet", table, stats)
    reused = reusable_part(tmp_path / "a.parquet")
    assert reused is not None
    assert (reused.finishing.rows_ok, reused.finishing.rows_error) == (3, 1)
    [error] = reused.finishing.errors
    assert (error.kind, error.example_message) == ("model_error", "model_error happened")
    assert reused.dispatch.requests == 0  # nothing is sent for it
    table, stats = finished_block(3, {"timeout": 1})
    write_part(tmp_path / "b.parquet", table, stats)
    assert reusable_part(tmp_path / "b.parquet") is None
    assert reusable_part(tmp_path / "missing.parquet") is None
    (tmp_path / "c.parquet").write_bytes(b"not parquet")
    assert reusable_part(tmp_path / "c.parquet") is None
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "a.parquet",
        "b.parquet",
        "c.parquet",
    ]


def test_the_state_is_kept_for_the_same_job_only(tmp_path: Path) -> None:
    output = tmp_path / "out" / "iris.parquet"
    state, note = open_ray_state(output, "iris", IDENTITY, resume=True)
    assert note is None
    assert state.folder == tmp_path / "out" / ".batchrunner" / "iris.state" / "ray"
    write_part(state.part("x"), *finished_block(2, {}))
    state, note = open_ray_state(output, "iris", IDENTITY, resume=True)
    assert note == f"resuming: 1 finished blocks are kept in {state.parts}"
    assert state.finished_parts() == [state.part("x")]
    changed = {**IDENTITY, "batch_size": 20}
    state, note = open_ray_state(output, "iris", changed, resume=True)
    assert (
        note
        == "starting fresh: the job changed since its unfinished Ray run (batch_size: 10 -> 20)"
    )
    assert state.finished_parts() == []
    write_part(state.part("y"), *finished_block(2, {}))
    state, note = open_ray_state(output, "iris", changed, resume=False)
    assert note == "starting fresh (--no-resume): the unfinished Ray run's blocks are discarded"
    assert state.finished_parts() == []
    state.remove()
    assert not (tmp_path / "out" / ".batchrunner" / "iris.state").exists()


def test_run_statistics_add_up() -> None:
    def block(requests: int, latency_ms: float, ok: int, errors: int) -> RunStatistics:
        latency = LatencyHistogram()
        latency.add(latency_ms)
        finishing = FinishTally(rows_ok=ok, rows_error=errors)
        if errors:
            finishing.record_error_rows("http_400", errors, "k9", "bad")
        return RunStatistics(
            ReadStatistics(1, ok + errors),
            DispatchStatistics(requests=requests, latency=latency.statistics()),
            finishing.statistics(),
        )

    snapshot = (block(2, 10.0, 5, 0) + block(1, 30.0, 0, 2)).snapshot(0, 1.0)
    assert (snapshot.batches_read, snapshot.rows_read) == (2, 7)
    assert (snapshot.requests, snapshot.rows_ok, snapshot.rows_error) == (3, 5, 2)
    assert snapshot.latency.max == 30.0
    assert snapshot.errors[0].kind == "http_400"
    assert snapshot.errors[0].example_key == "k9"
