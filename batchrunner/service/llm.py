"""The embedded service's language models, behind the OpenAI-compatible routes.

Two small deterministic models stand in for a language model server (vLLM, llama.cpp's
server, Text Embeddings Inference, LiteLLM):

    POST /v1/chat/completions   a keyword classifier: it reads the messages' text and picks
                                a label (bug, question or praise, or one of the enum of a
                                JSON schema it is given); with ``response_format`` of type
                                ``json_schema`` it answers a JSON object that fits the
                                schema, with ``json_object`` ``{"label": ...}``, otherwise
                                the label as text (a schema's boolean field says
                                whether the text has an urgent word: crash, broken...)
    POST /v1/embeddings         hashed bag of words: each lower-cased word adds +-1 to one
                                of ``dimensions`` (default 64) coordinates chosen by its
                                BLAKE2 hash, and the vector is L2-normalised (a text
                                without words is all zeros). ``data`` is listed in reverse
                                order of ``index``: servers are not bound to keep the
                                order, and a client that relies on it is caught at once

Answers carry ``usage`` counted in whitespace-separated words (``prompt_tokens``: the
words of every message's content, or of every input; ``completion_tokens``: the words of
the answer's content), and each answer's ``x-ratelimit-limit-*``,
``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` headers for requests and tokens in
the current minute. Over a limit, the answer is 429 with ``retry-after-ms``. A chat answer
longer than ``max_tokens`` words is cut there (``finish_reason = "length"``; JSON is
written with spaces, ``{"label": "bug"}``, so a cut one is no longer JSON, as a real
model's is not). Errors are
OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from batchrunner.service.models import ModelInputError, TextModel
from batchrunner.service.wire import Refused, json_object

CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
DEFAULT_DIMENSIONS = 64
MAX_DIMENSIONS = 4096
# What one minute of the embedded service allows (as a provider's tier would).
REQUESTS_PER_MINUTE = 100_000
TOKENS_PER_MINUTE = 10_000_000
WINDOW_S = 60.0

#: The labels the classifier knows, and the words that vote for each.
KEYWORDS: dict[str, frozenset[str]] = {
    "bug": frozenset(
        [
            "bug",
            "error",
            "crash",
            "crashes",
            "crashed",
            "broken",
            "fails",
            "failed",
            "failure",
            "exception",
            "freeze",
            "freezes",
            "slow",
            "wrong",
            "stuck",
        ]
    ),
    "question": frozenset(["how", "what", "why", "when", "where", "which", "who", "?"]),
    "praise": frozenset(
        [
            "thanks",
            "thank",
            "great",
            "love",
            "awesome",
            "excellent",
            "amazing",
            "good",
            "nice",
            "wonderful",
            "perfect",
        ]
    ),
}
#: Words that make a boolean field of a JSON schema true ("urgent": whether it is).
URGENT = frozenset(["urgent", "asap", "immediately", "crash", "crashes", "broken", "stuck", "down"])
_WORD = re.compile(r"[\w']+|\?")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text`` (and each ``?``), as the classifier reads them."""
    return _WORD.findall(text.lower())


def count_tokens(text: str) -> int:
    """The service's token count: whitespace-separated words."""
    return len(text.split())


def classify(text: str, labels: tuple[str, ...] | None = None) -> str:
    """The label whose keywords (or whose own name) occur most in ``text``; ties and no
    match go to the first label."""
    choices = labels or tuple(KEYWORDS)
    found = words(text)
    scores = [
        sum(
            word in KEYWORDS.get(label.lower(), frozenset()) or word == label.lower()
            for word in found
        )
        for label in choices
    ]
    return choices[max(range(len(choices)), key=lambda i: (scores[i], -i))]


