"""The embedded service's OpenAI-compatible routes, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from batchrunner.service import FaultSettings, ServiceOptions, fault_middleware, start_service
from batchrunner.service.llm import answer_for_schema, classify, embed

TOKEN = "llm-test-token-0123456789"


def with_llm(test: Callable[[str, aiohttp.ClientSession], Awaitable[None]], **faults: Any) -> None:
    async def main() -> None:
        middlewares = [fault_middleware(FaultSettings(**faults))] if faults else []
        service = await start_service(
            ServiceOptions(model="llm", token=TOKEN, protocol="openai-chat"),
            extra_middlewares=middlewares,
        )
        base = service.url.removesuffix("/v1/chat/completions")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with service, aiohttp.ClientSession(headers=headers) as session:
            await test(base, session)

    asyncio.run(main())


async def post(
    session: aiohttp.ClientSession, url: str, body: Any
) -> tuple[int, Any, dict[str, str]]:
    async with session.post(url, data=orjson.dumps(body)) as answer:
        return answer.status, orjson.loads(await answer.read()), dict(answer.headers)


def test_the_classifier_reads_keywords_and_the_labels_it_is_given() -> None:
    assert classify("The app crashes when I open it") == "bug"
    assert classify("How do I export my data?") == "question"
    assert classify("Thanks, I love the new design") == "praise"
    assert classify("Shipping was late", ("on-time", "late")) == "late"
    assert classify("nothing matches here") == "bug"  # no keyword: the first label


def test_embeddings_are_normalised_deterministic_and_of_the_asked_size() -> None:
    vector = embed("the cat sat on the mat", 32)
    assert len(vector) == 32
    assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0)
    assert vector == embed("The cat sat on the mat!", 32)
    assert embed("", 8) == [0.0] * 8


def test_an_answer_fits_the_schema_it_is_given() -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"enum": ["bug", "question", "praise"]},
            "confidence": {"type": "number"},
            "words": {"type": "integer"},
            "urgent": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["label"],
    }
    answer = answer_for_schema(schema, "it crashes with an error and freezes, why?")
    assert answer["label"] == "bug"
    assert isinstance(answer["confidence"], float) and answer["words"] == 9
    assert answer["urgent"] is True and isinstance(answer["tags"], list)


def test_chat_answers_text_with_usage_and_rate_limit_headers() -> None:
    async def test(base: str, session: aiohttp.ClientSession) -> None:
        body = {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "You label tickets."},
                {"role": "user", "content": "It crashes on start"},
            ],
        }
        status, answer, headers = await post(session, base + "/v1/chat/completions", body)
        assert status == 200, answer
        choice = answer["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "bug"}
        assert choice["finish_reason"] == "stop"
        assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
        assert answer["model"] == "tiny"
        assert int(headers["x-ratelimit-remaining-requests"]) == 100_000 - 1
        assert int(headers["x-ratelimit-remaining-tokens"]) == 10_000_000 - 8
        assert headers["x-ratelimit-reset-requests"].endswith("s")

    with_llm(test)


def test_chat_with_a_json_schema_answers_json_that_fits_it_and_max_tokens_cuts() -> None:
    async def test(base: str, session: aiohttp.ClientSession) -> None:
        schema = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}}}
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "buy spam now"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        }
        status, answer, _ = await post(session, base + "/v1/chat/completions", body)
        assert status == 200
        assert orjson.loads(answer["choices"][0]["message"]["content"]) == {"label": "spam"}
        long = {
            **body,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "schema": {
                        "type": "object",
                        "properties": {f"p{i}": {"type": "string"} for i in range(5)},
                    }
                },
            },
            "max_tokens": 2,
        }
        status, answer, _ = await post(session, base + "/v1/chat/completions", long)
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 2

    with_llm(test)


def test_embeddings_are_listed_out_of_order_with_their_index() -> None:
    async def test(base: str, session: aiohttp.ClientSession) -> None:
        body = {"model": "bow", "input": ["one two", "three", "four five six"], "dimensions": 16}
        status, answer, _ = await post(session, base + "/v1/embeddings", body)
        assert status == 200, answer
        assert [item["index"] for item in answer["data"]] == [2, 1, 0]
        by_index = {item["index"]: item["embedding"] for item in answer["data"]}
        assert by_index[1] == embed("three", 16)
        assert answer["usage"] == {"prompt_tokens": 6, "total_tokens": 6}

    with_llm(test)


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/v1/embeddings", {"model": "m", "input": [1, 2]}, "input"),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_bad_requests_get_openai_error_bodies(path: str, body: Any, says: str) -> None:
    async def test(base: str, session: aiohttp.ClientSession) -> None:
        status, answer, _ = await post(session, base + path, body)
        assert status == 400
        assert answer["error"]["type"] == "invalid_request_error"
        assert says in answer["error"]["message"]

    with_llm(test)


def test_a_bearer_token_is_required() -> None:
    async def test(base: str, session: aiohttp.ClientSession) -> None:
        async with aiohttp.ClientSession() as anonymous:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                async with anonymous.post(
                    base + "/v1/embeddings", data=b"{}", headers=headers
                ) as answer:
                    assert answer.status == 401

    with_llm(test)


def test_the_fault_options_apply() -> None:
    async def test(base: str, session: aiohttp.ClientSession) -> None:
        status, _, _ = await post(session, base + "/v1/embeddings", {"model": "m", "input": "x"})
        assert status == 503

    with_llm(test, error_rate=1.0)


def test_over_capacity_the_answer_is_429_with_retry_after_ms() -> None:
    async def test(base: str, session: aiohttp.ClientSession) -> None:
        body = {"model": "m", "input": "x"}
        answers = await asyncio.gather(
            *(post(session, base + "/v1/embeddings", body) for _ in range(4))
        )
        throttled = [headers for status, _, headers in answers if status == 429]
        assert throttled and all(h["retry-after-ms"] == "250" for h in throttled)

    with_llm(test, capacity=1, retry_after=0.25, latency_ms=20)
