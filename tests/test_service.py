"""The embedded reference service, over real loopback HTTP: model, protocol, errors, stats."""

from __future__ import annotations

import asyncio
import csv
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from batchrunner.service import (
    MODEL_NAMES,
    GatewayError,
    IamAccount,
    IrisModel,
    ModelInputError,
    RunningService,
    ServiceOptions,
    TextModel,
    load_model,
    run_service,
    start_service,
)
from batchrunner.service.models import DATA_DIR, IRIS_FEATURES

TOKEN = "test-token-0123456789"
REPO = Path(__file__).resolve().parent.parent


def iris_rows() -> list[dict[str, str]]:
    with open(DATA_DIR / "iris.csv", newline="") as file:
        return list(csv.DictReader(file))


def iris_model() -> IrisModel:
    model = load_model("iris")
    assert isinstance(model, IrisModel)
    return model


def iris_records() -> list[dict[str, Any]]:
    return [
        {"id": int(row["id"]), **{f: float(row[f]) for f in IRIS_FEATURES}} for row in iris_rows()
    ]


def with_service(
    test: Callable[[RunningService, aiohttp.ClientSession], Awaitable[None]],
    extra_middlewares: Sequence[Middleware] = (),
    **options: Any,
) -> None:
    """Run ``test`` against a fresh service and client session, closing both after."""

    async def main() -> None:
        async with (
            await start_service(
                ServiceOptions(token=TOKEN, **options), extra_middlewares=extra_middlewares
            ) as service,
            aiohttp.ClientSession() as session,
        ):
            await test(service, session)

    asyncio.run(main())


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    token: str | None = TOKEN,
) -> tuple[int, Any]:
    """POST ``body`` (bytes as is, anything else as JSON); return (status, decoded JSON)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Auth-Token"] = token
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(url, data=data, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, orjson.loads(await response.read())


def assert_gateway_error(body: Any, code: str) -> None:
    assert set(body) == {"error_code", "error_msg", "request_id"}
    assert body["error_code"] == code
    assert len(body["request_id"]) == 32
    int(body["request_id"], 16)


# --- the data and the model, without HTTP ---------------------------------------------------


def test_iris_data_is_the_classic_150_rows() -> None:
    rows = iris_rows()
    assert len(rows) == 150
    assert [int(r["id"]) for r in rows] == list(range(1, 151))
    assert rows[0] == {
        "id": "1",
        "sepal_length": "5.1",
        "sepal_width": "3.5",
        "petal_length": "1.4",
        "petal_width": "0.2",
        "species": "setosa",
    }
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["species"]] = counts.get(row["species"], 0) + 1
    assert counts == {"setosa": 50, "versicolor": 50, "virginica": 50}


def test_sample_is_a_relative_link_to_the_data() -> None:
    sample = REPO / "samples" / "iris.csv"
    assert sample.is_symlink()
    assert os.readlink(sample) == "../batchrunner/service/data/iris.csv"
    assert sample.read_bytes() == (DATA_DIR / "iris.csv").read_bytes()


def test_model_accuracy_on_the_data_set() -> None:
    results = iris_model().predict(iris_records())
    accuracy = (
        sum(
            res["predictresult"] == row["species"]
            for res, row in zip(results, iris_rows(), strict=True)
        )
        / 150
    )
    assert accuracy >= 0.9  # Gaussian naive Bayes scores 0.96 on its training set


def test_model_echoes_the_record_and_adds_predictresult() -> None:
    record = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    [result] = iris_model().predict([{**record, "note": "x"}])
    assert result == {**record, "note": "x", "predictresult": "setosa"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2, 3, 4], "req_data[1]: a record must be a JSON object, got an array"),
        ({"sepal_length": 1, "sepal_width": 1, "petal_length": 1}, "'petal_width' is missing"),
        (
            {"sepal_length": "5.1", "sepal_width": 1, "petal_length": 1, "petal_width": 1},
            "'sepal_length' must be a number, got a string",
        ),
        (
            {"sepal_length": 1, "sepal_width": True, "petal_length": 1, "petal_width": 1},
            "'sepal_width' must be a number, got a boolean",
        ),
        (
            {"sepal_length": 1, "sepal_width": 1, "petal_length": 10**400, "petal_width": 1},
            "req_data[1]: a feature is too large",
        ),
    ],
)
def test_model_refuses_a_bad_record(record: Any, message: str) -> None:
    good = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    with pytest.raises(ModelInputError, match=re.escape(message)):
        iris_model().predict([good, record])


def test_load_model_is_cached_and_names_the_known_models() -> None:
    assert load_model("iris") is load_model("iris")
    assert MODEL_NAMES == ("iris", "linear", "sentiment", "colors", "llm")
    with pytest.raises(
        ValueError,
        match="unknown model 'tulips'; the known models are: iris, linear, sentiment, colors, llm",
    ):
        load_model("tulips")


def test_linear_model_scores_every_number() -> None:
    model = load_model("linear")
    assert isinstance(model, TextModel)
    records = [{"a": 1, "b": 2.5, "label": "x", "flag": True}, {}]
    assert model.predict(records) == [{"score": 2.75}, {"score": 1.0}]
    # numbers only: the fast path gives the same scores
    assert model.predict([{"a": 1, "b": 2.5}, {}]) == [{"score": 2.75}, {"score": 1.0}]
    assert model.predict([{"flag": True}, {"a": 1}]) == [{"score": 1.0}, {"score": 1.5}]
    assert model.predict([]) == []
    with pytest.raises(ModelInputError, match=r"req_data\[0\]: a record must be a JSON object"):
        model.predict([[1, 2]])  # type: ignore[list-item]


def test_fit_csv_names_the_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("sepal_length,sepal_width,petal_length,species\n1,2,3,setosa\n")
    with pytest.raises(ValueError, match="lacks the column"):
        IrisModel.fit_csv(path)


# --- the service over HTTP -------------------------------------------------------------------


def test_accuracy_through_http() -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        records = iris_records()
        status, body = await post(session, service.url, {"data": {"req_data": records}})
        assert status == 200
        results = body["data"]["resp_data"]
        assert len(results) == 150
        # The records come back in order, echoed, with the prediction added.
        assert [r["id"] for r in results] == list(range(1, 151))
        assert results[0]["sepal_length"] == 5.1
        correct = sum(
            res["predictresult"] == row["species"]
            for res, row in zip(results, iris_rows(), strict=True)
        )
        assert correct / 150 >= 0.9

    with_service(test)


def test_uuid_is_echoed_and_blank_when_absent() -> None:
    record = {"sepal_length": 3, "sepal_width": 1, "petal_length": 2.2, "petal_width": 4}

    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        uid = "10eb0091-887f-4839-9929-cbc884f1e20e"
        body = {"meta": {"uuid": uid}, "data": {"req_data": [record]}}
        assert (await post(session, service.url, body))[1]["meta"] == {"uuid": uid}
        no_meta = {"data": {"req_data": [record]}}
        assert (await post(session, service.url, no_meta))[1]["meta"] == {"uuid": ""}
        no_uuid = {"meta": {}, "data": {"req_data": [record]}}
        assert (await post(session, service.url, no_uuid))[1]["meta"] == {"uuid": ""}
        too_long = {"meta": {"uuid": "x" * 65}, "data": {"req_data": [record]}}
        status, error = await post(session, service.url, too_long)
        assert status == 400
        assert_gateway_error(error, "ModelArts.4101")

    with_service(test)


def test_a_path_after_the_service_id_is_served() -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        record = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
        status, body = await post(
            session, service.url + "/predictions/iris", {"data": {"req_data": [record]}}
        )
        assert status == 200
        assert body["data"]["resp_data"][0]["predictresult"] == "setosa"

    with_service(test)


@pytest.mark.parametrize(
    ("token", "reason"),
    [(None, "the X-Auth-Token header is missing"), ("wrong-token", "the token is not valid")],
)
def test_a_missing_or_wrong_token_gets_401(token: str | None, reason: str) -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        status, body = await post(session, service.url, {"data": {"req_data": []}}, token=token)
        assert status == 401
        assert_gateway_error(body, "APIG.0301")
        assert body["error_msg"] == f"Incorrect IAM authentication information: {reason}"
        assert service.token not in str(body)
        assert service.token not in repr(service)
        assert service.stats.rows_scored == 0

    with_service(test)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"data": {"req_data": [', "The request body is not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"meta": {"uuid": "a"}}', "lacks the 'data' object"),
        (b'{"data": {}}', "'data.req_data' must be a list of records"),
        (b'{"data": {"req_data": {"sepal_length": 1}}}', "'data.req_data' must be a list"),
        (b'{"data": {"req_data": []}}', "'data.req_data' is empty"),
        (b'{"meta": "x", "data": {"req_data": [{}]}}', "'meta' must be an object"),
    ],
)
def test_a_malformed_body_gets_400(body: bytes, message: str) -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        status, error = await post(session, service.url, body)
        assert status == 400
        assert_gateway_error(error, "ModelArts.4101")
        assert message in error["error_msg"]

    with_service(test)


def test_a_record_the_model_refuses_gets_mr_0105() -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        records = [
            {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
            {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4},
        ]
        status, error = await post(session, service.url, {"data": {"req_data": records}})
        assert status == 400
        assert_gateway_error(error, "MR.0105")
        assert error["error_msg"] == "req_data[1]: the field 'petal_width' is missing"
        assert service.stats.rows_scored == 0  # the whole request failed

    with_service(test)


def test_a_body_over_the_limit_gets_413() -> None:
    big = {"data": {"req_data": [{"pad": "x" * 2000}]}}

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must be enforced while reading.
        data = orjson.dumps(big)
        for start in range(0, len(data), 256):
            yield data[start : start + 256]

    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        status, error = await post(session, service.url, big)
        assert status == 413
        assert_gateway_error(error, "APIG.0201")
        assert error["error_msg"].startswith("Request entity too large")

        headers = {"X-Auth-Token": TOKEN, "Content-Type": "application/json"}
        async with session.post(service.url, data=chunks(), headers=headers) as response:
            assert response.status == 413
            assert_gateway_error(orjson.loads(await response.read()), "APIG.0201")

        small = {
            "data": {
                "req_data": [
                    {"sepal_length": 1, "sepal_width": 1, "petal_length": 1, "petal_width": 1}
                ]
            }
        }
        assert (await post(session, service.url, small))[0] == 200

    with_service(test, max_body_bytes=1024)


def test_other_methods_get_405_and_other_paths_404() -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        headers = {"X-Auth-Token": TOKEN}
        async with session.get(service.url, headers=headers) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "POST"
            assert_gateway_error(orjson.loads(await response.read()), "APIG.0101")
        async with session.put(service.url + "/x", headers=headers) as response:
            assert response.status == 405
        base = service.url.removesuffix("/v1/infers/iris")
        async with session.post(base + "/v2/other", headers=headers) as response:
            assert response.status == 404
            assert_gateway_error(orjson.loads(await response.read()), "APIG.0101")
        # An unknown path is a 404 even without a token, as at the gateway.
        async with session.post(base + "/v2/other") as response:
            assert response.status == 404

    with_service(test)


def test_stats_count_requests_statuses_and_rows() -> None:
    records = iris_records()[:3]

    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        assert (await post(session, service.url, {"data": {"req_data": records}}))[0] == 200
        assert (await post(session, service.url, {"data": {"req_data": records}}))[0] == 200
        assert (await post(session, service.url, b"{", token=None))[0] == 401
        assert (await post(session, service.url, b"{"))[0] == 400
        stats = service.stats
        assert stats.requests == 4
        assert dict(stats.by_status) == {200: 2, 401: 1, 400: 1}
        assert stats.rows_scored == 6
        assert stats.in_flight == 0
        assert stats.max_in_flight == 1

        await asyncio.gather(
            *(post(session, service.url, {"data": {"req_data": records}}) for _ in range(5))
        )
        assert stats.requests == 9
        assert stats.rows_scored == 21

    with_service(test)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_vendors_curl_command_works() -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        # The vendor's text-input command, word for word but for the token and the URL.
        command = [
            shutil.which("curl") or "curl",
            "-kv",
            "-d",
            '{"data":{"req_data":[{"sepal_length":3,"sepal_width":1,"petal_length":2.2,'
            '"petal_width":4}]}}',
            "-H",
            f"X-Auth-Token:{service.token}",
            "-H",
            "Content-type: application/json",
            "-X",
            "POST",
            service.url,
        ]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
        assert process.returncode == 0, stderr.decode()
        assert b"< HTTP/1.1 200 OK" in stderr
        assert orjson.loads(stdout) == {
            "meta": {"uuid": ""},
            "data": {
                "resp_data": [
                    {
                        "sepal_length": 3,
                        "sepal_width": 1,
                        "petal_length": 2.2,
                        "petal_width": 4,
                        "predictresult": "virginica",
                    }
                ]
            },
        }

    with_service(test)


def test_run_service_calls_on_ready_and_stops_when_cancelled() -> None:
    async def main() -> None:
        ready: asyncio.Future[RunningService] = asyncio.get_running_loop().create_future()
        options = ServiceOptions(token=TOKEN)
        task = asyncio.create_task(run_service(options, "127.0.0.1", 0, ready.set_result))
        # Either it is ready, or it failed to start: never wait on a future that won't come.
        either: set[asyncio.Future[Any]] = {ready, task}
        await asyncio.wait(either, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        url = ready.result().url
        async with aiohttp.ClientSession() as session:
            record = {"sepal_length": 6, "sepal_width": 3, "petal_length": 4.8, "petal_width": 1.8}
            status, _ = await post(session, url, {"data": {"req_data": [record]}})
            assert status == 200
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(aiohttp.ClientConnectionError):
                await post(session, url, {"data": {"req_data": [record]}})

    asyncio.run(main())


def test_start_service_makes_a_random_token_and_refuses_bad_settings() -> None:
    async def main() -> None:
        async with await start_service() as first, await start_service() as second:
            assert first.token != second.token
            assert len(first.token) >= 32
            assert first.url.startswith("http://127.0.0.1:")
            assert first.url.endswith("/v1/infers/iris")
        with pytest.raises(ValueError, match="known models are: iris"):
            await start_service(ServiceOptions(model="tulips"))
        with pytest.raises(ValueError, match="must not be empty"):
            await start_service(ServiceOptions(token=""))
        with pytest.raises(ValueError, match="token_ttl must be > 0"):
            await start_service(ServiceOptions(token_ttl=0))

    asyncio.run(main())


def test_an_extra_middleware_can_inject_gateway_faults() -> None:
    # The hook for fault injection: a throttling answer, an HTML page, a crash.
    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        kind = request.headers.get("X-Fault")
        if kind == "429":
            raise GatewayError(
                429, "APIG.0308", "The throttling threshold has been reached", {"Retry-After": "2"}
            )
        if kind == "502":
            return web.Response(
                status=502, text="<html>Bad Gateway</html>", content_type="text/html"
            )
        if kind == "crash":
            raise RuntimeError("boom")
        return await handler(request)

    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        body = orjson.dumps({"data": {"req_data": iris_records()[:2]}})
        for kind, status in (("429", 429), ("502", 502), ("crash", 500), ("none", 200)):
            # No token: faults come from the gateway, before authentication.
            headers = {"X-Fault": kind} if kind != "none" else {"X-Auth-Token": TOKEN}
            async with session.post(service.url, data=body, headers=headers) as response:
                assert response.status == status
                if kind == "429":
                    assert response.headers["Retry-After"] == "2"
                    assert_gateway_error(orjson.loads(await response.read()), "APIG.0308")
                if kind == "502":
                    assert response.content_type == "text/html"
                if kind == "crash":
                    assert_gateway_error(orjson.loads(await response.read()), "ModelArts.5000")
        assert dict(service.stats.by_status) == {429: 1, 502: 1, 500: 1, 200: 1}

    with_service(test, extra_middlewares=[faults])


# --- the embedded IAM --------------------------------------------------------------------------

ACCOUNT = IamAccount("alice", "s3cret-password", "acme", "eu-west-0")
RECORD = {"sepal_length": 6, "sepal_width": 3, "petal_length": 4.8, "petal_width": 1.8}


def login_request(
    user: str = "alice", password: str = "s3cret-password", project: str = "eu-west-0"
) -> dict[str, Any]:
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": user, "password": password, "domain": {"name": "acme"}}
                },
            },
            "scope": {"project": {"name": project}},
        }
    }


async def log_in(
    session: aiohttp.ClientSession, service: RunningService, body: Any
) -> tuple[int, str | None, Any]:
    assert service.iam_url is not None
    headers = {"Content-Type": "application/json;charset=utf8"}
    async with session.post(service.iam_url, data=orjson.dumps(body), headers=headers) as answer:
        return (
            answer.status,
            answer.headers.get("X-Subject-Token"),
            orjson.loads(await answer.read()),
        )


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_iam_login_issues_a_token_that_expires() -> None:
    clock = Clock()

    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        assert service.iam_url is not None and service.iam_url.endswith("/v3/auth/tokens")
        status, token, body = await log_in(session, service, login_request())
        assert status == 201 and token
        assert body["token"]["expires_at"] == "2023-11-14T22:13:50.000000Z"  # now (22:13:20) + 30 s
        assert body["token"]["user"] == {"name": "alice", "domain": {"name": "acme"}}
        assert body["token"]["project"] == {"name": "eu-west-0"}
        assert service.stats.logins == 1
        request = {"data": {"req_data": [RECORD]}}
        assert (await post(session, service.url, request, token=token))[0] == 200
        assert (await post(session, service.url, request, token=TOKEN))[0] == 200  # fixed one
        clock.now += 30
        status, error = await post(session, service.url, request, token=token)
        assert status == 401
        assert_gateway_error(error, "APIG.0301")
        assert error["error_msg"] == "Incorrect IAM authentication information: token expires"
        assert service.stats.expired_tokens == 1
        assert (await post(session, service.url, request, token=TOKEN))[0] == 200  # still fine
        # a new login gives a new token; the old one stays expired
        status, renewed, _ = await log_in(session, service, login_request())
        assert status == 201 and renewed != token
        assert (await post(session, service.url, request, token=renewed))[0] == 200

    with_service(test, iam=ACCOUNT, token_ttl=30.0, clock=clock)


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (login_request(password="wrong"), 401, "IAM.0002", "The username or password is wrong."),
        (login_request(user="bob"), 401, "IAM.0002", "The username or password is wrong."),
        (login_request(project="cn-north-4"), 401, "IAM.0002", "no access to project"),
        ({"auth": {}}, 400, "IAM.0001", "methods must include 'password'"),
        (b"{", 400, "IAM.0001", "not valid JSON"),
    ],
)
def test_iam_refuses_a_wrong_login(body: Any, status: int, code: str, message: str) -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        assert service.iam_url is not None
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with session.post(service.iam_url, data=data) as answer:
            assert answer.status == status
            assert "X-Subject-Token" not in answer.headers
            error = orjson.loads(await answer.read())
        assert_gateway_error(error, code)
        assert message in error["error_msg"]
        assert "s3cret-password" not in error["error_msg"]
        assert service.stats.logins == 0

    with_service(test, iam=ACCOUNT)


def test_without_an_account_there_is_no_iam_and_no_password_shows() -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        assert service.iam_url is None
        base = service.url.removesuffix("/v1/infers/iris")
        async with session.post(base + "/v3/auth/tokens", data=b"{}") as answer:
            assert answer.status == 404

    with_service(test)
    options = ServiceOptions(iam=ACCOUNT)
    assert "s3cret-password" not in repr(options) and "s3cret-password" not in repr(ACCOUNT)
