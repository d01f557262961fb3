"""The protocols json, kserve-v1, oip-v2 and mlflow: codecs on their own, and whole runs
against the embedded service speaking each of them."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from batchrunner.errors import RequestError, SettingError
from batchrunner.items import Batch
from batchrunner.protocols import EncodedRequest
from batchrunner.protocols.answers import classify_failure
from batchrunner.protocols.jsonbody import JsonCodec, check_template
from batchrunner.protocols.kserve import KServeCodec, model_url
from batchrunner.protocols.mlflow import MlflowCodec, ping_url
from batchrunner.protocols.oip import OipCodec, metadata_url
from tests.conftest import iris_csv, read_output, write_job

ROWS = pa.RecordBatch.from_pydict({"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]})
BATCH = Batch(0, ["k1", "k2", "k3"], ROWS)
SENT = EncodedRequest(b"{}", "application/json", request_uuid="u")  # what decode is told


def test_oip_tensor_layout_encodes_one_row_major_tensor_with_the_batch_id() -> None:
    body = orjson.loads(OipCodec().encode(BATCH, "u-1").body)
    assert body == {
        "id": "u-1",
        "inputs": [
            {"name": "input-0", "datatype": "FP64", "shape": [3, 2], "data": [1, 4, 2, 5, 3, 6]}
        ],
    }


def test_oip_columns_layout_sends_one_tensor_per_column_with_the_pd_content_type() -> None:
    rows = pa.RecordBatch.from_pydict({"n": [1, 2], "t": ["x", "y"]})
    body = orjson.loads(OipCodec(outputs=("p",)).encode(Batch(0, ["1", "2"], rows), "u").body)
    assert body["parameters"] == {"content_type": "pd"}
    assert body["inputs"][0] == {"name": "n", "datatype": "INT64", "shape": [2], "data": [1, 2]}
    assert body["inputs"][1]["datatype"] == "BYTES"
    assert body["inputs"][1]["data"] == ["x", "y"]
    assert body["outputs"] == [{"name": "p"}]


def test_oip_a_missing_value_is_row_specific_so_splitting_finds_its_row() -> None:
    rows = pa.RecordBatch.from_pydict({"a": [1.0, None]})
    with pytest.raises(RequestError) as caught:
        OipCodec().encode(Batch(0, ["1", "2"], rows), "u")
    assert caught.value.row_specific and not caught.value.retryable


def _oip_answer(**fields: object) -> bytes:
    answer = {
        "id": "u",
        "outputs": [{"name": "p", "datatype": "FP64", "shape": [3], "data": [1, 2, 3]}],
    }
    answer.update(fields)
    return orjson.dumps(answer)


def test_oip_outputs_become_columns_scalar_and_list() -> None:
    outputs = [
        {"name": "label", "datatype": "BYTES", "shape": [3, 1], "data": ["x", "y", "z"]},
        {
            "name": "probs",
            "datatype": "FP64",
            "shape": [3, 2],
            "data": [0.1, 0.9, 0.2, 0.8, 0.3, 0.7],
        },
    ]
    results = OipCodec().decode(_oip_answer(outputs=outputs), BATCH, SENT)
    assert results == [
        {"label": "x", "probs": [0.1, 0.9]},
        {"label": "y", "probs": [0.2, 0.8]},
        {"label": "z", "probs": [0.3, 0.7]},
    ]


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (_oip_answer(id="other"), "does not match"),
        (
            _oip_answer(outputs=[{"name": "p", "datatype": "FP64", "shape": [2], "data": [1, 2]}]),
            "shape [2] for 3 rows",
        ),
        (
            _oip_answer(outputs=[{"name": "p", "datatype": "FP64", "shape": [3], "data": [1, 2]}]),
            "2 values where its shape [3] says 3",
        ),
        (_oip_answer(outputs=[]), "no outputs"),
        (b'{"predictions": []}', "no outputs list"),
    ],
)
def test_oip_answers_that_do_not_fit_fail_the_batch(answer: bytes, says: str) -> None:
    with pytest.raises(RequestError) as caught:
        OipCodec().decode(answer, BATCH, SENT)
    assert says in caught.value.message
    assert caught.value.kind == "bad_response"


def test_oip_a_requested_output_missing_fails_the_batch() -> None:
    with pytest.raises(RequestError, match="lacks the requested output"):
        OipCodec(outputs=("q",)).decode(_oip_answer(), BATCH, SENT)


def test_kserve_values_or_records_and_predictions_checked_for_length() -> None:
    assert orjson.loads(KServeCodec().encode(BATCH, "u").body) == {
        "instances": [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]
    }
    records = orjson.loads(KServeCodec(instance_format="records").encode(BATCH, "u").body)
    assert records["instances"][0] == {"a": 1.0, "b": 4.0}
    assert KServeCodec().decode(b'{"predictions": [1, 2, 3]}', BATCH, SENT) == [
        {"prediction": 1},
        {"prediction": 2},
        {"prediction": 3},
    ]
    with pytest.raises(RequestError, match="2 items for 3 rows") as caught:
        KServeCodec().decode(b'{"predictions": [1, 2]}', BATCH, SENT)
    assert caught.value.row_specific


def test_mlflow_dataframe_split_and_predictions_objects_give_fields() -> None:
    body = orjson.loads(MlflowCodec().encode(BATCH, "u").body)
    assert body == {
        "dataframe_split": {"columns": ["a", "b"], "data": [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]}
    }
    answer = b'{"predictions": [{"x": 1}, {"x": 2}, {"x": 3}]}'
    assert MlflowCodec().decode(answer, BATCH, SENT) == [{"x": 1}, {"x": 2}, {"x": 3}]
    with pytest.raises(RequestError, match="no predictions"):
        MlflowCodec().decode(b"[1, 2, 3]", BATCH, SENT)


def test_json_template_fills_values_text_rows_and_values() -> None:
    one = Batch(0, ["1"], pa.RecordBatch.from_pydict({"text": ["hi"], "n": [3]}))
    codec = JsonCodec({"input": "{text}", "note": "n={n}: {text}", "k": [1, "{n}"]}, batched=False)
    assert orjson.loads(codec.encode(one, "u").body) == {
        "input": "hi",
        "note": "n=3: hi",
        "k": [1, 3],
    }
    rows = JsonCodec({"rows": "{rows}", "values": "{values}"}, batched=True)
    assert orjson.loads(rows.encode(BATCH, "u").body) == {
        "rows": [{"a": 1.0, "b": 4.0}, {"a": 2.0, "b": 5.0}, {"a": 3.0, "b": 6.0}],
        "values": [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]],
    }


def test_json_response_path_scalar_column_named_after_it_and_length_checked() -> None:
    codec = JsonCodec("{rows}", "out.scores", batched=True)
    answer = b'{"out": {"scores": [0.1, 0.2, 0.3]}}'
    assert codec.decode(answer, BATCH, SENT) == [{"scores": 0.1}, {"scores": 0.2}, {"scores": 0.3}]
    with pytest.raises(RequestError, match="2 items for 3 rows"):
        codec.decode(b'{"out": {"scores": [0.1, 0.2]}}', BATCH, SENT)
    with pytest.raises(RequestError, match=r"no out\.scores"):
        codec.decode(b'{"out": {}}', BATCH, SENT)
    whole = JsonCodec({"x": "{a}"}, batched=False)
    one = Batch(0, ["1"], ROWS.slice(0, 1))
    assert whole.decode(b"7", one, SENT) == [{"result": 7}]


def test_json_template_naming_an_unknown_column_is_a_setting_error() -> None:
    with pytest.raises(SettingError, match=r"\{txt\} is not a column.*text"):
        check_template({"input": "{txt}"}, ["text"])


@pytest.mark.parametrize(
    ("status", "body", "retryable", "row_specific", "fatal"),
    [
        (401, b'{"error": "unauthorized"}', False, False, True),
        (403, b"forbidden", False, False, True),
        (503, b'{"error": "Model iris is not ready"}', True, False, False),
        (500, b"Traceback ...\nValueError: could not convert", True, True, False),
        (429, b"", True, False, False),
        (400, b'{"error": "could not convert string to float"}', False, True, False),
        (422, b'{"detail": [{"msg": "field required"}]}', False, True, False),
        (400, b'{"error_code": "BAD_REQUEST", "message": "bad"}', False, True, False),
        (404, b'{"error": "Model x not found"}', False, False, False),
    ],
)
def test_server_error_bodies_are_classified(
    status: int, body: bytes, retryable: bool, row_specific: bool, fatal: bool
) -> None:
    error = classify_failure(status, body)
    assert (error.retryable, error.row_specific, error.fatal) == (retryable, row_specific, fatal)


def test_error_detail_is_taken_from_each_servers_body() -> None:
    assert (
        "BAD_REQUEST: bad"
        in classify_failure(400, b'{"error_code": "BAD_REQUEST", "message": "bad"}').message
    )
    assert (
        "field required"
        in classify_failure(422, b'{"detail": [{"msg": "field required"}]}').message
    )


def test_probe_urls_are_derived_from_the_inference_url() -> None:
    assert metadata_url("http://h:1/v2/models/iris/infer") == "http://h:1/v2/models/iris"
    assert model_url("http://h:1/v1/models/iris:predict") == "http://h:1/v1/models/iris"
    assert ping_url("http://h:1/invocations") == "http://h:1/ping"


# --- whole runs against the embedded service -------------------------------------------

IRIS_COLUMNS = '["sepal_length", "sepal_width", "petal_length", "petal_width"]'


def _job(tmp_path: Path, protocol: str, extra: str = "", input_path: str = "iris.csv") -> Path:
    return write_job(
        tmp_path / "job.toml",
        f"""
