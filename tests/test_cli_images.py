"""Image folders end to end: the real command, real files, the embedded ``colors`` service
and purpose-built servers on loopback."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from tests.conftest import REPO, TOKEN, read_output, write_job
from tests.servers import Call, ThreadedServer, gateway_error

COLORS = {
    "red": (220, 20, 30),
    "green": (30, 180, 40),
    "blue": (20, 40, 210),
    "yellow": (240, 220, 20),
    "white": (250, 250, 248),
    "black": (10, 10, 12),
}


def image(color: tuple[int, int, int], format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buffer, format)
    return buffer.getvalue()


def put(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def photos() -> dict[str, str]:
    """A folder of solid-colour images (nested, one with a non-ASCII name), a corrupt
    file and a text file; returns each image's key and its colour."""
    folder = Path("photos")
    labels = {
        "red.png": "red",
        "flowers/yellow.jpg": "yellow",
        "flowers/deep/blue.BMP": "blue",
        "données/été-vert.png": "green",
        "sky/white.gif": "white",
        "sky/night/black.webp": "black",
    }
    formats = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP"}
    for key, label in labels.items():
        put(folder / key, image(COLORS[label], formats[Path(key).suffix.lower()]))
    put(folder / "broken.jpg", b"\x00garbage, not a JPEG" * 10)
    put(folder / "notes.txt", b"not an image")
    return labels


def test_every_image_is_one_row_keyed_by_its_path(invoke, photos: dict[str, str]) -> None:
    result = invoke(
        "run", "--input", "photos", "--url", "embedded:colors", "--output", "out.parquet"
    )
    assert result.exit_code == 1, result.stderr  # the corrupt file is over max_error_rate 0
    rows = read_output("out.parquet")
    expected_keys = sorted([*photos, "broken.jpg"], key=lambda key: Path(key).parts)
    assert [row["_key"] for row in rows] == expected_keys  # notes.txt: skipped, not a row
    by_key = {row["_key"]: row for row in rows}
    for key, label in photos.items():
        row = by_key[key]
        assert (row["_status"], row["predicted_label"], row["_error"]) == ("ok", label, None)
        assert orjson.loads(row["scores"])[0] == [label, 1.0]
        assert (row["_http_status"], row["_attempts"], row["_request_uuid"]) == (200, 1, None)
    broken = by_key["broken.jpg"]
    assert broken["_status"] == "error"
    assert broken["_error_kind"] == "model_error"
    assert broken["_error"] == (
        "HTTP 400 MR.0105: 'broken.jpg' is not an image (its format cannot be identified)"
    )
    assert (broken["_attempts"], broken["predicted_label"]) == (1, None)
    assert "photos: 1 file skipped: 1 with other extensions (e.g. notes.txt)" in result.stderr
    assert "\n  rows        6 ok, 1 errors, 0 skipped\n" in result.stdout


def test_the_shipped_colors_job(invoke, tmp_path: Path) -> None:
    shutil.copytree(REPO / "samples" / "images", tmp_path / "samples" / "images")
    result = invoke("run", str(REPO / "jobs" / "colors.toml"))
    assert result.exit_code == 0, result.stderr
    rows = read_output("out/colors.parquet")
    assert len(rows) == 10  # the committed images and broken.jpg; notes.txt is skipped
    for row in rows:
        name = Path(row["_key"]).stem
        if name == "broken":
            assert row["_error"].startswith("HTTP 400 MR.0105: 'broken.jpg' is not an image")
        else:  # each sample is named after its colour: red-apple.png, sky/cyan-lagoon.jpg
            assert row["predicted_label"] == name.split("-")[0], row["_key"]


