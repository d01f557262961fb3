"""protocol = "openai-chat" and "openai-embeddings": the codecs, and runs against the
embedded service and small purpose-built servers on loopback."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
from aiohttp import web

from batchrunner.errors import RequestError, SettingError
from batchrunner.items import Batch
from batchrunner.protocols import EncodedRequest
from batchrunner.protocols.openai import (
    ChatCodec,
    EmbeddingsCodec,
    check_prompt,
    endpoint_url,
    prompt_text,
    scan_usage,
)
from batchrunner.service.llm import embed
from tests.conftest import Invoke, read_output, write_csv, write_job
from tests.servers import Call, ThreadedServer

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["bug", "question", "praise"]}},
    "required": ["label"],
    "additionalProperties": False,
}
LABEL_FORMAT = {"type": "json_schema", "json_schema": {"name": "label", "schema": LABEL_SCHEMA}}
NO_REQUEST = EncodedRequest(b"", "application/json")


def batch_of(**columns: list[Any]) -> Batch:
    rows = pa.RecordBatch.from_pydict(columns)
    return Batch(0, [str(i) for i in range(rows.num_rows)], rows)


def chat_answer(content: str | None, finish: str = "stop", **usage: int) -> bytes:
    document: dict[str, Any] = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }
    document["choices"][0]["finish_reason"] = finish
    if usage:
        document["usage"] = usage
    return orjson.dumps(document)


# --- the codecs ----------------------------------------------------------------------------


def test_prompts_put_in_text_as_it_is_and_other_values_as_json() -> None:
    assert prompt_text("a {b}") == "a {b}"
    assert prompt_text(3) == "3" and prompt_text(2.5) == "2.5" and prompt_text(True) == "true"
    assert prompt_text([1, "x"]) == '[1,"x"]' and prompt_text({"k": None}) == '{"k":null}'
    assert prompt_text(datetime.date(2026, 12, 5)) == "2026-12-05"
    assert prompt_text(None) is None


def test_chat_request_has_system_and_filled_prompt_and_the_settings() -> None:
    codec = ChatCodec("m", "Ticket {id}: {text}", system="Label it.", max_tokens=8, temperature=0.0)
    request = codec.encode(batch_of(id=[7], text=["It crashes"]), "u")
    body = orjson.loads(request.body)
    assert body == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Label it."},
            {"role": "user", "content": "Ticket 7: It crashes"},
        ],
        "max_tokens": 8,
        "temperature": 0.0,
    }
    # (9 + 20 characters) / 4, rounded up, and the most the answer may take.
    assert request.estimated_tokens == 8 + 8


def test_a_missing_value_fails_the_row_unsent_naming_the_column() -> None:
    codec = ChatCodec("m", "{text} ({note})")
    with pytest.raises(RequestError) as caught:
        codec.encode(batch_of(text=["x"], note=[None]), "u")
    assert caught.value.kind == "missing_value" and "'note'" in caught.value.message
    with pytest.raises(SettingError, match=r"\{nope\} is not a column of the input"):
        check_prompt("{text} {nope}", ["text"])


def test_chat_answer_gives_the_four_columns() -> None:
    codec = ChatCodec("m", "{text}")
    rows = codec.decode(
        chat_answer("bug", prompt_tokens=5, completion_tokens=1), batch_of(text=["x"]), NO_REQUEST
    )
    assert rows == [
        {"content": "bug", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 1}
    ]


@pytest.mark.parametrize(
    "answer",
    [b'{"choices": []}', b'{"object": "list"}', b'{"choices": [{"message": {"content": 3}}]}'],
)
def test_an_answer_that_is_not_a_chat_completion_fails_the_row(answer: bytes) -> None:
    with pytest.raises(RequestError) as caught:
        ChatCodec("m", "{text}").decode(answer, batch_of(text=["x"]), NO_REQUEST)
    assert caught.value.kind == "bad_response"


def test_structured_replies_are_parsed_into_columns_and_refused_when_they_do_not_fit() -> None:
    codec = ChatCodec("m", "{text}", response_format=LABEL_FORMAT)
    batch = batch_of(text=["x"])
    rows = codec.decode(chat_answer('{"label": "praise"}'), batch, NO_REQUEST)
    assert rows[0]["label"] == "praise" and rows[0]["content"] == '{"label": "praise"}'
    for content, says in [
        ('{"label": "spam"}', "label: 'spam' is not one of"),
        ('{"label": "bug", "extra": 1}', "Additional properties"),
        ('{"label": ', "not JSON"),
        ("[1]", "is not of type 'object'"),
    ]:
        with pytest.raises(RequestError) as caught:
            codec.decode(chat_answer(content), batch, NO_REQUEST)
        assert caught.value.kind == "schema_mismatch" and caught.value.retryable
        assert says in caught.value.message
    with pytest.raises(RequestError, match=r"cut at max_tokens"):
        codec.decode(chat_answer('{"label"', finish="length"), batch, NO_REQUEST)


def test_an_invalid_schema_is_a_setting_error() -> None:
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "thing"}}}
    with pytest.raises(SettingError, match="the JSON schema is not valid"):
        ChatCodec("m", "{text}", response_format=bad)
    clash = {"type": "object", "properties": {"content": {"type": "string"}}}
    with pytest.raises(SettingError, match="field content would take the name of a column"):
        ChatCodec(
            "m", "{text}", response_format={"type": "json_schema", "json_schema": {"schema": clash}}
        )


def embeddings_answer(vectors: dict[int, list[float]], **extra: Any) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in vectors.items()]
    return orjson.dumps({"object": "list", "data": data, **extra})


def test_embeddings_are_joined_by_index_whatever_the_order() -> None:
    codec = EmbeddingsCodec("m", "text")
    batch = batch_of(text=["a", "b", "c"])
    body = orjson.loads(codec.encode(batch, "u").body)
    assert body == {"model": "m", "input": ["a", "b", "c"], "encoding_format": "float"}
    rows = codec.decode(
        embeddings_answer({2: [2.0, 2.5], 0: [0.0, 0.5], 1: [1.0, 1.5]}), batch, NO_REQUEST
    )
    assert [row["embedding"].tolist() for row in rows] == [[0.0, 0.5], [1.0, 1.5], [2.0, 2.5]]
    assert rows[0]["embedding"].dtype == np.float32


@pytest.mark.parametrize(
    ("vectors", "says"),
    [
        ({0: [1.0], 1: [1.0]}, "2 embeddings for 3 texts"),
        ({0: [1.0], 1: [1.0], 5: [1.0]}, "not a position"),
        ({0: [1.0], 1: [1.0, 2.0], 2: [1.0]}, "not all 1 long"),
        ({0: [1.0], 1: ["x"], 2: [1.0]}, "not a number"),
    ],
)
def test_embeddings_that_cannot_be_matched_fail_the_batch(
    vectors: dict[int, list[Any]], says: str
) -> None:
    with pytest.raises(RequestError, match=says):
        EmbeddingsCodec("m", "text").decode(
            embeddings_answer(vectors), batch_of(text=["a", "b", "c"]), NO_REQUEST
        )


def test_an_index_twice_fails_the_batch() -> None:
    data = [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]
    with pytest.raises(RequestError, match="comes twice"):
        EmbeddingsCodec("m", "text").decode(
            orjson.dumps({"data": data}), batch_of(text=["a", "b"]), NO_REQUEST
        )


def test_vectors_of_a_run_keep_one_length() -> None:
    codec = EmbeddingsCodec("m", "text")
    codec.decode(embeddings_answer({0: [1.0, 2.0]}), batch_of(text=["a"]), NO_REQUEST)
    with pytest.raises(RequestError, match="not all 2 long"):
        codec.decode(embeddings_answer({0: [1.0]}), batch_of(text=["a"]), NO_REQUEST)


def test_usage_and_endpoints() -> None:
    usage = scan_usage(b'{"data": [], "usage": {"prompt_tokens": 12, "total_tokens": 12}}')
    assert usage is not None and (usage.prompt, usage.completion, usage.total) == (12, 0, 12)
    assert scan_usage(b"{}") is None
    assert endpoint_url("http://h:8000/v1", "openai-chat") == "http://h:8000/v1/chat/completions"
    assert endpoint_url("http://h/v1/", "openai-embeddings") == "http://h/v1/embeddings"
    assert endpoint_url("http://h/v1/embeddings", "openai-embeddings") == "http://h/v1/embeddings"


# --- runs ----------------------------------------------------------------------------------

TICKETS = [
    ("1", "The app crashes when I upload a photo", 3),
    ("2", "How do I export my invoices?", 1),
    ("3", "Thanks, the new dashboard is great", None),
    ("4", "The 2.5 release is broken and fails with an error", 2.5),
]


def chat_job(tmp_path: Path, url: str = "embedded:llm", extra: str = "") -> Path:
    write_csv(tmp_path / "tickets.csv", ["id", "text", "priority"], TICKETS)
    return write_job(
        tmp_path / "job.toml",
        f"""
