"""Incremental runs: nights on a growing input send only what is new or changed, through the
real command on real files; and the item hashes and the filter, on their own."""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrunner.checkpoint import StatePaths
from batchrunner.incremental import SeenItems, item_hashes, open_seen
from batchrunner.items import Batch
from batchrunner.report import RunStats
from batchrunner.sink import RESERVED
from batchrunner.sources import open_tabular
from tests.conftest import REPO, read_output, write_csv, write_job
from tests.servers import Call, ThreadedServer, answer, gateway_error

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
SCHEMA = pa.schema([("id", pa.string()), *((name, pa.float64()) for name in FEATURES)])
SEEN = Path("out/.batchrunner/nightly.seen.parquet")


def iris_like(count: int) -> list[dict[str, Any]]:
    """``count`` rows of real iris features (so that the model scores them), ids f000..."""
    with (REPO / "samples" / "iris.csv").open() as handle:
        flowers = list(csv.DictReader(handle))
    return [
        {"id": f"f{i:03d}", **{name: float(flowers[i % 150][name]) for name in FEATURES}}
        for i in range(count)
    ]


def write_night(rows: list[dict[str, Any]]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, SCHEMA), "data.parquet")


def nightly_job(url: str = "embedded:iris", *, size: int = 10, extra: str = "") -> Path:
    return write_job(
        Path("nightly.toml"),
        f'name = "nightly"\nmax_error_rate = 0.5\n[input]\npath = "data.parquet"\n'
        f'id_column = "id"\nincremental = true\n[service]\nurl = "{url}"\n'
        f"[batch]\nsize = {size}\nconcurrency = 1\n{extra}",
    )


def night(invoke: Any, job: Path, number: int, *options: str) -> tuple[Any, dict[str, Any]]:
    """Run the job as night ``number`` (its own output file); its result and summary."""
    output = f"out/night{number}.parquet"
    result = invoke("run", str(job), "--output", output, *options)
    summary_path = Path(output + ".summary.json")
    summary = orjson.loads(summary_path.read_bytes()) if summary_path.exists() else {}
    return result, summary


def keys_of(output: str) -> list[str]:
    return [row["_key"] for row in read_output(output)]


# --- nights through the real command ---------------------------------------------------------


def test_three_nights_on_a_growing_parquet(invoke) -> None:
    rows = iris_like(30)
    rows[7]["petal_width"] = None  # the model refuses a row with a missing feature
    write_night(rows)
    job = nightly_job()

    first, summary = night(invoke, job, 1)
    assert first.exit_code == 0, first.stderr
    assert "incremental: nothing remembered yet" in first.stderr
    assert summary["rows"] == {"total": 30, "ok": 29, "error": 1, "skipped": 0}
    by_key = {row["_key"]: row for row in read_output("out/night1.parquet")}
    assert list(by_key) == [row["id"] for row in rows]
    assert by_key["f007"]["_error_kind"] == "model_error"
    assert (
        "remembered 29 items in out/.batchrunner/nightly.seen.parquet: 29 finished ok in this "
        "run; 1 error rows are sent again next time"
    ) in first.stderr

    # Night two: the failed row is fixed upstream, one row changes, five arrive.
    rows[7]["petal_width"] = 0.2
    rows[12]["petal_length"] = 6.1
    rows += iris_like(35)[30:]
    write_night(rows)
    second, summary = night(invoke, job, 2)
    assert second.exit_code == 0, second.stderr
    assert "incremental: 29 items remembered" in second.stderr
    sent = read_output("out/night2.parquet")
    assert [row["_key"] for row in sent] == ["f007", "f012", "f030", "f031", "f032", "f033", "f034"]
    assert all(row["_status"] == "ok" for row in sent)
    assert sent[1]["petal_length"] == 6.1  # the service saw the changed value
    assert summary["rows"] == {"total": 7, "ok": 7, "error": 0, "skipped": 28}
    assert summary["requests"] == 3  # batches 0 (f007), 1 (f012) and 3 (the new rows)

    # Night three: nothing new. Exit 0, an empty output with the schema, and it says so.
    third, summary = night(invoke, job, 3)
    assert third.exit_code == 0, third.stderr
    table = pq.read_table("out/night3.parquet")
    assert table.num_rows == 0
    assert table.schema.names == RESERVED.names
    assert summary["rows"] == {"total": 0, "ok": 0, "error": 0, "skipped": 35}
    assert summary["requests"] == 0
    assert summary["outcome"] == "done"
    assert "INFO nothing new: 35 items already done\n" in third.stderr
    assert "\n  rows        nothing new: 35 items already done\n" in third.stdout
    assert pq.read_metadata(SEEN).num_rows == 35


