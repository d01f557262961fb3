"""Incremental runs: nights on a growing input send only what is new or changed, through the
real command on real files; and the item hashes and the filter, on their own."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from aiohttp import web

from batchrunner import keyindex
from batchrunner.checkpoint import StatePaths
from batchrunner.errors import InputError
from batchrunner.incremental import SeenItems, legacy_item_hashes, open_seen
from batchrunner.items import Batch
from batchrunner.keyhash import batch_hashes
from batchrunner.keyindex import read_index
from batchrunner.keyspill import PARTITIONS
from batchrunner.sink import RESERVED
from batchrunner.sources import open_tabular
from tests.conftest import REPO, read_output, write_csv, write_job
from tests.servers import Call, ThreadedServer, answer, gateway_error

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
SCHEMA = pa.schema([("id", pa.string()), *((name, pa.float64()) for name in FEATURES)])
SEEN = Path("out/.batchrunner/nightly.keys")
PINNED_HASH = 3841489329788077413


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
    assert summary["rows"] == {"total": 30, "ok": 29, "error": 1, "skipped": 0, "resumed": 0}
    by_key = {row["_key"]: row for row in read_output("out/night1.parquet")}
    assert list(by_key) == [row["id"] for row in rows]
    assert by_key["f007"]["_error_kind"] == "model_error"
    assert (
        "remembered 29 items in out/.batchrunner/nightly.keys: 29 finished ok in this "
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
    assert summary["rows"] == {"total": 7, "ok": 7, "error": 0, "skipped": 28, "resumed": 0}
    assert summary["requests"] == 1  # the 7 rows to send go in one full batch of 10

    # Night three: nothing new. Exit 0, an empty output with the schema, and it says so.
    third, summary = night(invoke, job, 3)
    assert third.exit_code == 0, third.stderr
    table = pq.read_table("out/night3.parquet")
    assert table.num_rows == 0
    assert table.schema.names == RESERVED.names
    assert summary["rows"] == {"total": 0, "ok": 0, "error": 0, "skipped": 35, "resumed": 0}
    assert summary["requests"] == 0
    assert summary["outcome"] == "done"
    assert "INFO nothing new: 35 items already done\n" in third.stderr
    assert "\n  rows        nothing new: 35 items already done\n" in third.stdout
    assert read_index(SEEN).count == 35


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
    assert read_index(SEEN).count == 11


def counting_server() -> ThreadedServer:
    async def handle(call: Call) -> web.Response:
        return answer(call)

    return ThreadedServer(handle)


def sent_x(calls: list[Call]) -> list[list[int]]:
    """What each request carried: the rows' ``x``, request by request, in sending order."""
    return [[record["x"] for record in call.body["data"]["req_data"]] for call in calls]


def test_night_two_sends_only_new_and_changed_rows_in_full_batches(invoke) -> None:
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
    # the rows to send, in input order, packed into full batches of 4
    assert sent_x(server.calls) == [[500, 10, 11, 12]]
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
    assert statuses == {"ok": 10, "error": 12}
    assert summary["rows"]["skipped"] == 58
    assert SEEN.read_bytes() == remembered  # a run cut short remembers nothing
    return remembered


def test_a_night_cut_short_resumes_filtering_the_same_way(invoke) -> None:
    server, state = switchable_server()
    with server:
        job = resumable_job(server.url)
        abort_night_two(invoke, server, state)
        first_attempt = [x for call in server.calls[:2] for x in sent_x([call])[0]]
        assert first_attempt == [1003, 1027, 60, 61, 62, 63, 64, 65, 66, 67]
        state["refuse_from"] = 1_000_000
        server.calls.clear()
        resumed, summary = night(invoke, job, 2)
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming: 10 rows in 2 finished batches are kept" in resumed.stderr
    # only what did not finish is sent: the new rows, each once
    assert sent_x(server.calls) == [[68, 69, 70, 71, 72], [73, 74, 75, 76, 77], [78, 79]]
    rows = read_output("out/night2.parquet")
    assert [row["_key"] for row in rows] == ["k0003", "k0027"] + [
        f"k{i:04d}" for i in range(60, 80)
    ]
    assert all(row["_status"] == "ok" for row in rows)
    assert summary["rows"] == {"total": 22, "ok": 22, "error": 0, "skipped": 58, "resumed": 10}
    assert read_index(SEEN).count == 80


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
    assert len(server.calls) == 5  # the 2 changed rows and the 20 new ones, in batches of 5
    assert summary["rows"] == {"total": 22, "ok": 22, "error": 0, "skipped": 58, "resumed": 0}


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
    assert summary["rows"] == {"total": 80, "ok": 80, "error": 0, "skipped": 0, "resumed": 0}
    assert SEEN.read_bytes() == remembered  # turned off: neither read nor written