name = "p"
[input]
path = "{input_path}"
id_column = "id"
columns = {IRIS_COLUMNS}
[service]
url = "embedded:iris"
protocol = "{protocol}"
{extra}
[batch]
size = 40
[output]
path = "out.parquet"
""",
    )


@pytest.mark.parametrize("protocol", ["kserve-v1", "oip-v2", "mlflow", "modelarts"])
def test_every_protocol_gives_the_same_predictions_as_modelarts(
    invoke, tmp_path: Path, protocol: str
) -> None:
    iris_csv(copies=3)
    result = invoke("run", str(_job(tmp_path, protocol)))
    assert result.exit_code == 0, result.stderr
    rows = read_output("out.parquet")
    assert len(rows) == 450 and {row["_status"] for row in rows} == {"ok"}
    labels = [row.get("prediction") or row.get("predictresult") for row in rows]
    assert labels[:3] == ["setosa"] * 3 and labels[-1] == "virginica"


def test_oip_columns_layout_and_requested_outputs(invoke, tmp_path: Path) -> None:
    iris_csv()
    extra = '[service.oip]\nlayout = "columns"\noutputs = ["predictresult"]'
    result = invoke("run", str(_job(tmp_path, "oip-v2", extra)))
    assert result.exit_code == 0, result.stderr
    assert read_output("out.parquet")[0]["predictresult"] == "setosa"


@pytest.mark.parametrize("protocol", ["kserve-v1", "oip-v2", "mlflow"])
def test_a_row_the_model_refuses_is_isolated_by_splitting(
    invoke, tmp_path: Path, protocol: str
) -> None:
    lines = [
        {"id": i, "sepal_length": 5.0, "sepal_width": 3.4, "petal_length": 1.5, "petal_width": 0.2}
        for i in range(100)
    ]
    del lines[37]["petal_width"]  # a missing value: the model refuses that row
    Path("rows.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    result = invoke("run", str(_job(tmp_path, protocol, input_path="rows.jsonl")))
    assert result.exit_code == 1, result.stderr  # one error row, over max_error_rate 0
    rows = read_output("out.parquet")
    failed = [row["_key"] for row in rows if row["_status"] == "error"]
    assert failed == ["37"]
    assert sum(row["_status"] == "ok" for row in rows) == 99


@pytest.mark.parametrize("protocol", ["kserve-v1", "oip-v2", "mlflow"])
def test_dry_run_shows_the_first_request_in_the_protocol(
    invoke, tmp_path: Path, protocol: str
) -> None:
    iris_csv()
    result = invoke("run", str(_job(tmp_path, protocol)), "--dry-run")
    assert result.exit_code == 0, result.stderr
    marker = {"kserve-v1": '"instances"', "oip-v2": '"inputs"', "mlflow": '"dataframe_split"'}
    assert marker[protocol] in result.stdout
    assert "nothing was sent" in result.stdout


def test_validate_asks_the_oip_server_and_names_both_sides_of_a_mismatch(
    invoke, tmp_path: Path
) -> None:
    iris_csv()
    job = _job(tmp_path, "oip-v2")
    good = invoke("validate", str(job))
    assert good.exit_code == 0, good.stderr
    assert "/v2/models/iris" in good.stdout
    bad = invoke("validate", str(job), "--set", 'input.columns=["sepal_length", "sepal_width"]')
    assert bad.exit_code == 2
    assert "expects 4 features" in bad.stderr and "sends 2 columns" in bad.stderr


def test_validate_asks_kserve_and_mlflow_whether_ready(invoke, tmp_path: Path) -> None:
    iris_csv()
    for protocol, path in (("kserve-v1", "/v1/models/iris"), ("mlflow", "/ping")):
        result = invoke("validate", str(_job(tmp_path, protocol)))
        assert result.exit_code == 0, result.stderr
        assert path in result.stdout


def test_json_body_with_rows_placeholder_batches_rows(invoke, tmp_path: Path) -> None:
    iris_csv()
    extra = '[service.json]\nrequest = { input = "{rows}" }\nresponse = "result"'
    job = _job(tmp_path, "json", extra)
    result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    rows = read_output("out.parquet")
    assert len(rows) == 150 and rows[0]["predictresult"] == "setosa"


def test_json_body_of_one_row_refuses_a_batch_size(invoke, tmp_path: Path) -> None:
    iris_csv()
    job = _job(tmp_path, "json", '[service.json]\nrequest = { input = "{sepal_length}" }')
    result = invoke("validate", str(job))
    assert result.exit_code == 2
    assert "batch.size must be 1 or left out" in result.stderr


def test_a_protocol_section_for_another_protocol_is_refused(invoke, tmp_path: Path) -> None:
    iris_csv()
    result = invoke("validate", str(_job(tmp_path, "mlflow", '[service.oip]\nlayout = "columns"')))
    assert result.exit_code == 2
    assert "[service.oip] applies to protocol = 'oip-v2'" in result.stderr