def png(color: tuple[int, int, int]) -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def test_three_nights_on_an_image_folder(invoke) -> None:
    red, blue = png((220, 20, 30)), png((20, 40, 210))
    folder = Path("drop")
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(red)
    job = write_job(
        Path("photos.toml"),
        'name = "photos"\n[input]\npath = "drop"\nincremental = true\n'
        '[service]\nurl = "embedded:colors"\n',
    )

    first, summary = night(invoke, job, 1)
    assert first.exit_code == 0, first.stderr
    assert keys_of("out/night1.parquet") == ["a/1.png", "a/2.png", "b/3.png"]
    assert summary["requests"] == 3

    # Night two: one file arrives, one is replaced by another picture (a new size and time).
    (folder / "b" / "4.png").write_bytes(red)
    time.sleep(0.01)  # a modification time the file system can tell apart
    (folder / "a" / "2.png").write_bytes(blue + b"\0")
    second, summary = night(invoke, job, 2)
    assert second.exit_code == 0, second.stderr
    sent = read_output("out/night2.parquet")
    assert [row["_key"] for row in sent] == ["a/2.png", "b/4.png"]
    assert [row["predicted_label"] for row in sent] == ["blue", "red"]
    assert summary["requests"] == 2
    assert summary["rows"]["skipped"] == 2

    # Night three: nothing new: exit 0, an empty output, nothing sent.
    third, summary = night(invoke, job, 3)
    assert third.exit_code == 0, third.stderr
    assert pq.read_table("out/night3.parquet").num_rows == 0
    assert summary["requests"] == 0
    assert summary["rows"]["skipped"] == 4


def test_a_row_that_keeps_failing_is_sent_every_night(invoke) -> None:
    rows = iris_like(12)
    rows[4]["sepal_length"] = None
    write_night(rows)
    job = nightly_job(size=5)
    for number in (1, 2, 3):
        result, summary = night(invoke, job, number, "--set", "max_error_rate=1.0")
        assert result.exit_code == 0, result.stderr
        assert summary["rows"]["error"] == 1
    assert keys_of("out/night2.parquet") == keys_of("out/night3.parquet") == ["f004"]
    assert pq.read_metadata(SEEN).num_rows == 11


def counting_server() -> ThreadedServer:
    async def handle(call: Call) -> web.Response:
        return answer(call)

    return ThreadedServer(handle)


def sent_x(calls: list[Call]) -> list[list[int]]:
    """What each request carried: the rows' ``x``, request by request, in sending order."""
    return [[record["x"] for record in call.body["data"]["req_data"]] for call in calls]


def test_night_two_sends_only_new_and_changed_rows_in_their_batches(invoke) -> None:
    table = [(f"k{i:02d}", i) for i in range(10)]
    write_csv(Path("data.csv"), ["id", "x"], table)
    with counting_server() as server:
        job = write_job(
            Path("rows.toml"),
            f'name = "rows"\n[input]\npath = "data.csv"\nid_column = "id"\nincremental = true\n'
            f'[service]\nurl = "{server.url}"\n[batch]\nsize = 4\nconcurrency = 1\n',
        )
        assert invoke("run", str(job), "--output", "out/1.parquet").exit_code == 0
        assert sent_x(server.calls) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        server.calls.clear()

        table[5] = ("k05", 500)  # changed
        table += [(f"k{i:02d}", i) for i in range(10, 13)]  # new
        write_csv(Path("data.csv"), ["id", "x"], table)
        result = invoke("run", str(job), "--output", "out/2.parquet")
    assert result.exit_code == 0, result.stderr
    # batches keep their place in the input ([4..7], [8..11], [12]); only their new rows go
    assert sent_x(server.calls) == [[500], [10, 11], [12]]
    assert keys_of("out/2.parquet") == ["k05", "k10", "k11", "k12"]