def test_an_empty_folder_gives_an_empty_output(invoke) -> None:
    Path("empty").mkdir()
    result = invoke(
        "run", "--input", "empty", "--url", "embedded:colors", "--output", "e.parquet",
        "--set", "input.format=images",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    table = pq.read_table("e.parquet")
    assert table.num_rows == 0
    assert table.schema.names[:3] == ["_key", "_status", "_error"]


def test_a_folder_of_images_is_told_apart_from_an_empty_one(invoke) -> None:
    Path("empty").mkdir()
    result = invoke("run", "--input", "empty", "--url", "embedded:colors")
    assert result.exit_code == 2
    assert "no input file in folder empty" in result.stderr


def test_links_outside_the_folder_are_not_followed_unless_asked(invoke) -> None:
    put(Path("photos/red.png"), image(COLORS["red"]))
    outside = put(Path("private/blue.png"), image(COLORS["blue"]))
    Path("photos/link.png").symlink_to(outside.resolve())
    base = ["run", "--input", "photos", "--url", "embedded:colors", "--output", "o.parquet"]
    assert invoke(*base).exit_code == 0
    assert [row["_key"] for row in read_output("o.parquet")] == ["red.png"]
    assert invoke(*base, "--set", "input.follow_links=true").exit_code == 0
    rows = read_output("o.parquet")
    assert [(row["_key"], row["predicted_label"]) for row in rows] == [
        ("link.png", "blue"),
        ("red.png", "red"),
    ]


def test_a_manifest_lists_the_files(invoke) -> None:
    put(Path("data/a/red.png"), image(COLORS["red"]))
    put(Path("data/b/green.png"), image(COLORS["green"]))
    Path("data/todo.txt").write_text("b/green.png\na/red.png\na/gone.png\n")
    result = invoke("run", "--input", "data/todo.txt", "--url", "embedded:colors")
    assert result.exit_code == 1
    rows = read_output("out/todo.parquet")
    assert [(r["_key"], r["predicted_label"]) for r in rows[:2]] == [
        ("b/green.png", "green"),
        ("a/red.png", "red"),
    ]
    assert (
        rows[2]["_error"]
        == "cannot read the file: no such file (removed after the input was listed?)"
    )
    assert (rows[2]["_error_kind"], rows[2]["_attempts"]) == ("unreadable", 0)


# --- against purpose-built servers: what is sent, and what is not -----------------------------


def classify(call: Call) -> web.Response:
    """Answer like an image classifier; scores as strings, as some services send them."""
    return web.json_response({"predicted_label": "rose", "scores": [["rose", "0.990"]]})


def parse_form(call: Call) -> EmailMessage:
    content_type = call.headers["Content-Type"].encode()
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type + b"\r\n\r\n" + call.body
    )
    (part,) = message.iter_parts()  # type: ignore[attr-defined]
    assert isinstance(part, EmailMessage)
    return part


def image_job(server: ThreadedServer, extra: str = "", concurrency: int = 4) -> Path:
    text = (
        f'name = "imgs"\n[input]\npath = "photos"\n{extra}\n'
        f'[service]\nurl = "{server.url}"\nfile_field = "file"\n'
        f"[batch]\nconcurrency = {concurrency}\n"
    )
    return write_job(Path("imgs.toml"), text)


def test_each_file_is_sent_as_a_form_under_the_jobs_field(invoke, photos: dict[str, str]) -> None:
    async def handle(call: Call) -> web.Response:
        return classify(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(image_job(server)))
    assert result.exit_code == 0, result.stderr
    assert len(server.calls) == 7
    sent = {}
    for call in server.calls:
        part = parse_form(call)
        assert part.get_param("name", header="content-disposition") == "file"
        sent[part.get_filename()] = (part.get_content_type(), part.get_payload(decode=True))
    assert sent["été-vert.png"] == ("image/png", Path("photos/données/été-vert.png").read_bytes())
    assert sent["blue.BMP"][0] == "image/bmp"
    rows = read_output("out/imgs.parquet")
    assert rows[0]["scores"] == [["rose", "0.990"]]  # strings stay as they came


