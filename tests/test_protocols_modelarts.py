from __future__ import annotations

import datetime
import decimal
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from batchrunner.errors import RequestError
from batchrunner.items import Batch
from batchrunner.protocols.modelarts import (
    FileCodec,
    classify_failure,
    decode_file,
    decode_text,
    encode_text,
)

UUID = "10eb0091-887f-4839-9929-cbc884f1e20e"


def rows() -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"sepal_length": [3.0, 5.1], "label": ["a", None]})


def answer(items: object, uuid: str = UUID) -> bytes:
    return orjson.dumps({"meta": {"uuid": uuid}, "data": {"resp_data": items}})


def test_encode_text_matches_the_documented_body() -> None:
    body = orjson.loads(encode_text(rows(), UUID))
    assert body == {
        "meta": {"uuid": UUID},
        "data": {
            "req_data": [
                {"sepal_length": 3.0, "label": "a"},
                {"sepal_length": 5.1, "label": None},
            ]
        },
    }


def test_encode_text_makes_leftover_types_json_safe() -> None:
    batch = pa.RecordBatch.from_pydict(
        {
            "d": pa.array([decimal.Decimal("1.25")], pa.decimal128(5, 2)),
            "b": pa.array([b"\x00\x01"], pa.binary()),
            "t": pa.array([datetime.datetime(2026, 1, 2, 3, 4, 5)], pa.timestamp("s")),
        }
    )
    record = orjson.loads(encode_text(batch, UUID))["data"]["req_data"][0]
    assert record == {"d": 1.25, "b": "AAE=", "t": "2026-01-02T03:04:05"}


def test_decode_text_returns_items_in_order() -> None:
    items = [{"predictresult": "a"}, {"predictresult": "b"}]
    assert decode_text(answer(items), 2, UUID) == items