def test_removing_the_remembered_items_sends_everything_again(invoke) -> None:
    write_night(iris_like(20))
    job = nightly_job()
    assert night(invoke, job, 1)[0].exit_code == 0
    SEEN.unlink()  # as the README says: rm out/.batchrunner/<name>.keys
    result, summary = night(invoke, job, 2)
    assert result.exit_code == 0, result.stderr
    assert summary["rows"] == {"total": 20, "ok": 20, "error": 0, "skipped": 0, "resumed": 0}
    assert read_index(SEEN).count == 20


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
    assert summary["rows"] == {"total": 1, "ok": 1, "error": 0, "skipped": 10, "resumed": 0}
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
        "error: cannot read the items earlier runs finished from out/.batchrunner/nightly.keys ("
    )
    assert result.stderr.endswith(
        "); remove it to send every item again and remember them anew, or run with "
        "--set input.incremental=false to send every item without it\n"
    )
    assert not Path("out/nightly.parquet").exists()


def test_the_state_folder_holds_the_memory_beside_the_run_state() -> None:
    paths = StatePaths.beside(Path("out/n-2026-11-27.parquet"), "n")
    assert paths.keys == Path("out/.batchrunner/n.keys")
    assert paths.seen == Path("out/.batchrunner/n.seen.parquet")  # an earlier version's


# --- item hashes and the filter, on their own ------------------------------------------------


def rows_batch(records: list[dict[str, Any]], keys: list[str], seq: int = 0) -> Batch:
    return Batch(seq, keys, rows=pa.RecordBatch.from_pylist(records))


def one_hash(record: dict[str, Any], key: str = "k") -> int:
    return int(batch_hashes(rows_batch([record], [key]))[1][0])


def test_an_item_hash_follows_the_key_and_what_is_sent() -> None:
    base = one_hash({"a": 1.5, "b": "x"})
    assert one_hash({"a": 1.5, "b": "x"}) == base
    assert one_hash({"b": "x", "a": 1.5}) == base  # the columns' order does not matter
    assert one_hash({"a": 1.5, "b": "x"}, key="other") != base
    assert one_hash({"a": 1.6, "b": "x"}) != base
    assert one_hash({"a": 1.5, "b": None}) != base
    assert one_hash({"a": 1.5, "c": "x"}) != base  # sent under another name
    assert one_hash({"a": 1.5, "b": "x", "c": 0}) != base  # one field more
    assert one_hash({"a": 1.5, "b": "x" * 70}) != one_hash({"a": 1.5, "b": "x" * 71})
    assert one_hash({"a": 1.5, "b": "xy"}) != one_hash({"a": 1.5, "b": "yx"})
    assert one_hash({"a": 1.5, "b": "x\0"}) != base  # a zero byte is not padding
    # as in the JSON sent: the number 1 and the number 1.0 differ, and so does the text "1"
    assert len({one_hash({"a": 1}), one_hash({"a": 1.0}), one_hash({"a": "1"})}) == 3


def test_hashes_are_the_same_in_every_batch_and_process() -> None:
    # The index is read by later processes: a hash must never depend on the batch it came
    # in, nor on the process (unlike Python's hash() of text).
    records = [{"a": float(i), "b": f"t{i}" * i} for i in range(6)]
    keys = [str(i) for i in range(6)]
    whole = list(batch_hashes(rows_batch(records, keys))[1])
    halves = list(batch_hashes(rows_batch(records[:3], keys[:3]))[1]) + list(
        batch_hashes(rows_batch(records[3:], keys[3:]))[1]
    )
    assert whole == halves
    sliced = rows_batch(records, keys).rows.slice(2, 3)  # Arrow slices hash as copies do
    assert list(batch_hashes(Batch(0, keys[2:5], rows=sliced))[1]) == whole[2:5]
    # Pinned: another number re-sends every remembered item once after an upgrade. Change
    # the hashing only on purpose, and say so in the release notes.
    assert one_hash({"a": 1.5, "b": "x"}) == PINNED_HASH