def test_small_and_large_files_arrive_whole(invoke) -> None:
    # Files up to 256 KiB are read on the event loop, larger ones in a worker thread.
    small = os.urandom(1000)
    large = os.urandom(300 * 1024 + 7)
    put(Path("photos/a-small.png"), small)
    put(Path("photos/b-large.png"), large)

    async def handle(call: Call) -> web.Response:
        return classify(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(image_job(server)))
    assert result.exit_code == 0, result.stderr
    sent = {}
    for call in server.calls:
        part = parse_form(call)
        sent[part.get_filename()] = part.get_payload(decode=True)
    assert sent == {"a-small.png": small, "b-large.png": large}


def test_a_file_too_large_is_an_error_row_without_a_request(invoke) -> None:
    put(Path("photos/small.png"), b"s" * 100)
    put(Path("photos/huge.png"), b"h" * 5000)

    async def handle(call: Call) -> web.Response:
        return classify(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(image_job(server)), "--set", "batch.max_request_bytes=2048")
    assert result.exit_code == 1
    assert len(server.calls) == 1  # small.png only
    huge, small = read_output("out/imgs.parquet")
    assert (huge["_key"], huge["_status"], huge["_error_kind"]) == (
        "huge.png",
        "error",
        "file_too_large",
    )
    assert huge["_error"].startswith("the file is 5,000 bytes; at most 1,")
    assert huge["_error"].endswith(
        "raise batch.max_request_bytes if the service takes larger bodies"
    )
    assert (huge["_attempts"], huge["_http_status"], huge["_latency_ms"]) == (0, None, None)
    assert small["_status"] == "ok"
    assert "key huge.png was not sent: the file is 5,000 bytes" in result.stderr
    assert "\n  errors      file_too_large: 1 rows, e.g. key huge.png:" in result.stdout


def test_a_file_that_vanishes_after_the_walk_is_an_error_row(invoke) -> None:
    for name in ("a.png", "b.png", "c.png"):
        put(Path("photos") / name, b"x")

    async def handle(call: Call) -> web.Response:
        if call.number == 0:
            # The walk has listed b.png by now; it is read only when its turn comes.
            Path("photos/b.png").unlink()
        return classify(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(image_job(server, concurrency=1)))
    assert result.exit_code == 1
    assert len(server.calls) == 2
    rows = read_output("out/imgs.parquet")
    assert [(r["_key"], r["_status"], r["_attempts"]) for r in rows] == [
        ("a.png", "ok", 1),
        ("b.png", "error", 0),
        ("c.png", "ok", 1),
    ]
    assert rows[1]["_error_kind"] == "unreadable"


def test_a_file_that_vanishes_between_attempts_reports_the_request_sent(invoke) -> None:
    put(Path("photos/a.png"), b"x")

    async def handle(call: Call) -> web.Response:
        Path("photos/a.png").unlink()  # gone before the retry reads it again
        return gateway_error(503, "APIG.0203", "Backend unavailable")

    with ThreadedServer(handle) as server:
        result = invoke(
            "run", str(image_job(server)), "--set", "retry.backoff_initial=0.01"
        )  # fmt: skip
    assert result.exit_code == 1
    assert len(server.calls) == 1
    (row,) = read_output("out/imgs.parquet")
    # the retry's refusal is the row's error; the one request sent is counted
    assert (row["_status"], row["_error_kind"], row["_attempts"]) == ("error", "unreadable", 1)
    assert (
        row["_error"] == "cannot read the file: no such file (removed after the input was listed?)"
    )
    assert row["_http_status"] is None  # what this attempt got: no answer
    assert "batch 0 (1 rows from key a.png) failed after 1 attempts: cannot read" in result.stderr


def test_an_answer_that_is_not_an_object_fails_its_file(invoke) -> None:
    put(Path("photos/a.png"), b"x")

    async def handle(call: Call) -> web.Response:
        return web.json_response([{"predicted_label": "rose"}])

    with ThreadedServer(handle) as server:
        result = invoke("run", str(image_job(server)))
    assert result.exit_code == 1
    (row,) = read_output("out/imgs.parquet")
    assert row["_error_kind"] == "bad_response"
    assert row["_error"].startswith("the answer is a list, not a JSON object")


