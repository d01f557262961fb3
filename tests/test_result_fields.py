"""output.result_fields (issue 16): keep only some result fields, like SageMaker's
OutputFilter; the echo check still guards the rows' order."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow.parquet as pq

from tests.conftest import read_output, write_csv, write_job

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_job(extra: str = "") -> Path:
    data = write_csv(
        Path("d.csv"), ["id", *FEATURES], [(f"r{i}", 5.1, 3.5, 1.4 + i / 10, 0.2) for i in range(7)]
    )
    return write_job(
        Path("job.toml"),
        f'name = "fields"\n[input]\npath = "{data}"\nid_column = "id"\n'
        f'[service]\nurl = "embedded:iris"\n[batch]\nsize = 3\n[output]\n{extra}',
    )


def test_only_the_result_fields_asked_for_are_kept(invoke) -> None:
    result = invoke("run", str(iris_job('result_fields = ["predictresult", "absent"]\n')))
    assert result.exit_code == 0, result.stderr
    names = pq.read_schema("out/fields.parquet").names
    results = [name for name in names if not name.startswith("_")]
    assert results == ["predictresult"]  # the echoed features are left out; "absent" too
    rows = read_output("out/fields.parquet")
    assert len(rows) == 7 and all(row["_status"] == "ok" for row in rows)
    assert all(isinstance(row["predictresult"], str) for row in rows)


def test_every_result_field_is_kept_by_default_and_the_setting_is_in_the_fingerprint(
    invoke,
) -> None:
    assert invoke("run", str(iris_job())).exit_code == 0
    names = pq.read_schema("out/fields.parquet").names
    assert set(FEATURES) | {"predictresult"} <= set(names)
    before = orjson.loads(Path("out/fields.parquet.summary.json").read_bytes())["fingerprint"]
    assert invoke("run", str(iris_job('result_fields = ["predictresult"]\n'))).exit_code == 0
    after = orjson.loads(Path("out/fields.parquet.summary.json").read_bytes())["fingerprint"]
    assert before != after  # a resume never mixes outputs of two field choices


def test_an_empty_list_is_refused(invoke) -> None:
    result = invoke("run", str(iris_job("result_fields = []\n")))
    assert result.exit_code == 2
    assert "result_fields" in result.stderr