def test_a_file_item_follows_its_size_and_modification_time(tmp_path: Path) -> None:
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"\xff\xd8 one")

    def file_hash() -> int:
        return int(batch_hashes(Batch(0, ["cat.jpg"], path=image))[1][0])

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


def write_output(path: Path, rows: list[tuple[str, str]]) -> Path:
    """An output as the sink writes it, as far as ``remember`` reads it: keys, statuses."""
    keys, statuses = zip(*rows, strict=True) if rows else ((), ())
    pq.write_table(
        pa.table({"_key": pa.array(keys, pa.string()), "_status": pa.array(statuses, pa.string())}),
        path,
    )
    return path


def checked(seen: SeenItems, batches: list[Batch]) -> SeenItems:
    seen.check(lambda: iter(batches))
    return seen


def sent_keys(seen: SeenItems, batches: list[Batch], size: int = 100) -> list[list[str]]:
    return [list(batch.keys) for batch in seen.filter(iter(batches), size)]


def test_the_filter_keeps_input_order_packs_full_batches_and_counts_once(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(10)]
    records = [{"x": float(i)} for i in range(10)]
    batches = [
        rows_batch(records[i : i + 3], keys[i : i + 3], seq)
        for seq, i in enumerate(range(0, 10, 3))
    ]
    path = tmp_path / "j.keys"
    seen = checked(open_seen(path, url="u"), batches)
    assert sent_keys(seen, batches, 3) == [keys[0:3], keys[3:6], keys[6:9], keys[9:]]
    seen.remember(
        write_output(tmp_path / "1.parquet", [(k, "ok") for k in keys]), run_id="r1", url="u"
    )

    # night two: k1, k4, k5 and k8 changed, scattered; k10 and k11 are new
    for i in (1, 4, 5, 8):
        records[i] = {"x": 100.0 + i}
    keys += ["k10", "k11"]
    records += [{"x": 10.0}, {"x": 11.0}]
    batches = [
        rows_batch(records[i : i + 3], keys[i : i + 3], seq)
        for seq, i in enumerate(range(0, 12, 3))
    ]
    seen = checked(open_seen(path, url="u"), batches)
    kept = list(seen.filter(iter(batches), 3))
    assert [(b.seq, list(b.keys)) for b in kept] == [
        (0, ["k1", "k4", "k5"]),
        (1, ["k8", "k10", "k11"]),
    ]
    assert [r["x"] for r in kept[0].rows.to_pylist()] == [101.0, 104.0, 105.0]
    assert seen.rows_skipped == 6
    # after an abort the runner reads from the start again: the same batches, counted once
    assert [list(b.keys) for b in seen.filter(iter(batches), 3)] == [
        ["k1", "k4", "k5"],
        ["k8", "k10", "k11"],
    ]
    assert seen.rows_skipped == 6


def index_items(path: Path) -> dict[int, int]:
    index = read_index(path)
    pairs: dict[int, int] = {}
    for number in range(PARTITIONS):
        keys, items = index.partition(number)
        pairs.update(zip(keys.tolist(), items.tolist(), strict=True))
    return pairs


