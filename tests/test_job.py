from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from batchrunner.errors import SettingError
from batchrunner.job import (
    IMAGES,
    TABULAR,
    check_input_kind,
    fingerprint,
    identity_changes,
    job_identity,
    load_job,
    parse_assignment,
    resolve_output_path,
)

MINIMAL = """
name = "t"
[input]
path = "data.csv"
[service]
url = "https://gw.example/v1/infers/abc"
"""


def job_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, **kwargs: object) -> str:
    with pytest.raises(SettingError) as caught:
        load_job(job_file(tmp_path, text), **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


def test_minimal_job_gets_defaults(tmp_path: Path) -> None:
    job = load_job(job_file(tmp_path, MINIMAL))
    assert job.batch.size == 50
    assert job.batch.concurrency == 8
    assert job.service.timeout == 40.0
    assert job.service.verify_tls is True
    assert job.output.path == "out/{name}.parquet"
    assert job.max_error_rate == 0.0


def test_settings_are_frozen(tmp_path: Path) -> None:
    job = load_job(job_file(tmp_path, MINIMAL))
    with pytest.raises(Exception, match="frozen"):
        job.batch.size = 3  # type: ignore[misc]


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "[batch]\nsise = 10\n")
    assert "unknown setting batch.sise (did you mean 'size'?)" in message
    assert "known settings here: size, concurrency" in message


def test_unknown_key_differing_in_case_suggests_the_right_one(tmp_path: Path) -> None:
    # Too unlike for difflib; the same helper as for columns finds it.
    message = error_of(tmp_path, MINIMAL + "[batch]\nSIZE = 10\n")
    assert "unknown setting batch.SIZE (did you mean 'size'?)" in message


def test_unknown_key_in_an_optional_section_suggests_the_close_one(tmp_path: Path) -> None:
    embedded = 'name = "t"\n[input]\npath = "d.csv"\n[service]\nurl = "embedded:iris"\n'
    message = error_of(tmp_path, embedded + "[service.embedded]\nlatncy_ms = 5\n")
    assert "unknown setting service.embedded.latncy_ms (did you mean 'latency_ms'?)" in message
    assert "known settings here: latency_ms, jitter_ms" in message


def test_unknown_section_is_named(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "[bacth]\nsize = 10\n")
    assert "unknown setting bacth (did you mean 'batch'?)" in message


def test_out_of_range_value_names_setting_and_value(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "[batch]\nsize = 0\n")
    assert "batch.size: input should be greater than or equal to 1, got 0" in message


def test_wrong_type_names_setting(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + '[batch]\nconcurrency = "many"\n')
    assert 'batch.concurrency: must be a whole number from 1 to 4096, or "auto"' in message
    assert "got 'many'" in message


def test_missing_required_setting(tmp_path: Path) -> None:
    message = error_of(tmp_path, 'name = "t"\n[input]\npath = "x.csv"\n')
    assert "service: required setting is missing" in message


def test_bad_url(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL.replace("https://gw.example/v1/infers/abc", "gw/abc"))
    assert "service.url: must be an http(s) URL" in message


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "[batch\n")
    assert "job.toml: not valid TOML" in message
    assert "(at line 7, column 7)" in message


def test_missing_job_file() -> None:
    with pytest.raises(SettingError, match=r"job file not found: nowhere\.toml"):
        load_job("nowhere.toml")


def test_env_expansion(tmp_path: Path) -> None:
    text = MINIMAL.replace('"data.csv"', '"${DATA_DIR}/data.csv"')
    text = text.replace('name = "t"', 'name = "${NAME:-nightly}"')
    job = load_job(job_file(tmp_path, text), environ={"DATA_DIR": "/srv"})
    assert job.input.path == "/srv/data.csv"
    assert job.name == "nightly"


def test_missing_env_variable_names_setting(tmp_path: Path) -> None:
    text = MINIMAL.replace('"data.csv"', '"${DATA_DIR}/data.csv"')
    message = error_of(tmp_path, text, environ={})
    assert "input.path: environment variable DATA_DIR is not set" in message