def embed(text: str, dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The hashed bag-of-words vector of ``text``, L2-normalised."""
    vector = [0.0] * dimensions
    for word in words(text):
        digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        vector[digest % dimensions] += 1.0 if (digest >> 63) else -1.0
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector] if norm else vector


class LabelModel(TextModel):
    """The chat classifier as a text model (``embedded:llm``): ``{"text"}`` -> ``{"label"}``,
    so the other protocols' routes answer too."""

    name = "llm"
    features = ("text",)

    def predict(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for index, record in enumerate(records):
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ModelInputError(f"req_data[{index}]: 'text' must be a string")
            results.append({"label": classify(text)})
        return results


def answer_for_schema(schema: Any, text: str) -> Any:
    """A value fitting the JSON ``schema`` (its common keywords), read from ``text``."""
    if not isinstance(schema, dict):
        return classify(text)
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        options = tuple(str(option) for option in schema["enum"])
        return schema["enum"][options.index(classify(text, options))]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: answer_for_schema(sub, text) for name, sub in properties.items()}
    if kind == "array":
        item = schema.get("items", {"type": "string"})
        count = max(int(schema.get("minItems", 1)), 1)
        return [answer_for_schema(item, text) for _ in range(count)]
    if kind == "integer":
        return len(words(text))
    if kind == "number":
        found = words(text)
        label = classify(text)
        hits = sum(word in KEYWORDS.get(label, frozenset()) for word in found)
        return round(hits / len(found), 4) if found else 0.0
    if kind == "boolean":
        return any(word in URGENT for word in words(text))
    if kind == "null":
        return None
    return classify(text)


@dataclass
class _Window:
    """Requests and tokens used in the current minute (a fixed window)."""

    clock: Callable[[], float]
    started: float = 0.0
    requests: int = 0
    tokens: int = 0

    def roll(self) -> None:
        now = self.clock()
        if now - self.started >= WINDOW_S:
            self.started, self.requests, self.tokens = now, 0, 0

    def reset_in(self) -> float:
        return max(0.0, WINDOW_S - (self.clock() - self.started))

    def headers(self) -> dict[str, str]:
        reset = _duration(self.reset_in())
        return {
            "x-ratelimit-limit-requests": str(REQUESTS_PER_MINUTE),
            "x-ratelimit-limit-tokens": str(TOKENS_PER_MINUTE),
            "x-ratelimit-remaining-requests": str(max(0, REQUESTS_PER_MINUTE - self.requests)),
            "x-ratelimit-remaining-tokens": str(max(0, TOKENS_PER_MINUTE - self.tokens)),
            "x-ratelimit-reset-requests": reset,
            "x-ratelimit-reset-tokens": reset,
        }


def _duration(seconds: float) -> str:
    """OpenAI's way of writing a wait: ``1m30s``, ``6s``, ``250ms``."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


def _error(status: int, message: str, param: str | None, headers: dict[str, str]) -> web.Response:
    kind = "rate_limit_exceeded" if status == 429 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def add_openai_routes(
    app: web.Application,
    count: Callable[[int], None],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Add ``/v1/chat/completions`` and ``/v1/embeddings``; ``count`` is told how many
    rows (messages answered, texts embedded) each successful request scored."""
    window = _Window(clock, started=clock())

    def guarded(
        handle: Callable[[dict[str, Any]], tuple[dict[str, Any], int, int]],
    ) -> Callable[[web.Request], Any]:
        async def route(request: web.Request) -> web.StreamResponse:
            window.roll()
            try:
                body = await json_object(request)
                model = body.get("model")
                if not isinstance(model, str) or not model:
                    raise Refused(400, "you must provide a model parameter", "model")
                answer, prompt, rows = handle(body)
                if (
                    window.requests + 1 > REQUESTS_PER_MINUTE
                    or window.tokens + prompt > TOKENS_PER_MINUTE
                ):
                    wait = window.reset_in()
                    return _error(
                        429,
                        f"Rate limit reached; try again in {_duration(wait)}",
                        None,
                        {**window.headers(), "retry-after-ms": str(int(wait * 1000))},
                    )
            except Refused as exc:
                return _error(exc.status, exc.message, exc.param, window.headers())
            usage = answer["usage"]
            window.requests += 1
            window.tokens += usage["total_tokens"]
            count(rows)
            return web.Response(
                body=orjson.dumps(answer),
                content_type="application/json",
                headers=window.headers(),
            )

        return route

    app.router.add_post(CHAT_PATH, guarded(_chat))
    app.router.add_post(EMBEDDINGS_PATH, guarded(_embeddings))


def _chat(body: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused(400, "'messages' must be a non-empty list", "messages")
    texts: list[str] = []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts: their text
            content = " ".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict)
            )
        if not isinstance(content, str) or message.get("role") not in (
            "system",
            "user",
            "assistant",
            "developer",
            "tool",
        ):
            raise Refused(400, f"messages[{index}] needs a role and a text content", "messages")
        texts.append(content)
    # The user's words decide (the system message says what to do, not what it is about).
    user_text = " ".join(
        text for message, text in zip(messages, texts, strict=True) if message["role"] == "user"
    )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise Refused(400, "max_tokens must be a whole number >= 1", "max_tokens")
    response_format = body.get("response_format") or {"type": "text"}
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise Refused(400, "response_format.json_schema.schema must be an object")
        content = json.dumps(answer_for_schema(schema, user_text))
    elif kind == "json_object":
        content = json.dumps({"label": classify(user_text)})
    elif kind == "text":
        content = classify(user_text)
    else:
        raise Refused(400, f"unknown response_format type {kind!r}", "response_format")
    finish = "stop"
    completion = count_tokens(content)
    if max_tokens is not None and completion > max_tokens:
        content = " ".join(content.split()[:max_tokens])
        completion, finish = max_tokens, "length"
    prompt = sum(map(count_tokens, texts))
    answer = {
        "id": "chatcmpl-" + hashlib.blake2b(orjson.dumps(body), digest_size=12).hexdigest(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return answer, prompt, 1


def _embeddings(body: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
    given = body.get("input")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise Refused(400, "'input' must be a text or a non-empty list of texts", "input")
    dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
    if type(dimensions) is not int or not 1 <= dimensions <= MAX_DIMENSIONS:
        raise Refused(400, f"dimensions must be from 1 to {MAX_DIMENSIONS}", "dimensions")
    data = [
        {"object": "embedding", "index": index, "embedding": embed(text, dimensions)}
        for index, text in enumerate(texts)
    ]
    prompt = sum(map(count_tokens, texts))
    answer = {
        "object": "list",
        "data": data[::-1],
        "model": body["model"],
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }
    return answer, prompt, len(texts)