def test_remember_replaces_forgets_and_keeps_keys(tmp_path: Path) -> None:
    path = tmp_path / ".batchrunner" / "j.keys"
    night1 = rows_batch([{"x": 1.0}, {"x": 2.0}, {"x": 3.0}], ["a", "b", "c"])
    seen = checked(open_seen(path, url="u"), [night1])
    assert sent_keys(seen, [night1]) == [["a", "b", "c"]]
    seen.remember(
        write_output(tmp_path / "1.parquet", [("a", "ok"), ("b", "ok"), ("c", "error")]),
        run_id="r1",
        url="u",
    )
    keys, items = batch_hashes(night1)
    assert index_items(path) == {keys[0]: items[0], keys[1]: items[1]}  # c failed

    # night two: b changed and fails this time, c is sent again and succeeds, d is new; e
    # (remembered below) is not in the input and keeps what it had
    night2 = rows_batch([{"x": 1.0}, {"x": 20.0}, {"x": 3.0}, {"x": 4.0}], ["a", "b", "c", "d"])
    seen = checked(open_seen(path, url="u"), [night2])
    assert seen.version == "r1"
    assert sent_keys(seen, [night2]) == [["b", "c", "d"]]
    output = write_output(tmp_path / "2.parquet", [("b", "error"), ("c", "ok"), ("d", "ok")])
    seen.remember(output, run_id="r2", url="u")
    keys, items = batch_hashes(night2)
    assert index_items(path) == {keys[0]: items[0], keys[2]: items[2], keys[3]: items[3]}
    assert open_seen(path, url="u").version == "r2"
    assert [p.name for p in path.parent.iterdir()] == ["j.keys"]  # nothing left aside

    night3 = rows_batch([{"x": 4.0}], ["d"])  # only d: a and c keep what they had
    seen = checked(open_seen(path, url="u"), [night3])
    assert sent_keys(seen, [night3]) == []
    seen.remember(write_output(tmp_path / "3.parquet", []), run_id="r3", url="u")
    assert len(index_items(path)) == 3


def test_remember_leaves_the_index_alone_when_nothing_was_sent(tmp_path: Path) -> None:
    path = tmp_path / "j.keys"
    batch = rows_batch([{"x": 1.0}], ["a"])
    seen = checked(open_seen(path, url="u"), [batch])
    seen.remember(write_output(tmp_path / "1.parquet", [("a", "ok")]), run_id="r1", url="u")
    written = path.stat().st_mtime_ns, path.read_bytes()
    seen = checked(open_seen(path, url="u"), [batch])
    assert sent_keys(seen, [batch]) == []
    seen.remember(write_output(tmp_path / "2.parquet", []), run_id="r2", url="u")
    assert (path.stat().st_mtime_ns, path.read_bytes()) == written


def test_a_crash_while_the_index_is_written_leaves_the_last_one(tmp_path: Path) -> None:
    path = tmp_path / "j.keys"
    night1 = rows_batch([{"x": 1.0}, {"x": 2.0}], ["a", "b"])
    seen = checked(open_seen(path, url="u"), [night1])
    seen.remember(
        write_output(tmp_path / "1.parquet", [("a", "ok"), ("b", "ok")]), run_id="r1", url="u"
    )
    before = path.read_bytes()

    def crash() -> Iterator[tuple[Any, Any]]:
        yield from islice(keyindex.merged(*merge_arguments), 3)  # some partitions written
        raise OSError("No space left on device")

    night2 = rows_batch([{"x": 1.5}, {"x": 2.0}, {"x": 3.0}], ["a", "b", "c"])
    seen = checked(open_seen(path, url="u"), [night2])
    merge_arguments = (seen._spill, read_index(path), keyindex.RowBits(3))
    with pytest.raises(OSError, match="No space left"):
        keyindex.write_index(path, crash(), {"run_id": "r2"})
    assert path.read_bytes() == before  # last night's index, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.parquet", "j.keys", "j.keys.work"]
    again = checked(open_seen(path, url="u"), [night2])
    assert again.version == "r1"
    assert sent_keys(again, [night2]) == [["a", "c"]]


def test_a_killed_index_write_leaves_the_last_one(tmp_path: Path) -> None:
    # A real kill -9 in the middle of writing the index (the process stops at once).
    path = tmp_path / "j.keys"
    night1 = rows_batch([{"x": float(i)} for i in range(50)], [f"k{i}" for i in range(50)])
    seen = checked(open_seen(path, url="u"), [night1])
    seen.remember(
        write_output(tmp_path / "1.parquet", [(f"k{i}", "ok") for i in range(50)]),
        run_id="r1",
        url="u",
    )
    before = path.read_bytes()
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from batchrunner import keyindex, keyspill\n"
        "import numpy as np\n"
        "def parts():\n"
        "    for number in range(keyspill.PARTITIONS):\n"
        "        if number == 100:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        yield np.zeros(0, np.uint64), np.zeros(0, np.uint64)\n"
        "keyindex.write_index(Path(sys.argv[1]), parts(), {'run_id': 'r2'})\n"
    )
    process = subprocess.run([sys.executable, "-c", script, str(path)], check=False)
    assert process.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert read_index(path).metadata["run_id"] == "r1"