name = "tickets"
[input]
path = "{tmp_path / "tickets.csv"}"
id_column = "id"
[service]
url = "{url}"
protocol = "openai-chat"
[service.openai]
model = "tiny"
system = "You label support tickets."
prompt = "Priority {{priority}}. Label this ticket as bug, question or praise: {{text}}"
max_tokens = 16
{extra}
[retry]
backoff_initial = 0
[output]
path = "{tmp_path / "out.parquet"}"
""",
    )


def test_chat_run_labels_each_row_and_a_missing_value_is_its_own_error(
    invoke: Invoke, tmp_path: Path
) -> None:
    result = invoke("run", str(chat_job(tmp_path)), "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.stderr
    rows = {row["_key"]: row for row in read_output(tmp_path / "out.parquet")}
    assert [rows[k]["content"] for k in "124"] == ["bug", "question", "bug"]
    assert rows["1"]["finish_reason"] == "stop" and rows["1"]["completion_tokens"] == 1
    # "You label support tickets." + "Priority 3. Label this ... photo": words
    assert rows["1"]["prompt_tokens"] == 4 + 18
    assert rows["3"]["_status"] == "error" and rows["3"]["_error_kind"] == "missing_value"
    assert "'priority'" in rows["3"]["_error"]


def test_chat_run_with_a_json_schema_gives_its_fields_as_columns(
    invoke: Invoke, tmp_path: Path
) -> None:
    extra = "response_format = " + _toml(LABEL_FORMAT)
    job = chat_job(tmp_path, extra=extra)
    result = invoke("run", str(job), "--max-error-rate", "0.5")
    assert result.exit_code == 0, result.stderr
    rows = {row["_key"]: row for row in read_output(tmp_path / "out.parquet")}
    assert [rows[k]["label"] for k in "124"] == ["bug", "question", "bug"]


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return orjson.dumps(value).decode()


def test_a_reply_off_the_schema_is_sampled_again_then_an_error_row_of_its_own_kind(
    invoke: Invoke, tmp_path: Path
) -> None:
    tries: dict[str, int] = {}

    async def handle(call: Call) -> web.Response:
        text = call.body["messages"][-1]["content"]
        tries[text] = tries.get(text, 0) + 1
        # Row 2 never fits; the others fit at their second try.
        fits = "invoices" not in text and tries[text] >= 2
        content = '{"label": "bug"}' if fits else '{"label": "unsure"}'
        return web.Response(body=chat_answer(content), content_type="application/json")

    with ThreadedServer(handle, path="/v1/chat/completions") as server:
        extra = "response_format = " + _toml(LABEL_FORMAT) + "\nschema_attempts = 3"
        job = chat_job(tmp_path, url=server.url.removesuffix("/chat/completions"), extra=extra)
        result = invoke(
            "run", str(job), "--max-error-rate", "1", "--concurrency", "1", "--batch-size", "1"
        )
    assert result.exit_code == 0, result.stderr
    rows = {row["_key"]: row for row in read_output(tmp_path / "out.parquet")}
    assert rows["1"]["label"] == "bug" and rows["1"]["_attempts"] == 2
    assert rows["2"]["_error_kind"] == "schema_mismatch" and rows["2"]["_attempts"] == 3
    assert "'unsure' is not one of" in rows["2"]["_error"]


def embed_job(tmp_path: Path, texts: list[str | None], size: int = 3, extra: str = "") -> Path:
    write_csv(tmp_path / "docs.csv", ["id", "text"], list(enumerate(texts)))
    return write_job(
        tmp_path / "embed.toml",
        f"""