def test_decode_accepts_blank_uuid() -> None:
    assert decode_text(answer([{}], uuid=""), 1, UUID) == [{}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (answer([{"a": 1}]), "data.resp_data has 1 items for 2 rows sent"),
        (answer([{"a": 1}, {"a": 2}, {"a": 3}]), "data.resp_data has 3 items for 2 rows sent"),
        (orjson.dumps({"meta": {}, "data": {}}), "the answer has no data.resp_data"),
        (orjson.dumps({"result": 1}), "no data.resp_data (keys: result)"),
        (orjson.dumps([1, 2]), "not an object but a list"),
        (answer({"a": 1}), "data.resp_data is a dict, not a list"),
        (answer([{"a": 1}, 5]), "data.resp_data[1] is an int, not an object"),
        (answer([{}, {}], uuid="other"), "does not match the request's"),
    ],
)
def test_decode_refuses_answers_that_do_not_fit_the_rows(body: bytes, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode_text(body, 2, UUID)
    assert message in caught.value.message
    assert caught.value.kind == "bad_response"
    assert not caught.value.retryable


def test_decode_non_json_is_retryable() -> None:
    with pytest.raises(RequestError, match="not JSON: Bad Gateway") as caught:
        decode_text(b"<html><body><h1>Bad Gateway</h1></body></html>", 1, UUID)
    assert caught.value.kind == "not_json"
    assert caught.value.retryable


def gateway(code: str, message: str) -> bytes:
    return orjson.dumps({"error_code": code, "error_msg": message, "request_id": "r"})


@pytest.mark.parametrize(
    ("status", "body", "kind", "retryable", "fatal"),
    [
        (401, gateway("APIG.0301", "token expires"), "auth", False, True),
        (401, gateway("APIG.0307", "The token must be updated"), "auth", False, True),
        (403, b"", "auth", False, True),
        (
            429,
            gateway("APIG.0308", "The throttling threshold has been reached"),
            "http_429",
            True,
            False,
        ),
        (502, gateway("APIG.0201", "Backend unavailable"), "http_502", True, False),
        (503, b"", "http_503", True, False),
        (504, gateway("APIG.0203", "Backend timeout"), "http_504", True, False),
        (400, gateway("ModelArts.4302", "circuit breaker open"), "http_400", False, False),
        (418, gateway("ModelArts.4206", "throttled"), "http_418", True, False),
        (500, gateway("ModelArts.4503", "backend did not respond"), "http_500", True, False),
        (400, gateway("MR.0105", "bad input"), "model_error", False, False),
        (500, gateway("MR.0001", "model crashed"), "model_error", False, False),
        (400, b'{"bad": "request"}', "http_400", False, False),
        (404, gateway("APIG.0101", "The API does not exist"), "http_404", False, False),
        (413, gateway("APIG.0201", "Request entity too large"), "http_413", False, False),
    ],
)
def test_classify_failure(
    status: int, body: bytes, kind: str, retryable: bool, fatal: bool
) -> None:
    error = classify_failure(status, body)
    assert (error.kind, error.retryable, error.fatal, error.http_status) == (
        kind,
        retryable,
        fatal,
        status,
    )


def test_classify_failure_message_carries_code_and_text() -> None:
    error = classify_failure(429, gateway("APIG.0308", "throttled"), retry_after=2.0)
    assert error.message == "HTTP 429 APIG.0308: throttled"
    assert error.retry_after == 2.0


def test_classify_html_page_keeps_its_words() -> None:
    error = classify_failure(502, b"<html><title>502 Bad Gateway</title><p>nginx</p></html>")
    assert error.message == "HTTP 502: non-JSON body: 502 Bad Gateway nginx"
    assert error.retryable


# --- file input ------------------------------------------------------------------------------


def file_batch(path: Path) -> Batch:
    return Batch(seq=0, keys=(path.name,), path=path)


def test_file_codec_sends_the_file_as_a_form_without_uuid(tmp_path: Path) -> None:
    photo = tmp_path / "rose.jpg"
    photo.write_bytes(b"\xff\xd8JPEG")
    request = FileCodec("images").encode(file_batch(photo), UUID)
    boundary = "batchrunner-10eb0091887f48399929cbc884f1e20e"
    assert request.content_type == f"multipart/form-data; boundary={boundary}"
    assert request.request_uuid is None  # file input has no meta.uuid to carry it
    assert b"uuid" not in request.body
    assert request.body.endswith(b"\xff\xd8JPEG\r\n--" + boundary.encode() + b"--\r\n")
    assert b'name="images"; filename="rose.jpg"' in request.body
    assert request.preview is not None
    assert "<6 bytes of rose.jpg>" in request.preview
    assert b"JPEG" not in request.preview.encode()


def test_file_codec_uses_the_form_field_of_the_job(tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    photo.write_bytes(b"x")
    request = FileCodec("file").encode(file_batch(photo), UUID)
    assert b'Content-Disposition: form-data; name="file"; filename="a.png"' in request.body


def test_file_codec_keeps_bodies_within_the_limit(tmp_path: Path) -> None:
    photo = tmp_path / "a.png"
    envelope = len(
        FileCodec(max_request_bytes=10_000).encode(file_batch(_write(photo, 0)), UUID).body
    )
    limit = envelope + 100
    codec = FileCodec(max_request_bytes=limit)
    assert len(codec.encode(file_batch(_write(photo, 100)), UUID).body) == limit
    with pytest.raises(RequestError) as caught:
        codec.encode(file_batch(_write(photo, 101)), UUID)
    assert caught.value.kind == "file_too_large"
    assert "the file is 101 bytes; at most 100 fit in one request" in caught.value.message


def _write(path: Path, size: int) -> Path:
    path.write_bytes(b"x" * size)
    return path


def test_file_codec_refuses_a_batch_of_rows() -> None:
    with pytest.raises(ValueError, match="file input needs a file"):
        FileCodec().encode(Batch(seq=0, keys=["0"], rows=rows()), UUID)


def test_decode_file_keeps_the_whole_object_as_it_came() -> None:
    answer = {"predicted_label": "rose", "scores": [["rose", "0.990"], ["begonia", "0.010"]]}
    assert decode_file(orjson.dumps(answer)) == answer  # string scores stay strings
    boxes = {"detection_classes": ["cat"], "detection_boxes": [[1, 2, 3, 4]]}
    assert decode_file(orjson.dumps(boxes)) == boxes


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        (b"[1, 2]", "bad_response", "the answer is a list, not a JSON object"),
        (b'"rose"', "bad_response", "the answer is a str, not a JSON object"),
        (b"<html>busy</html>", "not_json", "HTTP 200 with a body that is not JSON: busy"),
    ],
)
def test_decode_file_refuses_what_is_not_one_object(body: bytes, kind: str, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode_file(body)
    assert caught.value.kind == kind
    assert caught.value.message.startswith(message)