def test_a_refused_token_stops_the_run_and_every_file_still_has_a_row(invoke) -> None:
    for name in ("a.png", "b.png", "c.png", "d.png"):
        put(Path("photos") / name, b"x")

    async def handle(call: Call) -> web.Response:
        if call.number >= 1:
            body = {"error_code": "APIG.0301", "error_msg": "token expires", "request_id": "0"}
            return web.json_response(body, status=401)
        return classify(call)

    with ThreadedServer(handle) as server:
        result = invoke("run", str(image_job(server, concurrency=1)))
    assert result.exit_code == 3
    rows = read_output("out/imgs.parquet")
    assert [(r["_key"], r["_status"]) for r in rows] == [
        ("a.png", "ok"),
        ("b.png", "error"),
        ("c.png", "error"),
        ("d.png", "error"),
    ]
    assert {r["_error_kind"] for r in rows[1:]} == {"not_sent"}
    assert len(server.calls) == 2


# --- the plan and the settings ----------------------------------------------------------------


def test_dry_run_shows_the_form_not_the_bytes(invoke, photos: dict[str, str]) -> None:
    result = invoke(
        "run", "--input", "photos", "--url", "embedded:colors", "--dry-run", "--limit", "1"
    )
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "input:        photos (images)" in out
    assert "sends:        each file as form field 'images' (multipart/form-data)" in out
    assert "key:          the file's path relative to the input folder" in out
    assert "rows:         1 in 1 requests of up to 1" in out
    assert "Content-Type: multipart/form-data; boundary=batchrunner-" in out
    assert 'Content-Disposition: form-data; name="images"; filename="broken.jpg"' in out
    assert "<200 bytes of broken.jpg>" in out
    assert "garbage" not in out
    assert not Path("out").exists()


def test_dry_run_says_when_the_first_file_would_not_be_sent(invoke) -> None:
    put(Path("photos/huge.png"), b"h" * 5000)
    result = invoke(
        "run", "--input", "photos", "--url", "embedded:colors", "--dry-run",
        "--set", "batch.max_request_bytes=2048",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "(the first item would not be sent: huge.png: the file is 5,000 bytes;" in result.stdout


BATCH_SIZE_REFUSED = (
    "input.path 'photos' is read as image input, so batch.size cannot be used (each file is "
    "sent as it is, one file per request); remove it, or set input.format if 'photos' is not "
    "image input"
)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--batch-size", "8"], BATCH_SIZE_REFUSED),
        (
            ["--set", "input.columns=['a']", "--set", "output.keep_input=true"],
            "so input.columns, output.keep_input cannot be used",
        ),
        (
            ["--set", 'input.extensions=["jpg", "tif f"]'],
            "input.extensions: 'tif f' is not a file extension such as \".jpg\", "
            "got ['jpg', 'tif f']",
        ),
    ],
)
def test_settings_that_do_not_fit_image_input(
    invoke, photos: dict[str, str], options: list[str], message: str
) -> None:
    result = invoke("run", "--input", "photos", "--url", "embedded:colors", *options)
    assert result.exit_code == 2
    assert message in result.stderr


def test_image_settings_on_a_table_are_refused(invoke, features_csv: Path) -> None:
    result = invoke(
        "run", "--input", str(features_csv), "--url", "embedded:iris",
        "--set", "input.follow_links=true", "--set", "service.file_field=file",
    )  # fmt: skip
    assert result.exit_code == 2
    assert (
        "is read as a table, so input.follow_links, service.file_field cannot be used "
        "(they apply to image input only); remove them, or set input.format" in result.stderr
    )


