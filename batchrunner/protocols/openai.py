"""``protocol = "openai-chat"`` and ``"openai-embeddings"``: OpenAI-compatible language
model servers (vLLM, llama.cpp's server, Text Embeddings Inference, LiteLLM, ModelArts
Studio, OpenAI itself).

Chat sends one row a request to ``.../v1/chat/completions``: the ``[service.openai]``
``prompt`` with ``{column}`` filled in from the row as the user message, after the
``system`` message if one is set. The answer gives the columns ``content``,
``finish_reason``, ``prompt_tokens`` and ``completion_tokens``. With a ``response_format``
of type ``json_schema``, the content is parsed and checked against the schema (with
``jsonschema``) and its fields become columns too; a reply that is not JSON or does not fit
is a failure of kind ``schema_mismatch``, sent again up to ``schema_attempts`` times.

In a prompt, a text is put in as it is, a number or a boolean as JSON writes it
(``3.5``, ``true``), a list or an object as JSON text. A missing value (null) cannot be
put in: the row fails unsent with kind ``missing_value``, naming the column; a prompt with
a hole would get an answer about nothing.

Embeddings send ``batch.size`` rows a request to ``.../v1/embeddings``: ``input`` is the
list of the one sent column's texts. The answer's ``data[i].index`` says which input each
vector is for (servers may list them in any order): every index must come exactly once,
and every vector must be as long as the first one of the run. The vectors become the
column ``embedding``, a fixed-size list of float32.

Errors are OpenAI's ``{"error": {"message": ...}}`` bodies, classified as the other JSON
protocols' (see ``answers``): 401/403 stop the run, 429 and 5xx are retried (honouring
``retry-after-ms``, which the client reads), 400 is refused for the row's content.
"""

from __future__ import annotations

import base64
import datetime
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from batchrunner.errors import RequestError, SettingError, clip
from batchrunner.items import Batch
from batchrunner.job.settings import Job
from batchrunner.protocols import EncodedRequest
from batchrunner.protocols.answers import (
    bad_response,
    classify_failure,
    kind_of_value,
    parse_answer,
)
from batchrunner.protocols.modelarts import _json_default, rows_to_records

JSON_CONTENT_TYPE = "application/json"
CHAT_ENDPOINT = "/chat/completions"
EMBEDDINGS_ENDPOINT = "/embeddings"
#: The columns a chat answer gives (a JSON schema's fields come after them).
CHAT_COLUMNS = ("content", "finish_reason", "prompt_tokens", "completion_tokens")
EMBEDDING_COLUMN = "embedding"
# A prompt's tokens, estimated before sending from its length: about 4 characters a token
# for English text with OpenAI's tokenizers (corrected from each answer's usage).
CHARS_PER_TOKEN = 4
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_USAGE = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens an answer says its request took."""

    prompt: int
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def endpoint_url(url: str, protocol: str) -> str:
    """The URL requests go to: ``url`` as it is when it already ends in the protocol's
    endpoint, else the endpoint appended to it (``http://host:8000/v1`` is a base URL, as
    OpenAI's clients take it)."""
    endpoint = EMBEDDINGS_ENDPOINT if protocol == "openai-embeddings" else CHAT_ENDPOINT
    if protocol == "openai-batch" or url.rstrip("/").endswith(endpoint):
        return url
    return url.rstrip("/") + endpoint


def estimate_tokens(text: str) -> int:
    """A prompt's tokens before the server counts them: its characters over 4, at least 1."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def prompt_text(value: Any) -> str | None:
    """A column's value as it goes into a prompt; None for a missing value."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return orjson.dumps(value, default=_json_default).decode()


def check_prompt(
    template: str, columns: Sequence[str], setting: str = "service.openai.prompt"
) -> None:
    """Refuse a template naming a column that is not sent (a ``SettingError``)."""
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(columns))
    if unknown:
        raise SettingError(
            f"{setting}: {', '.join('{' + name + '}' for name in unknown)} "
            f"{'is not a column' if len(unknown) == 1 else 'are not columns'} of the input; "
            f"the columns sent are {', '.join(columns) or 'none'}"
        )


def _missing(column: str) -> RequestError:
    return RequestError(
        f"column {column!r} is empty (null) in this row: nothing to put in the prompt",
        kind="missing_value",
        retryable=False,
        row_specific=True,
    )


