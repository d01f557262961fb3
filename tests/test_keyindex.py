"""The key index at scale: what earlier versions wrote is still read, the check streams the
input in Arrow form, the duplicate check and the filter through the same partitions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrunner import keyspill
from batchrunner.errors import InputError
from batchrunner.incremental import check_reader, open_seen
from batchrunner.sources import open_tabular

DATA = Path(__file__).parent / "data"
# Written by the index code as it was before the check read Arrow columns (issue 19): the
# nightly jobs of that version must keep their memory of earlier nights.
EARLIER_INDEX = DATA / "keys-written-before-issue-19.keys"
EARLIER_ROWS = 600


def earlier_table(rows: int = EARLIER_ROWS) -> pa.Table:
    """The table ``EARLIER_INDEX`` remembers, every row ok: keys of two widths, text short,
    long and missing, numbers with NaN and nulls, flags."""
    ids = list(range(rows))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "text": [None if i % 7 == 0 else ("word" * (i % 40)) + str(i) for i in ids],
            "x": [float("nan") if i % 11 == 0 else i / 3 for i in ids],
            "n": pa.array([None if i % 5 == 0 else i * 1_000_003 for i in ids], pa.int64()),
            "flag": [i % 2 == 0 for i in ids],
        }
    )


def write_index_with_this_code(folder: Path, index: Path) -> None:
    """Run one night over ``earlier_table`` and remember every row (how ``EARLIER_INDEX``
    was made)."""
    pq.write_table(earlier_table(), folder / "table.parquet")
    source = open_tabular(folder / "table.parquet", id_column="id")
    seen = open_seen(index, url="u")
    seen.check(lambda: source.iter_batches(64))
    sent = [key for batch in seen.filter(source.iter_batches(64), 64) for key in batch.keys]
    output = folder / "out.parquet"
    pq.write_table(
        pa.table({"_key": pa.array(sent, pa.string()), "_status": pa.repeat("ok", len(sent))}),
        output,
    )
    seen.remember(output, run_id="earlier", url="u")


def sent_by_night(folder: Path, table: pa.Table, index: Path, size: int = 64) -> list[list[str]]:
    pq.write_table(table, folder / "night.parquet")
    source = open_tabular(folder / "night.parquet", id_column="id")
    seen = open_seen(index, url="u")
    seen.check(lambda: source.iter_batches(size))
    return [list(batch.keys) for batch in seen.filter(source.iter_batches(size), size)]


def test_an_index_written_before_issue_19_is_still_read(tmp_path: Path) -> None:
    index = tmp_path / "j.keys"
    index.write_bytes(EARLIER_INDEX.read_bytes())
    assert open_seen(index, url="u").version == "earlier"
    assert sent_by_night(tmp_path, earlier_table(), index) == []  # every row remembered
    # two rows changed, scattered, and one new: exactly those are sent
    table = earlier_table(EARLIER_ROWS + 1)
    x = table.column("x").to_pylist()
    x[3], x[500] = -1.0, -2.0
    table = table.set_column(table.schema.get_field_index("x"), "x", pa.array(x))
    assert sent_by_night(tmp_path, table, index) == [["3", "500", str(EARLIER_ROWS)]]


def test_keys_alike_in_their_high_bits_are_still_sorted() -> None:
    # The sort packs each key's high bits with its place: keys that differ only below must
    # still come out in order (the order is checked, and made again if wrong).
    rng = np.random.default_rng(7)
    top = np.uint64(5) << np.uint64(64 - keyspill.PARTITION_BITS)
    spread = rng.integers(0, 1 << 55, 5000, dtype=np.uint64) | top
    alike = top | np.array([9, 8, 9, 7, 8], np.uint64)  # equal but in their lowest bits
    for keys in (spread, alike, np.concatenate([spread, alike, spread[:3]])):
        order = keyspill._key_order(keys)
        assert order.tolist() == np.argsort(keys, kind="stable").tolist()


def test_the_check_never_imports_pandas(tmp_path: Path) -> None:
    # Arrow's to_numpy imports pandas when it is installed: 30 MB of a 200 MB night.
    pq.write_table(earlier_table(), tmp_path / "table.parquet")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from batchrunner.incremental import check_reader, open_seen\n"
        "from batchrunner.sources import open_tabular\n"
        "source = open_tabular(sys.argv[1], id_column='id')\n"
        "seen = open_seen(Path(sys.argv[2]), url='u')\n"
        "seen.check(check_reader(source, 64, None))\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "table.parquet"), str(tmp_path / "j.keys")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "False"


def test_duplicate_keys_are_found_across_files_and_row_groups(tmp_path: Path) -> None:
    # The check reads Arrow columns: a key twice in one row group, across row groups and
    # across files is found, named with its rows, and nothing is sent.
    folder = tmp_path / "input"
    folder.mkdir()
    ids = list(range(1000))
    ids[10] = 400  # row group 0 and row group 4 of the first file
    pq.write_table(pa.table({"id": ids, "x": [i / 7 for i in ids]}), folder / "a.parquet", 100)
    second = [1000 + i for i in range(500)]
    second[7] = 999  # the first file's last key, again in the second file
    second[8] = second[9]  # twice side by side
    pq.write_table(pa.table({"id": second, "x": [1.0] * 500}), folder / "b.parquet", 100)
    source = open_tabular(folder, id_column="id")
    seen = open_seen(tmp_path / "j.keys", url="u")
    with pytest.raises(InputError) as refused:
        seen.check(check_reader(source, 64, None))
    assert str(refused.value).startswith(
        "the input's keys are not unique: 3 keys more than once (3 rows repeat one): '400' at "
        "rows 11 and 401; '999' at rows 1,000 and 1,008; '1009' at rows 1,009 and 1,010. "
    )
    assert not (tmp_path / "j.keys").exists() and not (tmp_path / "j.keys.work").exists()


def test_the_check_reads_ahead_in_a_thread_and_raises_what_it_raised() -> None:
    from batchrunner.incremental import ahead

    closed = []

    def pieces(fail_at: int | None):
        try:
            for number in range(10):
                if number == fail_at:
                    raise InputError(f"piece {number} is bad")
                yield number
        finally:
            closed.append(True)

    assert list(ahead(pieces(None))) == list(range(10))
    with pytest.raises(InputError, match="piece 4 is bad"):
        list(ahead(pieces(4)))
    read = ahead(pieces(None))
    assert next(read) == 0
    read.close()  # leaving early stops the thread, which closes what it reads
    assert closed == [True, True, True]


def test_counting_the_rows_done_holds_no_byte_per_row() -> None:
    # Unpacking the bits to count them held a byte per input row: 100 MB at 100M rows, the
    # peak of a nothing-new night of that size.
    import tracemalloc

    from batchrunner.keyindex import RowBits

    rows = 80_000_000
    bits = RowBits(rows)
    done = np.array([0, 7, 8, 9, 65_000, rows - 1], np.uint64)
    bits.set(done)
    tracemalloc.start()
    try:
        assert bits.total() == len(done)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < rows // 8  # less than the bits themselves