name = "docs"
[input]
path = "{tmp_path / "docs.csv"}"
id_column = "id"
columns = ["text"]
[service]
url = "embedded:llm"
protocol = "openai-embeddings"
[service.openai]
model = "bow"
dimensions = 16
{extra}
[batch]
size = {size}
[output]
path = "{tmp_path / "vectors.parquet"}"
""",
    )


def test_embeddings_run_joins_the_vectors_by_index_as_float32_lists(
    invoke: Invoke, tmp_path: Path
) -> None:
    texts = [f"document number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(10)]
    result = invoke("run", str(embed_job(tmp_path, texts)))
    assert result.exit_code == 0, result.stderr
    table = pa.parquet.read_table(tmp_path / "vectors.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    for row in table.to_pylist():
        expected = embed(texts[int(row["_key"])], 16)
        assert row["embedding"] == pytest.approx(expected, abs=1e-6)


def test_a_job_that_does_not_fit_the_protocol_is_refused(invoke: Invoke, tmp_path: Path) -> None:
    job = embed_job(tmp_path, ["a"])
    job.write_text(job.read_text().replace('columns = ["text"]\n', ""))
    result = invoke("run", str(job))
    assert result.exit_code == 2
    assert "input.columns: protocol 'openai-embeddings' embeds one column" in result.stderr
    job = chat_job(tmp_path)
    job.write_text(job.read_text().replace("{text}", "{body}"))
    result = invoke("run", str(job))
    assert result.exit_code == 2
    assert "service.openai.prompt: {body} is not a column of the input" in result.stderr


def test_the_key_goes_as_a_bearer_token_from_the_environment_or_a_file(
    invoke: Invoke, tmp_path: Path
) -> None:
    async def handle(call: Call) -> web.Response:
        return web.Response(body=chat_answer("bug"), content_type="application/json")

    with ThreadedServer(handle, path="/v1/chat/completions") as server:
        base = server.url.removesuffix("/chat/completions")
        job = chat_job(tmp_path, url=base, extra='api_key_env = "MY_KEY"')
        result = invoke("run", str(job), "--max-error-rate", "1", env={"MY_KEY": "sk-env-123"})
        assert result.exit_code == 0, result.stderr
        assert server.calls[0].headers["Authorization"] == "Bearer sk-env-123"
        assert "X-Auth-Token" not in server.calls[0].headers
        (tmp_path / "key").write_text("sk-file-456\n")
        job = chat_job(tmp_path, url=base, extra=f'api_key_file = "{tmp_path / "key"}"')
        result = invoke("run", str(job), "--no-resume", "--max-error-rate", "1")
        assert result.exit_code == 0, result.stderr
        assert server.calls[-1].headers["Authorization"] == "Bearer sk-file-456"
        # No key set, and none asked for: none sent (a local server needs none).
        job = chat_job(tmp_path, url=base)
        result = invoke(
            "run", str(job), "--no-resume", "--max-error-rate", "1", env={"OPENAI_API_KEY": ""}
        )
        assert result.exit_code == 0, result.stderr
        assert "Authorization" not in server.calls[-1].headers
    job = chat_job(tmp_path, url=base, extra='api_key_env = "MY_KEY"')
    result = invoke("run", str(job), env={"MY_KEY": ""})
    assert result.exit_code == 2
    assert "service.openai.api_key_env: environment variable MY_KEY is not set" in result.stderr


@pytest.mark.parametrize(
    ("service", "says"),
    [
        (
            'protocol = "json"\n[service.openai]\nmodel = "m"',
            "[service.openai] applies to protocol = 'openai-chat', 'openai-embeddings' or "
            "'openai-batch', but the protocol is 'json'",
        ),
        (
            'protocol = "openai-chat"\n[service.openai]\nprompt = "{text}"',
            "[service.openai] model: protocol 'openai-chat' needs the model's name",
        ),
        ('protocol = "openai-chat"\n[service.openai]\nmodel = "m"', "set the prompt"),
        (
            'protocol = "openai-chat"\n[service.openai]\nmodel = "m"\nprompt = "{text}"\n'
            'response_format = { type = "yaml" }',
            "response_format.type must be text, json_object or json_schema",
        ),
        (
            'protocol = "openai-chat"\n[service.openai]\nmodel = "m"\nprompt = "{text}"\n'
            'response_format = { type = "json_schema", json_schema = { schema = { type = 3 } } }',
            "service.openai.response_format: the JSON schema is not valid",
        ),
    ],
)
def test_openai_settings_are_checked_at_load(
    invoke: Invoke, tmp_path: Path, service: str, says: str
) -> None:
    write_csv(tmp_path / "t.csv", ["text"], [("x",)])
    job = write_job(
        tmp_path / "job.toml",
        f'[input]\npath = "{tmp_path / "t.csv"}"\n[service]\nurl = "embedded:llm"\n{service}\n',
    )
    for command in ("validate", "run"):
        result = invoke(command, str(job))
        assert result.exit_code == 2
        assert says in result.stderr
    assert not (tmp_path / "out").exists()
