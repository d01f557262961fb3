"""The finished blocks a Ray run keeps for resume, in a folder or a bucket: no Ray needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from batchrunner.checkpoint import StatePaths
from batchrunner.engines.blocks import Parts, RayState, block_name, open_ray_state
from batchrunner.report import (
    DispatchStatistics,
    FinishTally,
    LatencyHistogram,
    ReadStatistics,
    RunStatistics,
)
from batchrunner.storage import ObjectPath, ObjectStore
from tests.s3 import ACCESS_KEY, SECRET_KEY

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


def where(kind: str, tmp_path: Path, s3: Any) -> Path | ObjectPath:
    if kind == "folder":
        return tmp_path / "parts"
    s3.bucket("work")
    store = ObjectStore(
        endpoint=s3.endpoint, region="us-east-1", access_key=ACCESS_KEY, secret_key=SECRET_KEY
    )
    return store.locate("s3://work/out/.batchrunner/iris.state/ray/parts/")


@pytest.mark.parametrize("kind", ["folder", "bucket"])
def test_a_part_is_reused_with_its_counts_unless_it_holds_rows_worth_another_try(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    parts = Parts(
        where(kind, tmp_path, request.getfixturevalue("s3") if kind == "bucket" else None)
    )
    if kind == "folder":
        tmp_path.joinpath("parts").mkdir()
    table, stats = finished_block(3, {"model_error": 1})
    parts.write("a", table, stats)
    reused = parts.reusable("a")
    assert reused is not None
    assert (reused.finishing.rows_ok, reused.finishing.rows_error) == (3, 1)
    [error] = reused.finishing.errors
    assert (error.kind, error.example_message) == ("model_error", "model_error happened")
    assert reused.dispatch.requests == 0  # nothing is sent for it
    assert parts.read("a", ["_key"]).column(0).to_pylist() == ["k0", "k1", "k2", "k3"]
    table, stats = finished_block(3, {"timeout": 1})
    parts.write("b", table, stats)
    assert parts.reusable("b") is None
    assert parts.reusable("missing") is None
    c = parts.part("c")
    if isinstance(c, ObjectPath):
        c.store.put_bytes(b"not parquet", c)
    else:
        c.write_bytes(b"not parquet")
    assert parts.reusable("c") is None
    assert parts.names() == ["a", "b", "c"]
    parts.clear()
    assert parts.names() == []


def test_the_state_is_kept_for_the_same_job_only(tmp_path: Path) -> None:
    output = tmp_path / "out" / "iris.parquet"
    paths = StatePaths.for_output(output, "iris", None)
    state, note = open_ray_state(RayState.of(paths, output, "iris"), IDENTITY, resume=True)
    assert note is None
    assert state.folder == tmp_path / "out" / ".batchrunner" / "iris.state" / "ray"
    state.parts.write("x", *finished_block(2, {}))
    state, note = open_ray_state(state, IDENTITY, resume=True)
    assert note == f"resuming: 1 finished blocks are kept in {state.parts}"
    assert state.parts.names() == ["x"]
    changed = {**IDENTITY, "batch_size": 20}
    state, note = open_ray_state(state, changed, resume=True)
    assert (
        note
        == "starting fresh: the job changed since its unfinished Ray run (batch_size: 10 -> 20)"
    )
    assert state.parts.names() == []
    state.parts.write("y", *finished_block(2, {}))
    state, note = open_ray_state(state, changed, resume=False)
    assert note == "starting fresh (--no-resume): the unfinished Ray run's blocks are discarded"
    assert state.parts.names() == []
    state.remove()
    assert not (tmp_path / "out" / ".batchrunner" / "iris.state").exists()


def test_an_output_in_a_bucket_has_its_parts_beside_it(tmp_path: Path, s3: Any) -> None:
    output = where("bucket", tmp_path, s3).store.locate("s3://work/out/iris.parquet")
    assert isinstance(output, ObjectPath)
    paths = StatePaths.for_output(output, "iris", str(tmp_path / "state"))
    state, _ = open_ray_state(RayState.of(paths, output, "iris"), IDENTITY, resume=True)
    assert state.manifest == tmp_path / "state" / "iris.state" / "ray" / "manifest.json"
    assert str(state.parts) == "s3://work/out/.batchrunner/iris.state/ray/parts/"
    state.parts.write("x", *finished_block(2, {}))
    assert s3.keys("work") == ["work/out/.batchrunner/iris.state/ray/parts/x.parquet"]
    state, note = open_ray_state(state, {**IDENTITY, "batch_size": 20}, resume=True)
    assert note is not None and note.startswith("starting fresh")
    assert s3.keys("work") == []  # a changed job's parts could answer for other rows
    state.parts.write("y", *finished_block(2, {}))
    state.remove()
    assert s3.keys("work") == []
    assert not (tmp_path / "state" / "iris.state").exists()


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