def test_batch_size_one_is_accepted_for_images(invoke, photos: dict[str, str]) -> None:
    result = invoke(
        "validate", *_job_file("[batch]\nsize = 1\n"),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "rows:         7 in 7 requests of up to 1" in result.stdout


def _job_file(extra: str) -> list[str]:
    text = f'[input]\npath = "photos"\n[service]\nurl = "embedded:colors"\n{extra}'
    return [str(write_job(Path("photos.toml"), text))]


# --- many files -------------------------------------------------------------------------------


def test_five_thousand_images(invoke, tmp_path: Path) -> None:
    # The scale, in seconds, against the embedded service (each file costs ~2.5 ms
    # of CPU, client and service together); python -m tests.benchmarks.images runs more.
    tiny = image(COLORS["red"])
    names: list[str] = []
    for folder in range(10):
        (tmp_path / "many" / f"f{folder}").mkdir(parents=True)
        for index in range(500):
            name = f"f{folder}/{index:04d}.png"
            (tmp_path / "many" / name).write_bytes(tiny)
            names.append(name)
    result = invoke(
        "run", "--input", "many", "--url", "embedded:colors", "--output", "many.parquet",
        "--concurrency", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    table = pq.read_table("many.parquet", columns=["_key", "_status", "predicted_label"])
    assert table.column("_key").to_pylist() == names
    assert set(table.column("_status").to_pylist()) == {"ok"}
    assert set(table.column("predicted_label").to_pylist()) == {"red"}
    summary: dict[str, Any] = orjson.loads(Path("many.parquet.summary.json").read_bytes())
    assert summary["rows"] == {"total": 5000, "ok": 5000, "error": 0, "skipped": 0, "resumed": 0}
    assert summary["requests"] == 5000


# --- resuming an image folder ------------------------------------------------------------

# Each file holds its own key, and the server answers it back: a result on the wrong row
# would show.
RESUMED = ("a/1.png", "a/2.png", "b/3.png", "b/4.png", "c/5.png")


def echo_key(call: Call) -> web.Response:
    payload = parse_form(call).get_payload(decode=True)
    assert isinstance(payload, bytes)
    return web.json_response({"file": payload.decode()})


def refusing_after_two() -> tuple[dict[str, bool], Any]:
    """A handler that echoes two files, then refuses the token while ``refuse["token"]``."""
    refuse = {"token": True}

    async def handle(call: Call) -> web.Response:
        if call.number >= 2 and refuse["token"]:
            return gateway_error(401, "APIG.0301", "token expires")
        return echo_key(call)

    return refuse, handle


def put_keyed(*keys: str) -> None:
    for key in keys:
        put(Path("photos") / key, key.encode())


def assert_each_row_has_its_own_result(keys: list[str]) -> None:
    rows = read_output("out/imgs.parquet")
    assert [row["_key"] for row in rows] == keys
    assert all(row["_status"] == "ok" and row["file"] == row["_key"] for row in rows), rows


def abort_then_resume(invoke, job_extra: str, mend: Callable[[], None]) -> list[str]:
    """Run an image job whose token is refused after two files (exit 3), ``mend`` things,
    run it again with the token accepted: it resumes. The names of the files it sent."""
    refuse, handle = refusing_after_two()
    with ThreadedServer(handle) as server:
        job = image_job(server, concurrency=1)
        job.write_text(job.read_text().replace('path = "photos"', job_extra))
        first = invoke("run", str(job))
        assert first.exit_code == 3, first.stderr
        mend()
        refuse["token"] = False
        server.calls.clear()
        second = invoke("run", str(job))
    assert second.exit_code == 0, second.stderr
    assert "resuming: 2 rows in 2 finished batches are kept; 3 failed batches" in second.stderr
    return sorted(str(parse_form(call).get_filename()) for call in server.calls)


def test_an_image_run_resumes_and_takes_files_added_after_what_it_finished(invoke) -> None:
    put_keyed(*RESUMED)
    # A file after every finished one, in a subfolder (the input folder's own modification
    # time, in the job's identity, does not change).
    sent = abort_then_resume(invoke, 'path = "photos"', lambda: put_keyed("c/6.png"))
    assert sent == ["3.png", "4.png", "5.png", "6.png"]
    assert_each_row_has_its_own_result([*RESUMED, "c/6.png"])


def test_a_file_that_could_not_be_read_is_read_again_on_resume(invoke) -> None:
    put_keyed(*(key for key in RESUMED if key != "a/2.png"))
    # A manifest names a file not there yet: an `unreadable` error row, unsent.
    Path("photos/todo.txt").write_text("".join(f"{key}\n" for key in RESUMED))

    def mend() -> None:
        rows = {row["_key"]: row for row in read_output("out/imgs.parquet")}
        assert rows["a/2.png"]["_error_kind"] == "unreadable"
        put_keyed("a/2.png")  # now it is there

    sent = abort_then_resume(invoke, 'path = "photos/todo.txt"', mend)
    assert sent == ["2.png", "4.png", "5.png"]
    assert_each_row_has_its_own_result(list(RESUMED))


def interrupted_image_run(server: ThreadedServer, job: Path, calls: int) -> None:
    """Run ``job`` in a child process and interrupt it (SIGINT) after ``calls`` requests."""
    env = {**os.environ, "MODELARTS_TOKEN": TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "run", str(job), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while len(server.calls) < calls:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run sent too few requests"
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr


REFUSED = "error: the input changed since the unfinished run of this job: "


def test_an_interrupted_image_run_with_a_file_added_in_a_subfolder_is_not_resumed(
    invoke,
) -> None:
    put_keyed(*RESUMED)

    async def handle(call: Call) -> web.Response:
        await asyncio.sleep(0.05)
        return echo_key(call)

    with ThreadedServer(handle) as server:
        job = image_job(server, concurrency=1)
        interrupted_image_run(server, job, calls=3)  # a/1.png and a/2.png at least finished
        sent = len(server.calls)
        # a/0.png sorts before every finished file, and moves each one's seq by one; the
        # input folder's modification time (in the job's identity) does not change.
        put_keyed("a/0.png")
        refused = invoke("run", str(job))
        assert refused.exit_code == 2, refused.stderr
        assert REFUSED + "input item 'a/0.png' (batch 0) is not what that run sent" in (
            refused.stderr
        )
        assert "Re-run with --no-resume to start fresh" in refused.stderr
        assert len(server.calls) == sent  # nothing was sent
        assert not Path("out/imgs.parquet").exists()
        fresh = invoke("run", str(job), "--no-resume")
    assert fresh.exit_code == 0, fresh.stderr
    assert_each_row_has_its_own_result(["a/0.png", *RESUMED])


@pytest.mark.parametrize(
    ("removed", "message"),
    [
        # the finished a/2.png (batch 1) is gone: b/3.png takes its place
        (["a/2.png"], "input item 'b/3.png' (batch 1) is not what that run sent"),
        # only a/1.png is left: the finished batch 1 is past the end
        (list(RESUMED[1:]), "it now ends after batch 0, but that run finished batch 1"),
    ],
    ids=["file-removed", "input-shorter"],
)
def test_an_aborted_image_run_whose_subfolders_lost_files_is_not_resumed(
    invoke, removed: list[str], message: str
) -> None:
    put_keyed(*RESUMED)
    refuse, handle = refusing_after_two()
    with ThreadedServer(handle) as server:
        job = image_job(server, concurrency=1)
        assert invoke("run", str(job)).exit_code == 3  # a/1.png and a/2.png finished
        for key in removed:
            (Path("photos") / key).unlink()
        refuse["token"] = False
        server.calls.clear()
        refused = invoke("run", str(job))
        assert refused.exit_code == 2, refused.stderr
        assert REFUSED in refused.stderr
        assert message in refused.stderr
        assert server.calls == []
        fresh = invoke("run", str(job), "--no-resume")
    assert fresh.exit_code == 0, fresh.stderr
    assert_each_row_has_its_own_result([key for key in RESUMED if key not in removed])