def test_overrides_and_assignments(tmp_path: Path) -> None:
    job = load_job(
        job_file(tmp_path, MINIMAL),
        overrides={"batch.size": 7, "service.url": None, "input.path": "other.csv"},
        assignments=["batch.concurrency=3", "service.verify_tls=false", "output.path=o.parquet"],
    )
    assert job.batch.size == 7
    assert job.batch.concurrency == 3
    assert job.service.verify_tls is False
    assert job.input.path == "other.csv"
    assert job.output.path == "o.parquet"
    assert job.service.url.startswith("https://")  # None overrides nothing


def test_assignment_to_unknown_setting_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL, assignments=["batch.concurency=3"])
    assert "did you mean 'concurrency'" in message


@pytest.mark.parametrize("bad", ["batch.size", "=3", "no dots=1"])
def test_malformed_assignment(bad: str) -> None:
    with pytest.raises(SettingError, match=r"expected section\.key=value"):
        parse_assignment(bad)


def test_assignment_values_are_toml_or_text() -> None:
    assert parse_assignment("batch.size=100") == ("batch.size", 100)
    assert parse_assignment("input.columns=['a', 'b']") == ("input.columns", ["a", "b"])
    assert parse_assignment("output.path=out/x.parquet") == ("output.path", "out/x.parquet")


def test_job_without_file_takes_name_from_input() -> None:
    job = load_job(
        None, overrides={"input.path": "data/scores.csv", "service.url": "embedded:iris"}
    )
    assert job.name == "scores"
    assert job.service.embedded_model == "iris"


def test_output_templates(tmp_path: Path) -> None:
    text = MINIMAL + '[output]\npath = "out/{name}-{date}-{time}-{run_id}.parquet"\n'
    job = load_job(job_file(tmp_path, text))
    path = resolve_output_path(job, datetime(2026, 11, 27, 2, 0, 5), "r1")
    assert path == Path("out/t-2026-11-27-020005-r1.parquet")


def test_unknown_output_placeholder(tmp_path: Path) -> None:
    job = load_job(job_file(tmp_path, MINIMAL + '[output]\npath = "out/{day}.parquet"\n'))
    with pytest.raises(SettingError, match=r"output.path: unknown placeholder \{day\}"):
        resolve_output_path(job, datetime.now(), "r")


def test_fingerprint_follows_what_makes_a_job_the_same(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("a\n1\n")
    job = load_job(job_file(tmp_path, MINIMAL))
    same = load_job(job_file(tmp_path, MINIMAL), assignments=["batch.concurrency=99"])
    other = load_job(job_file(tmp_path, MINIMAL), assignments=["batch.size=99"])
    assert fingerprint(job_identity(job, [data])) == fingerprint(job_identity(same, [data]))
    assert fingerprint(job_identity(job, [data])) != fingerprint(job_identity(other, [data]))
    before = job_identity(job, [data])
    data.write_text("a\n1\n2\n")
    after = job_identity(job, [data])
    assert fingerprint(after) != fingerprint(before)
    assert identity_changes(before, after) == [
        "the input files changed (names, sizes or modification times)"
    ]
    assert identity_changes(before, job_identity(other, [data]))[0] == "batch_size: 50 -> 99"


def test_image_settings_are_normalized(tmp_path: Path) -> None:
    job = load_job(
        job_file(tmp_path, MINIMAL),
        assignments=['input.extensions=["JPG", ".Png", ".jpg"]', "service.file_field=file"],
    )
    assert job.input.extensions == (".jpg", ".png")
    assert job.service.file_field == "file"
    default = load_job(job_file(tmp_path, MINIMAL))
    assert (default.input.extensions, default.input.recursive, default.input.follow_links) == (
        None,
        True,
        False,
    )
    assert (default.service.file_field, default.batch.max_request_bytes) == ("images", 12582912)


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("input.extensions=[]", "input.extensions: list at least one extension"),
        ('input.extensions=["a/b"]', "input.extensions: 'a/b' is not a file extension"),
        ('input.extensions=["tar.gz"]', "input.extensions: 'tar.gz' is not a file extension"),
        ('service.file_field="a\\"b"', "service.file_field: must be a form field name without"),
        ("service.file_field=''", "service.file_field: must be a form field name without"),
        ("batch.max_request_bytes=10", "batch.max_request_bytes: input should be greater than"),
    ],
)
def test_bad_image_settings(tmp_path: Path, assignment: str, message: str) -> None:
    assert message in error_of(tmp_path, MINIMAL, assignments=[assignment])