def switchable_server() -> tuple[ThreadedServer, dict[str, int]]:
    """Answers until ``state["refuse_from"]`` requests have come, then refuses the token."""
    state = {"refuse_from": 1_000_000}

    async def handle(call: Call) -> web.Response:
        if call.number >= state["refuse_from"]:
            return gateway_error(401, "APIG.0301", "token expires")
        return answer(call)

    return ThreadedServer(handle), state


def grown(table: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Night two's input: rows 3 and 27 changed, 20 rows more."""
    table = list(table)
    table[3] = ("k0003", 1003)
    table[27] = ("k0027", 1027)
    return table + [(f"k{i:04d}", i) for i in range(60, 80)]


def resumable_job(url: str) -> Path:
    write_csv(Path("data.csv"), ["id", "x"], [(f"k{i:04d}", i) for i in range(60)])
    return write_job(
        Path("nightly.toml"),
        f'name = "nightly"\n[input]\npath = "data.csv"\nid_column = "id"\nincremental = true\n'
        f'[service]\nurl = "{url}"\n[batch]\nsize = 5\nconcurrency = 1\n',
    )


def abort_night_two(invoke: Any, server: ThreadedServer, state: dict[str, int]) -> bytes:
    """Night one in full; night two cut short by a refused token after two requests.

    Returns the remembered items' file as night one left it.
    """
    job = Path("nightly.toml")
    first, _ = night(invoke, job, 1)
    assert first.exit_code == 0, first.stderr
    remembered = SEEN.read_bytes()
    write_csv(Path("data.csv"), ["id", "x"], grown([(f"k{i:04d}", i) for i in range(60)]))
    server.calls.clear()
    state["refuse_from"] = 2
    aborted, summary = night(invoke, job, 2)
    assert aborted.exit_code == 3, aborted.stderr
    # the output covers this night's rows only: the done ones are not even not_sent rows
    statuses = Counter(row["_status"] for row in read_output("out/night2.parquet"))
    assert statuses == {"ok": 2, "error": 20}
    assert summary["rows"]["skipped"] == 58
    assert SEEN.read_bytes() == remembered  # a run cut short remembers nothing
    return remembered


def test_a_night_cut_short_resumes_filtering_the_same_way(invoke) -> None:
    server, state = switchable_server()
    with server:
        job = resumable_job(server.url)
        abort_night_two(invoke, server, state)
        first_attempt = [x for call in server.calls[:2] for x in sent_x([call])[0]]
        assert first_attempt == [1003, 1027]
        state["refuse_from"] = 1_000_000
        server.calls.clear()
        resumed, summary = night(invoke, job, 2)
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming: 2 rows in 2 finished batches are kept" in resumed.stderr
    # only what did not finish is sent: the new rows, each once
    assert sent_x(server.calls) == [list(range(start, start + 5)) for start in (60, 65, 70, 75)]
    rows = read_output("out/night2.parquet")
    assert [row["_key"] for row in rows] == ["k0003", "k0027"] + [
        f"k{i:04d}" for i in range(60, 80)
    ]
    assert all(row["_status"] == "ok" for row in rows)
    assert summary["rows"] == {"total": 22, "ok": 22, "error": 0, "skipped": 58}
    assert pq.read_metadata(SEEN).num_rows == 80


def test_no_resume_starts_the_night_again_but_still_leaves_out_what_is_done(invoke) -> None:
    server, state = switchable_server()
    with server:
        job = resumable_job(server.url)
        abort_night_two(invoke, server, state)
        state["refuse_from"] = 1_000_000
        server.calls.clear()
        again, summary = night(invoke, job, 2, "--no-resume")
    assert again.exit_code == 0, again.stderr
    assert "starting fresh (--no-resume)" in again.stderr
    assert len(server.calls) == 6  # the two changed rows' batches and the four new ones
    assert summary["rows"] == {"total": 22, "ok": 22, "error": 0, "skipped": 58}


def test_turning_incremental_off_on_a_night_cut_short_starts_fresh(invoke) -> None:
    server, state = switchable_server()
    with server:
        job = resumable_job(server.url)
        remembered = abort_night_two(invoke, server, state)
        state["refuse_from"] = 1_000_000
        server.calls.clear()
        full, summary = night(invoke, job, 2, "--set", "input.incremental=false")
    assert full.exit_code == 0, full.stderr
    assert (
        "starting fresh: the job changed since its unfinished run (input.incremental, or the "
        "items it remembers, changed)"
    ) in full.stderr
    assert len(server.calls) == 16
    assert summary["rows"] == {"total": 80, "ok": 80, "error": 0, "skipped": 0}
    assert SEEN.read_bytes() == remembered  # turned off: neither read nor written


def test_removing_the_remembered_items_sends_everything_again(invoke) -> None:
    write_night(iris_like(20))
    job = nightly_job()
    assert night(invoke, job, 1)[0].exit_code == 0
    SEEN.unlink()  # as the README says: rm out/.batchrunner/<name>.seen.parquet
    result, summary = night(invoke, job, 2)
    assert result.exit_code == 0, result.stderr
    assert summary["rows"] == {"total": 20, "ok": 20, "error": 0, "skipped": 0}
    assert pq.read_metadata(SEEN).num_rows == 20


def test_a_trial_run_with_limit_remembers_nothing(invoke) -> None:
    write_night(iris_like(20))
    job = nightly_job()
    result, summary = night(invoke, job, 1, "--limit", "5")
    assert result.exit_code == 0, result.stderr
    assert "--limit: a trial run; its items are not remembered as done" in result.stderr
    assert summary["rows"]["ok"] == 5
    assert not SEEN.exists()
    assert night(invoke, job, 2)[1]["rows"]["ok"] == 20


def test_replacing_an_earlier_runs_output_is_warned_about(invoke) -> None:
    rows = iris_like(10)
    write_night(rows)
    job = nightly_job()
    assert "exists and is replaced" not in night(invoke, job, 1)[0].stderr
    write_night(rows + iris_like(11)[10:])
    result, summary = night(invoke, job, 1)
    assert result.exit_code == 0
    assert summary["rows"] == {"total": 1, "ok": 1, "error": 0, "skipped": 10}
    assert (
        "WARNING out/night1.parquet exists and is replaced; the items it holds are remembered "
        "as done and are not sent again: give each run its own file ({date} or {run_id} in "
        "output.path)\n"
    ) in result.stderr


def test_an_unreadable_memory_stops_the_run_before_anything_is_sent(invoke) -> None:
    write_night(iris_like(10))
    job = nightly_job()
    SEEN.parent.mkdir(parents=True)
    SEEN.write_bytes(b"not parquet")
    result = invoke("run", str(job))
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "error: cannot read the items earlier runs finished from "
        "out/.batchrunner/nightly.seen.parquet ("
    )
    assert result.stderr.endswith(
        "); remove it to send every item again and remember them anew, or run with "
        "--set input.incremental=false to send every item without it\n"
    )
    assert not Path("out/nightly.parquet").exists()


