"""A regular ModelArts answer decoded straight into Arrow columns (issue 16), an irregular one
kept as objects: both checked alike (count, shape, echo), both giving the same output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from aiohttp import web

from batchrunner.errors import RequestError
from batchrunner.items import Batch, Outcome
from batchrunner.protocols import EncodedRequest
from batchrunner.protocols.modelarts import TextCodec, check_echo, rows_to_records
from batchrunner.sink import outcome_table
from tests.conftest import read_output, write_csv
from tests.servers import Call, ThreadedServer

UUID = "10eb0091-887f-4839-9929-cbc884f1e20e"
SENT = EncodedRequest(b"{}", "application/json", request_uuid=UUID)
ROWS = pa.RecordBatch.from_pydict({"id": [7, 8, 9], "x": [5.1, 0.0, -2.5], "t": ["a", "b", "é"]})
BATCH = Batch(seq=0, keys=["k7", "k8", "k9"], rows=ROWS)


def body(items: Any, uuid: str = UUID) -> bytes:
    return orjson.dumps({"meta": {"uuid": uuid}, "data": {"resp_data": items}})


def echoed(**extra: Any) -> list[dict[str, Any]]:
    return [{**row, "label": f"L{row['id']}", **extra} for row in ROWS.to_pylist()]


def decode(items: Any, batch: Batch = BATCH) -> Any:
    return TextCodec().decode(body(items), batch, SENT)


def test_a_regular_answer_comes_back_as_columns() -> None:
    results = decode(echoed(p=0.25))
    assert isinstance(results, pa.RecordBatch)
    assert results.schema.names == ["id", "x", "t", "label", "p"]
    types = [str(type_) for type_ in results.schema.types]
    assert types == ["int64", "double", "string", "string", "double"]
    assert results.to_pylist() == echoed(p=0.25)


def test_an_echo_in_float32_is_equal_enough_as_columns() -> None:
    items = [{**item, "x": item["x"] * (1 + 1e-8)} for item in echoed()]
    assert isinstance(decode(items), pa.RecordBatch)


@pytest.mark.parametrize(
    "items",
    [
        [{"id": 7, "x": 5.1}, {"id": 8}, {"id": 9, "x": -2.5}],  # a field missing
        [{"id": 7}, {"id": 8}, {"id": 9, "extra": 1}],  # a field more
        [{"id": 7, "s": None}, {"id": 8, "s": "b"}, {"id": 9, "s": "c"}],  # a null
        [{"id": 7, "v": [1, 2]}, {"id": 8, "v": [3]}, {"id": 9, "v": []}],  # nested
        [{"id": 7, "v": "a"}, {"id": 8, "v": 1}, {"id": 9, "v": 2}],  # types disagree
        [{"id": 7, "v": 2**63}, {"id": 8, "v": 1}, {"id": 9, "v": 2}],  # beyond int64
        [{}, {}, {}],  # nothing
    ],
)
def test_an_irregular_answer_stays_objects(items: list[dict[str, Any]]) -> None:
    assert decode(items) == items


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (echoed()[:2], "data.resp_data has 2 items for 3 rows sent"),
        ({"id": 7}, "data.resp_data is a dict, not a list"),
        ([*echoed()[:2], 5], "data.resp_data[2] is an int, not an object"),
        (
            [echoed()[0], echoed()[2], echoed()[1]],
            "data.resp_data[1].id is 9, but the row sent there (key k8) has 8",
        ),
        (
            [{**item, "x": item["x"] + 1e-3} for item in echoed()],
            "data.resp_data[0].x is 5.101, but the row sent there (key k7) has 5.1",
        ),
        (
            [{**item, "t": item["t"].upper()} for item in echoed()],
            "data.resp_data[0].t is 'A', but the row sent there (key k7) has 'a'",
        ),
    ],
)
def test_answers_that_do_not_fit_fail_as_before(items: Any, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode(items)
    assert message in caught.value.message
    assert caught.value.kind == "bad_response"
    if isinstance(items, list) and len(items) == 3 and all(type(i) is dict for i in items):
        # the same message as the objects' check gives, for the same answer
        with pytest.raises(RequestError) as objects:
            check_echo(items, rows_to_records(ROWS), BATCH.keys)
        assert objects.value.message == caught.value.message


def test_an_echo_of_a_bool_as_a_number_is_refused_as_columns() -> None:
    rows = pa.RecordBatch.from_pydict({"flag": [True, False]})
    batch = Batch(seq=0, keys=["a", "b"], rows=rows)
    with pytest.raises(RequestError, match=r"resp_data\[0\].flag is 1, but .* has True"):
        decode([{"flag": 1}, {"flag": 0}], batch)
    assert isinstance(decode([{"flag": True}, {"flag": False}], batch), pa.RecordBatch)


def test_columns_and_objects_make_the_same_output_table() -> None:
    second = Batch(seq=1, keys=["k10", "k11", "k12"], rows=ROWS)
    items = [{**item, "p": float(item["id"])} for item in echoed()]
    failed = Outcome(Batch(seq=2, keys=["k13"], rows=ROWS.slice(0, 1)), None, error="boom")

    def table(results: list[Any], **options: Any) -> pa.RecordBatch:
        outcomes = [
            Outcome(BATCH, results[0], http_status=200, attempts=1, latency_ms=1.0),
            failed,
            Outcome(second, results[1], http_status=200, attempts=2, latency_ms=3.0),
        ]
        return outcome_table(outcomes, hints={}, **options)

    columns = [decode(items), decode(items, second)]
    assert all(isinstance(part, pa.RecordBatch) for part in columns)
    for options in ({}, {"result_fields": ["label", "absent", "p"]}):
        assert table(columns, **options).equals(table([items, items], **options))


def test_a_run_mixing_regular_and_irregular_answers_keeps_every_value(invoke) -> None:
    async def handle(call: Call) -> web.Response:
        records = call.body["data"]["req_data"]
        results = [{**record, "score": record["v"] * 2} for record in records]
        if records[0]["v"] == 2:
            del results[1]["score"]  # irregular: a field missing
        if records[0]["v"] == 4:
            results[0]["score"] = "high"  # irregular: types disagree
        meta = {"uuid": call.body["meta"]["uuid"]}
        return web.json_response({"meta": meta, "data": {"resp_data": results}})

    data = write_csv(Path("d.csv"), ["v"], [(i,) for i in range(6)])
    with ThreadedServer(handle) as server:
        result = invoke(
            "run", "--input", str(data), "--url", server.url, "--output", "o.parquet",
            "--batch-size", "2", "--concurrency", "1",
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = read_output("o.parquet")
    assert [row["v"] for row in rows] == [0, 1, 2, 3, 4, 5]
    # a number here, a string there: JSON text, as every answer's objects always gave
    assert [row["score"] for row in rows] == ["0", "2", "4", None, '"high"', "10"]


def test_an_echo_of_a_dictionary_column_is_compared_too() -> None:
    labels = pa.array(["a", "b"]).dictionary_encode()
    batch = Batch(seq=0, keys=["x", "y"], rows=pa.RecordBatch.from_arrays([labels], ["t"]))
    assert isinstance(decode([{"t": "a"}, {"t": "b"}], batch), pa.RecordBatch)
    with pytest.raises(RequestError, match=r"resp_data\[0\].t is 'b', but .* has 'a'"):
        decode([{"t": "b"}, {"t": "a"}], batch)
