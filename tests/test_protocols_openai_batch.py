"""protocol = "openai-batch": a provider's batch file run against the embedded service, its
output in the batch API's shape or in Parquet, resumed in input order."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchrunner.service.llm import embed
from tests.conftest import Invoke, read_output, write_job


def line(custom_id: str, url: str, body: dict[str, Any], method: str = "POST") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


LINES = [
    line("req-1", "/v1/chat/completions", chat("The app crashes on start")),
    line("req-2", "/v1/embeddings", {"model": "e", "input": "hello world", "dimensions": 4}),
    line("req-3", "https://elsewhere.example/v1/chat/completions", chat("x")),
    line("req-4", "/v1/chat/completions", {"model": "m", "messages": []}),
    line("req-5", "/v1/chat/completions", chat("Thanks, great work"), method="GET"),
    line("req-6", "/v1/chat/completions", chat("How do I export?")),
]


def batch_job(tmp_path: Path, lines: list[dict[str, Any]], output: str, extra: str = "") -> Path:
    data = tmp_path / "batch.jsonl"
    data.write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in lines))
    return write_job(
        tmp_path / "job.toml",
        f"""
name = "batchfile"
max_error_rate = 1
[input]
path = "{data}"
[service]
url = "embedded:llm"
protocol = "openai-batch"
{extra}
[output]
path = "{tmp_path / output}"
""",
    )


def test_a_batch_file_runs_and_its_output_has_the_batch_apis_shape(
    invoke: Invoke, tmp_path: Path
) -> None:
    result = invoke("run", str(batch_job(tmp_path, LINES, "results.jsonl")))
    assert result.exit_code == 0, result.stderr
    out = [orjson.loads(text) for text in (tmp_path / "results.jsonl").read_bytes().splitlines()]
    assert [item["custom_id"] for item in out] == [f"req-{i}" for i in range(1, 7)]
    assert all(set(item) == {"custom_id", "response", "error"} for item in out)
    first, second, elsewhere, refused, get, last = out
    assert first["error"] is None and first["response"]["status_code"] == 200
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "bug"
    assert second["response"]["body"]["data"][0]["embedding"] == embed("hello world", 4)
    assert elsewhere["response"] is None and elsewhere["error"]["code"] == "request_unfit"
    assert refused["response"] == {"status_code": 400, "body": None}
    assert refused["error"]["code"] == "http_400"
    assert "'messages' must be a non-empty list" in refused["error"]["message"]
    assert get["error"]["code"] == "request_unfit" and "only POST" in get["error"]["message"]
    assert last["response"]["body"]["choices"][0]["message"]["content"] == "question"
    summary = orjson.loads((tmp_path / "results.jsonl.summary.json").read_bytes())
    assert summary["tokens"]["in"] == 5 + 2 + 4  # the words of the three answered lines
    inspected = invoke("inspect", str(tmp_path / "results.jsonl"), "--errors")
    assert inspected.exit_code == 0, inspected.stderr
    assert "request_unfit" in inspected.stdout and "http_400" in inspected.stdout


def test_a_batch_file_to_parquet_keeps_each_answer_whole(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("run", str(batch_job(tmp_path, LINES[:2], "out.parquet")))
    assert result.exit_code == 0, result.stderr
    rows = read_output(tmp_path / "out.parquet")
    assert [row["_key"] for row in rows] == ["req-1", "req-2"]
    assert orjson.loads(rows[0]["response_body"])["usage"]["prompt_tokens"] == 5
    assert rows[0]["prompt_tokens"] == 5 and rows[0]["completion_tokens"] == 1


def test_a_batch_file_stopped_by_its_budget_resumes_in_input_order(
    invoke: Invoke, tmp_path: Path
) -> None:
    lines = [line(f"r{i}", "/v1/chat/completions", chat(f"ticket {i} crashes")) for i in range(10)]
    job = batch_job(
        tmp_path,
        lines,
        "results.jsonl",
        "[service.openai]\nmax_total_tokens = 40\n[batch]\nconcurrency = 1",
    )
    result = invoke("run", str(job))
    assert result.exit_code == 3, result.stderr
    out = [orjson.loads(text) for text in (tmp_path / "results.jsonl").read_bytes().splitlines()]
    assert [item["custom_id"] for item in out] == [f"r{i}" for i in range(10)]
    done = [item for item in out if item["error"] is None]
    assert 0 < len(done) < 10
    assert {item["error"]["code"] for item in out if item["error"]} == {"not_sent"}
    result = invoke("run", str(job), "--set", "service.openai.max_total_tokens=100000")
    assert result.exit_code == 0, result.stderr
    assert f"{len(done)} rows in {len(done)} finished batches are kept" in result.stderr
    out = [orjson.loads(text) for text in (tmp_path / "results.jsonl").read_bytes().splitlines()]
    assert [item["custom_id"] for item in out] == [f"r{i}" for i in range(10)]
    assert all(item["error"] is None for item in out)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/x", "body": {}}\nnot json\n',
            "line 2: not JSON",
        ),
        (b'{"method": "POST", "url": "/v1/x", "body": {}}\n', 'line 1: needs a "custom_id"'),
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/x", "body": "text"}\n',
            '"body" must be a JSON object',
        ),
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/x", "body": {}}\n\n'
            b'{"custom_id": "a", "method": "POST", "url": "/v1/x", "body": {}}\n',
            "line 3: custom_id 'a' comes again (first on line 1)",
        ),
    ],
)
def test_a_batch_file_that_is_not_one_is_refused_naming_the_line(
    invoke: Invoke, tmp_path: Path, text: bytes, says: str
) -> None:
    job = batch_job(tmp_path, [], "results.jsonl")
    (tmp_path / "batch.jsonl").write_bytes(text)
    result = invoke("run", str(job))
    assert result.exit_code == 2
    assert says in result.stderr


def test_the_readmes_batch_file_command_runs(invoke: Invoke, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Language models\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"batchrunner run --input requests\.jsonl .*?results\.jsonl", section, re.S)
    assert found is not None
    words = shlex.split(found.group(0).replace("\\\n", " "))[1:]
    words[words.index("http://127.0.0.1:8000/v1")] = "embedded:llm"
    batch_job(tmp_path, LINES, "unused.jsonl")
    words[words.index("requests.jsonl")] = str(tmp_path / "batch.jsonl")
    words[words.index("results.jsonl")] = str(tmp_path / "results.jsonl")
    result = invoke(*words, "--max-error-rate", "1")
    assert result.exit_code == 0, result.stderr
    out = (tmp_path / "results.jsonl").read_bytes().splitlines()
    assert [orjson.loads(text)["custom_id"] for text in out] == [f"req-{i}" for i in range(1, 7)]


def test_retry_keeps_the_batch_output_shape(invoke: Invoke, tmp_path: Path) -> None:
    job = batch_job(tmp_path, LINES, "results.jsonl")
    assert invoke("run", str(job)).exit_code == 0
    before = (tmp_path / "results.jsonl").read_bytes().splitlines()
    result = invoke("retry", str(job), str(tmp_path / "results.jsonl"))
    assert result.exit_code == 0, result.stderr
    assert "3 error rows" in result.stdout + result.stderr
    after = (tmp_path / "results.jsonl").read_bytes().splitlines()
    assert [orjson.loads(text)["custom_id"] for text in after] == [f"req-{i}" for i in range(1, 7)]
    assert all(set(orjson.loads(text)) == {"custom_id", "response", "error"} for text in after)
    # The ok lines as they were; the lines that still fail, failing the same way.
    assert [orjson.loads(t)["error"] for t in after] == [orjson.loads(t)["error"] for t in before]
    assert orjson.loads(after[0])["response"] == orjson.loads(before[0])["response"]