def test_the_state_folder_holds_the_memory_beside_the_run_state() -> None:
    paths = StatePaths.beside(Path("out/n-2026-11-27.parquet"), "n")
    assert paths.seen == Path("out/.batchrunner/n.seen.parquet")


# --- item hashes and the filter, on their own ------------------------------------------------


def rows_batch(records: list[dict[str, Any]], keys: list[str], seq: int = 0) -> Batch:
    return Batch(seq, keys, rows=pa.RecordBatch.from_pylist(records))


def one_hash(record: dict[str, Any], key: str = "k") -> int:
    return item_hashes(rows_batch([record], [key]))[0]


def test_an_item_hash_follows_the_key_and_what_is_sent() -> None:
    base = one_hash({"a": 1.5, "b": "x"})
    assert one_hash({"a": 1.5, "b": "x"}) == base
    assert one_hash({"b": "x", "a": 1.5}) == base  # the columns' order does not matter
    assert one_hash({"a": 1.5, "b": "x"}, key="other") != base
    assert one_hash({"a": 1.6, "b": "x"}) != base
    assert one_hash({"a": 1.5, "b": None}) != base
    assert one_hash({"a": 1.5, "c": "x"}) != base  # sent under another name
    assert one_hash({"a": 1.5, "b": "x", "c": 0}) != base  # one field more
    # as in the JSON sent: the number 1 and the number 1.0 differ, and so does the text "1"
    assert len({one_hash({"a": 1}), one_hash({"a": 1.0}), one_hash({"a": "1"})}) == 3