def test_an_index_of_the_earlier_version_is_converted_once(tmp_path: Path) -> None:
    legacy = tmp_path / "j.seen.parquet"
    path = tmp_path / "j.keys"
    records = [{"x": 1.0}, {"x": 2.0}, {"x": 3.0}]
    night = rows_batch(records, ["a", "b", "c"])
    old = legacy_item_hashes(night)
    metadata = {b"batchrunner.seen": orjson.dumps({"run_id": "r0", "url": "u"})}
    schema = pa.schema([("key", pa.string()), ("item", pa.int64())]).with_metadata(metadata)
    # a and b were done; c was remembered with another content
    pq.write_table(
        pa.table({"key": ["a", "b", "c"], "item": [old[0], old[1], 7]}, schema=schema), legacy
    )

    seen = open_seen(path, url="u", legacy=legacy)
    assert not legacy.exists() and path.exists()
    assert (seen.version, len(seen)) == ("r0", 3)
    checked(seen, [night])
    assert sent_keys(seen, [night]) == [["c"]]  # a and b are known, by the old hash
    seen.remember(write_output(tmp_path / "1.parquet", [("c", "ok")]), run_id="r1", url="u")
    # written with today's hash: the next night finds every row done
    keys, items = batch_hashes(night)
    assert index_items(path) == dict(zip(keys.tolist(), items.tolist(), strict=True))
    assert read_index(path).scheme == keyindex.SCHEME
    assert sent_keys(checked(open_seen(path, url="u"), [night]), [night]) == []


def test_duplicate_keys_are_refused_before_anything_is_sent(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(10)] + ["k3", "k7"]
    batch = rows_batch([{"x": float(i)} for i in range(12)], keys)
    seen = open_seen(tmp_path / "j.keys", url="u")
    with pytest.raises(InputError) as refused:
        seen.check(lambda: iter([batch]))
    assert str(refused.value) == (
        "the input's keys are not unique: 2 keys more than once (2 rows repeat one): 'k3' at "
        "rows 4 and 11; 'k7' at rows 8 and 12. With input.incremental each key is remembered "
        "with its row: make input.id_column unique, or leave it out to key rows by their "
        "number"
    )


# --- speed (printed, not asserted) -------------------------------------------------------------


def test_filter_speed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 200_000
    table = pa.table(
        {"id": pc.cast(pa.array(range(n)), pa.string())}
        | {name: pc.random(n, initializer=i) for i, name in enumerate(FEATURES)}
    )
    pq.write_table(table, tmp_path / "big.parquet")
    source = open_tabular(tmp_path / "big.parquet", id_column="id")
    path = tmp_path / "j.keys"
    timings = {}
    for case in ("nothing remembered", "everything remembered"):
        seen = open_seen(path, url="u")
        started = time.perf_counter()
        seen.check(lambda: source.iter_batches(1000))
        kept = sum(len(batch) for batch in seen.filter(source.iter_batches(1000), 1000))
        timings[case] = time.perf_counter() - started
        assert (kept, seen.rows_skipped) == ((n, 0) if not len(seen) else (0, n))
        if not len(seen):
            output = write_output(tmp_path / "out.parquet", [(str(i), "ok") for i in range(n)])
            seen.remember(output, run_id="r", url="u")
    with capsys.disabled():
        print(
            f"\n[incremental] check and filter {n:,} rows x 4 float columns + text keys, "
            "batches of 1000: "
            + ", ".join(f"{case} {n / s:,.0f} rows/s" for case, s in timings.items())
        )


def test_open_seen_reads_what_a_run_wrote(invoke) -> None:
    write_night(iris_like(5))
    assert night(invoke, nightly_job(), 1)[0].exit_code == 0
    seen = open_seen(SEEN, url="embedded:iris")
    assert len(seen) == 5
    summary = orjson.loads(Path("out/night1.parquet.summary.json").read_bytes())
    assert seen.version == summary["run_id"]


def test_a_value_json_cannot_hold_still_gets_a_hash() -> None:
    # An interval cannot be sent as JSON (its request fails); the filter must not stop the run.
    def span_hash(months: int) -> int:
        span = pa.array([pa.MonthDayNano([months, 2, 3])], pa.month_day_nano_interval())
        batch = Batch(0, ["k"], rows=pa.record_batch([span], names=["span"]))
        return int(batch_hashes(batch)[1][0])

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