def _fill(template: str, record: Mapping[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in record:
            raise RequestError(
                f"service.openai.prompt names {{{name}}}, which is not a column sent",
                kind="request_unfit",
                retryable=False,
            )
        text = prompt_text(record[name])
        if text is None:
            raise _missing(name)
        return text

    return _PLACEHOLDER.sub(value, template)


def usage_of(document: Any) -> Usage | None:
    """An answer's ``usage``, or None when it has none that says how many tokens."""
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return Usage(prompt, completion)


def scan_usage(body: bytes) -> Usage | None:
    """The usage of an answer's body without parsing all of it (an embeddings answer is
    mostly numbers): its last ``prompt_tokens`` and ``completion_tokens`` fields."""
    found = {name: int(value) for name, value in _USAGE.findall(body[-4096:])}
    if b"prompt_tokens" not in found:
        return None
    return Usage(found[b"prompt_tokens"], found.get(b"completion_tokens", 0))


def schema_validator(response_format: Mapping[str, Any] | None) -> Callable[[Any], str | None]:
    """A check of a reply against ``response_format``'s JSON schema: None when it fits,
    else what is wrong. Raises ``SettingError`` when the schema is not a valid one, or
    when ``jsonschema`` is not installed."""
    spec = (response_format or {}).get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise SettingError(
            "service.openai.response_format: a json_schema format needs "
            "json_schema = { name = ..., schema = { ... } }"
        )
    try:
        import jsonschema
    except ImportError:
        raise SettingError(
            "service.openai.response_format: checking replies against a JSON schema needs "
            "the jsonschema package: pip install 'batchrunner[llm]'"
        ) from None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SettingError(
            "service.openai.response_format: the JSON schema is not valid: "
            + clip(exc.message, 200)
        ) from None
    taken = sorted(set(schema.get("properties") or {}) & set(CHAT_COLUMNS))
    if taken:
        raise SettingError(
            f"service.openai.response_format: the schema's field {', '.join(taken)} would "
            f"take the name of a column every chat answer has ({', '.join(CHAT_COLUMNS)}); "
            "rename it"
        )
    validator = cls(schema)

    def check(value: Any) -> str | None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is None:
            return None
        where = "/".join(map(str, error.absolute_path)) or "the reply"
        return f"{where}: {clip(error.message, 200)}"

    return check


class OpenAIAnswers:
    """What every OpenAI-compatible codec does alike: ``usage`` read from the answer, the
    API's error bodies classified, and no probe for ``validate``."""

    def usage(self, body: bytes) -> Usage | None:
        return scan_usage(body)

    def classify_failure(
        self, status: int, body: bytes, retry_after: float | None = None
    ) -> RequestError:
        return _classify(status, body, retry_after)

    def probe_url(self, url: str) -> str | None:
        return None

    def check_probe(self, status: int, body: bytes, schema: pa.Schema) -> None:
        return None


class ChatCodec(OpenAIAnswers):
    """One row a request: messages from ``[service.openai]``, the answer's message back."""

    def __init__(
        self,
        model: str,
        prompt: str,
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.prompt = prompt
        self.system = system
        self.max_tokens = max_tokens
        self._fixed: dict[str, Any] = {}
        if max_tokens is not None:
            self._fixed["max_tokens"] = max_tokens
        if temperature is not None:
            self._fixed["temperature"] = temperature
        if response_format is not None:
            self._fixed["response_format"] = dict(response_format)
        structured = (response_format or {}).get("type") == "json_schema"
        self._check = schema_validator(response_format) if structured else None
        self._parse = structured or (response_format or {}).get("type") == "json_object"

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        rows = batch.rows
        if rows is None or rows.num_rows != 1:
            raise ValueError("protocol openai-chat sends one row a request")
        text = _fill(self.prompt, rows_to_records(rows)[0])
        messages = [{"role": "user", "content": text}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        body = {"model": self.model, "messages": messages, **self._fixed}
        estimate = estimate_tokens((self.system or "") + text) + (self.max_tokens or 0)
        return EncodedRequest(
            orjson.dumps(body), JSON_CONTENT_TYPE, request_uuid=None, estimated_tokens=estimate
        )

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> list[dict[str, Any]]:
        document = parse_answer(body)
        choices = document.get("choices") if isinstance(document, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise bad_response("the answer has no choices[0]: not a chat completion")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise bad_response(f"choices[0].message.content is {kind_of_value(content)}")
        finish = choices[0].get("finish_reason")
        usage = usage_of(document)
        row: dict[str, Any] = {
            "content": content,
            "finish_reason": finish if isinstance(finish, str) else None,
            "prompt_tokens": usage.prompt if usage else None,
            "completion_tokens": usage.completion if usage else None,
        }
        if self._parse:
            row.update(self._fields(content, row["finish_reason"]))
        return [row]

    def _fields(self, content: str | None, finish: str | None) -> dict[str, Any]:
        try:
            value = orjson.loads(content or "")
        except orjson.JSONDecodeError:
            cut = " (cut at max_tokens: finish_reason is length)" if finish == "length" else ""
            raise _mismatch(f"the reply is not JSON{cut}: {clip(content or '', 120)!r}") from None
        problem = self._check(value) if self._check is not None else None
        if problem is None and not isinstance(value, dict):
            problem = f"the reply is {kind_of_value(value)}, not a JSON object"
        if problem is not None:
            raise _mismatch(f"the reply does not match the JSON schema: {problem}")
        return {name: field for name, field in value.items() if name not in CHAT_COLUMNS}
        # (a schema naming those is refused at load; a reply adding them keeps ours)


def _mismatch(message: str) -> RequestError:
    # Another sample may fit (temperature > 0, or a server that ignores the schema now and
    # then): retried up to service.openai.schema_attempts, then an error row of its own kind.
    return RequestError(message, kind="schema_mismatch", retryable=True)


def _classify(status: int, body: bytes, retry_after: float | None) -> RequestError:
    # OpenAI's error body: {"error": {"message": ..., "type": ...}}; its message says it all.
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    inner = document.get("error") if isinstance(document, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        body = orjson.dumps({"error": inner["message"]})
    error = classify_failure(status, body, retry_after)
    if status == 400:  # OpenAI's 400s are about the request's content: the row is to blame
        error.row_specific = True
    return error


class EmbeddingsCodec(OpenAIAnswers):
    """``batch.size`` rows a request: ``input`` the column's texts, vectors joined by index."""

    def __init__(self, model: str, column: str, *, dimensions: int | None = None) -> None:
        self.model = model
        self.column = column
        self._fixed: dict[str, Any] = {"encoding_format": "float"}
        if dimensions is not None:
            self._fixed["dimensions"] = dimensions
        self.dimensions = dimensions  # the length every vector must have, once known

    def encode(self, batch: Batch, request_uuid: str) -> EncodedRequest:
        rows = batch.rows
        if rows is None:
            raise ValueError("protocol openai-embeddings sends rows: this batch carries a file")
        texts = []
        for value in rows.column(self.column).to_pylist():
            text = prompt_text(value)
            if text is None:
                raise _missing(self.column)
            texts.append(text)
        body = {"model": self.model, "input": texts, **self._fixed}
        estimate = sum(map(estimate_tokens, texts))
        return EncodedRequest(
            orjson.dumps(body), JSON_CONTENT_TYPE, request_uuid=None, estimated_tokens=estimate
        )

    def decode(self, body: bytes, batch: Batch, request: EncodedRequest) -> list[dict[str, Any]]:
        document = parse_answer(body)
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            raise bad_response("the answer has no data list: not an embeddings answer")
        if len(data) != len(batch):
            raise bad_response(
                f"the answer has {len(data)} embeddings for {len(batch)} texts sent; "
                "vectors cannot be matched to rows",
                row_specific=True,
            )
        vectors: list[Any] = [None] * len(batch)
        for position, item in enumerate(data):
            index = item.get("index") if isinstance(item, dict) else None
            vector = item.get("embedding") if isinstance(item, dict) else None
            if type(index) is not int or not 0 <= index < len(batch):
                raise bad_response(f"data[{position}].index is not a position in the input")
            if vectors[index] is not None:
                raise bad_response(f"data[{position}].index {index} comes twice")
            if not isinstance(vector, list) or not vector:
                raise bad_response(f"data[{position}].embedding is not a list of numbers")
            vectors[index] = vector
        width = self.dimensions or len(vectors[0])
        if any(len(vector) != width for vector in vectors):
            lengths = sorted({len(vector) for vector in vectors})
            raise bad_response(
                f"the embeddings are not all {width} long (lengths {lengths}): "
                "vectors of one run must have one length"
            )
        try:
            matrix = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError):
            raise bad_response("an embedding holds something that is not a number") from None
        if not np.isfinite(matrix).all():
            raise bad_response("an embedding holds a value that is not a finite number")
        self.dimensions = width
        # Rows of one float32 matrix: the sink makes them a fixed-size list column in C.
        return [{EMBEDDING_COLUMN: vector} for vector in matrix]


def openai_codec(job: Job) -> ChatCodec | EmbeddingsCodec:
    """The codec of a job whose protocol is ``openai-chat`` or ``openai-embeddings``."""
    settings = job.service.openai
    if settings is None or settings.model is None:
        raise ValueError("protocols openai-chat and openai-embeddings need a model")
    if job.service.protocol == "openai-embeddings":
        columns = job.input.columns
        assert columns is not None and len(columns) == 1  # checked at load
        return EmbeddingsCodec(settings.model, columns[0], dimensions=settings.dimensions)
    assert settings.prompt is not None  # checked at load
    return ChatCodec(
        settings.model,
        settings.prompt,
        system=settings.system,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        response_format=settings.response_format,
    )