def test_hashes_are_the_same_in_every_batch_and_process() -> None:
    # The remembered file is read by later processes: a hash must never depend on the batch
    # it came in, nor on the process (unlike Python's hash() of text).
    records = [{"a": float(i), "b": f"t{i}"} for i in range(6)]
    keys = [str(i) for i in range(6)]
    whole = list(item_hashes(rows_batch(records, keys)))
    halves = list(item_hashes(rows_batch(records[:3], keys[:3]))) + list(
        item_hashes(rows_batch(records[3:], keys[3:]))
    )
    assert whole == halves
    # Pinned: another number re-sends every remembered item once after an upgrade. Change
    # the hashing only on purpose, and say so in the release notes.
    assert one_hash({"a": 1.5, "b": "x"}) == 2503909874876708274


def test_a_file_item_follows_its_size_and_modification_time(tmp_path: Path) -> None:
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"\xff\xd8 one")

    def file_hash() -> int:
        return item_hashes(Batch(0, ["cat.jpg"], path=image))[0]

    before = file_hash()
    assert file_hash() == before  # the file is not read: the same stat, the same hash
    os.utime(image, ns=(1, 1))
    touched = file_hash()
    assert touched != before
    image.write_bytes(b"\xff\xd8 two!")
    os.utime(image, ns=(1, 1))
    assert file_hash() != touched  # same time, another size
    image.unlink()
    assert file_hash() not in {before, touched}  # gone: sent, and its error row not remembered


def test_the_filter_leaves_out_what_is_done_and_counts_each_batch_once(tmp_path: Path) -> None:
    records = [{"x": float(i)} for i in range(6)]
    keys = [f"k{i}" for i in range(6)]
    done = item_hashes(rows_batch(records[:4], keys[:4]))
    seen = SeenItems(tmp_path / "seen.parquet", set(done[1:4]), "r0")  # k1, k2, k3 are done
    batches = [
        rows_batch(records[i : i + 2], keys[i : i + 2], seq) for seq, i in enumerate((0, 2, 4))
    ]
    stats = RunStats()
    kept = list(seen.filter(batches, stats))
    assert [(batch.seq, list(batch.keys)) for batch in kept] == [
        (0, ["k0"]),
        (1, []),
        (2, ["k4", "k5"]),
    ]
    assert stats.rows_skipped == 3
    # after an abort the runner reads from the start again: the same batches, counted once
    again = list(seen.filter(batches, stats))
    assert [list(batch.keys) for batch in again] == [["k0"], [], ["k4", "k5"]]
    assert stats.rows_skipped == 3


def write_output(path: Path, rows: list[tuple[str, str]]) -> Path:
    """An output as the sink writes it, as far as ``remember`` reads it: keys, statuses."""
    keys, statuses = zip(*rows, strict=True) if rows else ((), ())
    pq.write_table(pa.table({"_key": pa.array(keys, pa.string()), "_status": statuses}), path)
    return path


def remembered(path: Path) -> dict[str, int]:
    return {row["key"]: row["item"] for row in pq.read_table(path).to_pylist()}


def test_remember_replaces_forgets_and_keeps_keys(tmp_path: Path) -> None:
    path = tmp_path / ".batchrunner" / "j.seen.parquet"
    first = [{"x": 1.0}, {"x": 2.0}, {"x": 3.0}]
    night1 = rows_batch(first, ["a", "b", "c"])
    seen = open_seen(path, url="u")
    assert list(seen.filter([night1], RunStats())) == [night1]
    seen.remember(
        write_output(tmp_path / "1.parquet", [("a", "ok"), ("b", "ok"), ("c", "error")]),
        run_id="r1",
        url="u",
    )
    hashes = item_hashes(night1)
    assert remembered(path) == {"a": hashes[0], "b": hashes[1]}  # c failed: not remembered

    # night two: b changed and fails this time, c is sent again and succeeds, d is new
    night2 = rows_batch([{"x": 1.0}, {"x": 20.0}, {"x": 3.0}, {"x": 4.0}], ["a", "b", "c", "d"])
    seen = open_seen(path, url="u")
    assert seen.version == "r1"
    (sent,) = seen.filter([night2], RunStats())
    assert list(sent.keys) == ["b", "c", "d"]
    output = write_output(tmp_path / "2.parquet", [("b", "error"), ("c", "ok"), ("d", "ok")])
    seen.remember(output, run_id="r2", url="u")
    hashes = item_hashes(night2)
    # a kept what it had; b is forgotten (its old hash too: sent again next time); c, d new
    assert remembered(path) == {"a": hashes[0], "c": hashes[2], "d": hashes[3]}
    assert open_seen(path, url="u").version == "r2"
    assert [p.name for p in path.parent.iterdir()] == ["j.seen.parquet"]  # nothing left aside