def test_fingerprint_of_image_jobs_follows_what_is_sent(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    job = load_job(job_file(tmp_path, MINIMAL))
    images = job_identity(job, [folder], kind=IMAGES)
    assert fingerprint(images) != fingerprint(job_identity(job, [folder]))
    same = load_job(job_file(tmp_path, MINIMAL), assignments=["batch.size=1"])
    assert fingerprint(images) == fingerprint(job_identity(same, [folder], kind=IMAGES))
    for change in ("service.file_field=file", "input.follow_links=true", "input.recursive=false",
                   "batch.max_request_bytes=2048", 'input.extensions=[".png"]'):  # fmt: skip
        other = job_identity(
            load_job(job_file(tmp_path, MINIMAL), assignments=[change]), [folder], kind=IMAGES
        )
        assert fingerprint(other) != fingerprint(images)
    limit = load_job(job_file(tmp_path, MINIMAL), assignments=["batch.max_request_bytes=2048"])
    assert identity_changes(images, job_identity(limit, [folder], kind=IMAGES)) == [
        "images.max_request_bytes: 12582912 -> 2048"
    ]


def test_check_input_kind(tmp_path: Path) -> None:
    plain = load_job(job_file(tmp_path, MINIMAL))
    check_input_kind(plain, IMAGES, "x")
    check_input_kind(plain, TABULAR, "x")
    one = load_job(job_file(tmp_path, MINIMAL), assignments=["batch.size=1"])
    check_input_kind(one, IMAGES, "x")
    explicit = load_job(
        job_file(tmp_path, MINIMAL),
        assignments=["input.format=images", "input.id_column=id"],
    )
    with pytest.raises(SettingError) as caught:
        check_input_kind(explicit, IMAGES, "x")
    assert str(caught.value) == (
        "input.path 'x' is read as image input, so input.id_column cannot be used "
        "(each file is sent as it is, one file per request); remove it"
    )


def test_incremental_needs_an_output_folder_that_stays_the_same(tmp_path: Path) -> None:
    text = MINIMAL.replace("[service]", "incremental = true\n[service]")
    job = load_job(job_file(tmp_path, text + '[output]\npath = "out/{date}/scores.parquet"\n'))
    with pytest.raises(SettingError) as caught:
        resolve_output_path(job, datetime(2026, 11, 27), "r")
    assert str(caught.value) == (
        "output.path: with input.incremental the output's folder must stay the same from run "
        "to run (the remembered items live in its .batchrunner/ folder): put the placeholders "
        "in the file name, e.g. 'out/{name}-{date}.parquet', got 'out/{date}/scores.parquet'"
    )
    # in the file name it is fine; and without incremental, so is the folder
    dated = load_job(job_file(tmp_path, text + '[output]\npath = "out/s-{date}.parquet"\n'))
    assert resolve_output_path(dated, datetime(2026, 11, 27), "r") == Path(
        "out/s-2026-11-27.parquet"
    )
    plain = load_job(job_file(tmp_path, MINIMAL + '[output]\npath = "out/{date}/s.parquet"\n'))
    assert resolve_output_path(plain, datetime(2026, 11, 27), "r") == Path(
        "out/2026-11-27/s.parquet"
    )


def test_incremental_is_not_part_of_the_job_fingerprint(tmp_path: Path) -> None:
    # The remembered items are not the job: a resumable run adds them to its own identity
    # (see incremental.SeenItems.resume_identity), and a change is named in words.
    data = tmp_path / "data.csv"
    data.write_text("a\n1\n")
    job = load_job(job_file(tmp_path, MINIMAL))
    assert "incremental" not in job_identity(job, [data])
    before = {**job_identity(job, [data]), "incremental": "20260101T020000-abcdef"}
    after = {**job_identity(job, [data]), "incremental": "nothing remembered"}
    assert identity_changes(before, after) == [
        "input.incremental, or the items it remembers, changed"
    ]
    assert identity_changes(job_identity(job, [data]), after) == [
        "input.incremental, or the items it remembers, changed"
    ]


IAM = """
[service.iam]
url = "https://iam.example/v3/auth/tokens"
user = "alice"
domain = "acme"
project = "eu-west-0"
"""


def test_token_sources(tmp_path: Path) -> None:
    def source(extra: str) -> str | None:
        return load_job(job_file(tmp_path, MINIMAL + extra)).service.token_source

    assert source("") == "token_env"  # $MODELARTS_TOKEN by default
    assert source('token_file = "t"\n') == "token_file"
    assert source(IAM + 'password_env = "PW"\n') == "iam"
    assert source('[service.app]\nappcode_env = "AC"\n') is None  # the AppCode alone
    assert source('token_env = "T"\n[service.app]\nappcode_file = "ac"\n') == "token_env"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'token_env = "T"\ntoken_file = "t"\n',
            "service: choose one token source: token_env, token_file or [service.iam]; "
            "set here: token_env, token_file",
        ),
        (
            'token_file = "t"\n' + IAM + 'password_env = "PW"\n',
            "set here: token_file, iam",
        ),
        (
            IAM,
            "service.iam: set exactly one of password_env (an environment variable holding "
            "the IAM password) or password_file (a file holding it)",
        ),
        (IAM + 'password_env = "P"\npassword_file = "p"\n', "both are set: password_env"),
        (
            IAM + 'password = "hunter2"\n',
            "unknown setting service.iam.password (did you mean 'password_env'?)",
        ),
        (
            IAM.replace("https://iam.example/v3/auth/tokens", "iam.example")
            + 'password_env = "P"\n',
            "service.iam.url: must be an http(s) URL such as "
            "https://iam.<region>.<cloud-domain>/v3/auth/tokens, got 'iam.example'",
        ),
        (IAM.replace('user = "alice"\n', "") + 'password_env = "P"\n', "service.iam.user: "),
        (
            IAM + 'password_env = "P"\nrenew_before = -1\n',
            "service.iam.renew_before: input should be greater than or equal to 0",
        ),
        ("[service.app]\n", "service.app: set exactly one of appcode_env"),
    ],
)
def test_token_source_errors_name_the_setting(tmp_path: Path, extra: str, message: str) -> None:
    assert message in error_of(tmp_path, MINIMAL + extra)


@pytest.mark.parametrize("setting", ["token_env", "[service.iam] password_env", "appcode_env"])
def test_a_secret_pasted_where_a_name_belongs_is_refused_and_not_shown(
    tmp_path: Path, setting: str
) -> None:
    pasted = "MIIEhgYJKoZIhvcNAQcCoIIEdzCCBHMCAQExDTALBglghkgBZQMEAgEwggLUBgkq+="
    if setting == "token_env":
        extra = f'token_env = "{pasted}"\n'
    elif setting == "appcode_env":
        extra = f'[service.app]\nappcode_env = "{pasted}"\n'
    else:
        extra = IAM + f'password_env = "{pasted}"\n'
    message = error_of(tmp_path, MINIMAL + extra)
    assert "must be the name of an environment variable" in message
    assert "secrets never go into the job file" in message
    assert pasted not in message