def test_remember_leaves_the_file_alone_when_nothing_was_sent(tmp_path: Path) -> None:
    path = tmp_path / "j.seen.parquet"
    batch = rows_batch([{"x": 1.0}], ["a"])
    seen = open_seen(path, url="u")
    list(seen.filter([batch], RunStats()))
    seen.remember(write_output(tmp_path / "1.parquet", [("a", "ok")]), run_id="r1", url="u")
    written = path.stat().st_mtime_ns, path.read_bytes()
    seen = open_seen(path, url="u")
    assert [len(b) for b in seen.filter([batch], RunStats())] == [0]
    seen.remember(write_output(tmp_path / "2.parquet", []), run_id="r2", url="u")
    assert (path.stat().st_mtime_ns, path.read_bytes()) == written


# --- speed (printed, not asserted) -------------------------------------------------------------


def test_filter_speed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 200_000
    table = pa.table(
        {"id": pc.cast(pa.array(range(n)), pa.string())}
        | {name: pc.random(n, initializer=i) for i, name in enumerate(FEATURES)}
    )
    pq.write_table(table, tmp_path / "big.parquet")
    source = open_tabular(tmp_path / "big.parquet", id_column="id")
    every = set()
    for batch in source.iter_batches(1000):
        every.update(item_hashes(batch))
    timings = {}
    for case, items in (("nothing remembered", set()), ("everything remembered", every)):
        seen = SeenItems(tmp_path / "seen.parquet", items, "r")
        stats = RunStats()
        started = time.perf_counter()
        kept = sum(len(batch) for batch in seen.filter(source.iter_batches(1000), stats))
        timings[case] = time.perf_counter() - started
        assert (kept, stats.rows_skipped) == ((n, 0) if not items else (0, n))
    with capsys.disabled():
        print(
            f"\n[incremental] read and filter {n:,} rows x 4 float columns + text keys, "
            "batches of 1000: "
            + ", ".join(f"{case} {n / s:,.0f} rows/s" for case, s in timings.items())
        )


def test_open_seen_reads_what_a_run_wrote(invoke) -> None:
    write_night(iris_like(5))
    assert night(invoke, nightly_job(), 1)[0].exit_code == 0
    seen = open_seen(SEEN, url="embedded:iris")
    assert len(seen) == 5
    assert (
        seen.version == orjson.loads(pq.read_schema(SEEN).metadata[b"batchrunner.seen"])["run_id"]
    )
    assert list(islice(pq.read_table(SEEN).column("key").to_pylist(), 2)) == ["f000", "f001"]


def test_a_value_json_cannot_hold_still_gets_a_hash() -> None:
    # An interval cannot be sent as JSON (its request fails); the filter must not stop the run.
    def span_hash(months: int) -> int:
        span = pa.array([pa.MonthDayNano([months, 2, 3])], pa.month_day_nano_interval())
        return item_hashes(Batch(0, ["k"], rows=pa.record_batch([span], names=["span"])))[0]

    assert span_hash(1) == span_hash(1)
    assert span_hash(1) != span_hash(2)


def test_validate_says_the_run_is_incremental(invoke) -> None:
    write_night(iris_like(3))
    result = invoke("validate", str(nightly_job()))
    assert result.exit_code == 0, result.stderr
    assert (
        "\nincremental:  items finished by earlier runs are left out "
        "(see out/.batchrunner/nightly.seen.parquet)\n"
    ) in result.stdout
