"""The ``colors`` model and file input in the embedded service, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from PIL import Image

from batchrunner.items import Batch
from batchrunner.protocols.modelarts import FileCodec
from batchrunner.service import (
    ModelInputError,
    RunningService,
    ServiceOptions,
    load_model,
    start_service,
)
from batchrunner.service.colors import COLOR_LABELS, ColorsModel, color_name

TOKEN = "test-token-colors-0123456789"

SOLID = {
    "red": (220, 20, 30),
    "yellow": (240, 220, 20),
    "green": (30, 180, 40),
    "cyan": (20, 210, 220),
    "blue": (20, 40, 210),
    "magenta": (200, 30, 200),
    "white": (250, 250, 248),
    "gray": (128, 128, 130),
    "black": (10, 10, 12),
}


def image_bytes(
    color: tuple[int, ...], format: str = "PNG", size: int = 16, mode: str = "RGB"
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color).save(buffer, format)
    return buffer.getvalue()


def colors_model() -> ColorsModel:
    model = load_model("colors")
    assert isinstance(model, ColorsModel)
    return model


# --- the model, without HTTP ----------------------------------------------------------------------


@pytest.mark.parametrize("label", list(SOLID))
@pytest.mark.parametrize("format", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_solid_colours_are_named(label: str, format: str) -> None:
    result = colors_model().predict_file(f"x.{format.lower()}", image_bytes(SOLID[label], format))
    assert result["predicted_label"] == label
    assert result["scores"][0] == [label, 1.0]


def test_scores_rank_every_label_and_share_the_pixels() -> None:
    image = Image.new("RGB", (10, 10), SOLID["blue"])
    image.paste(SOLID["yellow"], (0, 0, 10, 3))  # 30% yellow
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    result = colors_model().predict_file("x.png", buffer.getvalue())
    assert result["predicted_label"] == "blue"
    assert result["scores"][:2] == [["blue", 0.7], ["yellow", 0.3]]
    assert sorted(label for label, _ in result["scores"]) == sorted(COLOR_LABELS)
    assert sum(score for _, score in result["scores"]) == pytest.approx(1.0)


def test_transparent_pixels_count_for_nothing() -> None:
    image = Image.new("RGBA", (10, 10), (*SOLID["red"], 0))  # invisible red
    image.paste((*SOLID["green"], 255), (0, 0, 10, 2))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    assert colors_model().predict_file("x.png", buffer.getvalue())["predicted_label"] == "green"
    invisible = image_bytes((*SOLID["red"], 0), mode="RGBA")
    assert colors_model().predict_file("x.png", invisible)["predicted_label"] == "red"


def test_a_large_photo_is_sampled_not_counted_whole() -> None:
    big = image_bytes(SOLID["cyan"], "JPEG", size=2000)
    assert colors_model().predict_file("big.jpg", big)["scores"][0] == ["cyan", 1.0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage" * 20, "'x.jpg' is not an image (its format cannot be identified)"),
        (b"", "'x.jpg' is not an image (its format cannot be identified)"),
        (image_bytes((1, 2, 3), "PNG", size=64)[:60], "'x.jpg' cannot be decoded as an image: "),
    ],
)
def test_a_file_that_is_not_an_image_is_refused(content: bytes, message: str) -> None:
    with pytest.raises(ModelInputError) as caught:
        colors_model().predict_file("x.jpg", content)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("rgb", "label"),
    [((255, 0, 0), "red"), ((255, 128, 0), "yellow"), ((255, 0, 40), "red"),
     ((0, 0, 0), "black"), ((40, 40, 40), "black"), ((230, 230, 230), "white"),
     ((200, 200, 200), "gray"), ((120, 100, 100), "gray"), ((100, 0, 255), "blue"),
     ((160, 0, 255), "magenta")],
)  # fmt: skip
def test_color_name(rgb: tuple[int, int, int], label: str) -> None:
    assert color_name(*rgb) == label


# --- over HTTP ------------------------------------------------------------------------------------


def with_colors(
    test: Callable[[RunningService, aiohttp.ClientSession], Awaitable[None]], **options: Any
) -> None:
    async def main() -> None:
        async with (
            await start_service(ServiceOptions(model="colors", token=TOKEN, **options)) as service,
            aiohttp.ClientSession(headers={"X-Auth-Token": TOKEN}) as session,
        ):
            await test(service, session)

    asyncio.run(main())


def form(*files: tuple[str, str, bytes]) -> aiohttp.FormData:
    """A form built by aiohttp's own encoder (not ours): (field, file name, bytes) each."""
    data = aiohttp.FormData()
    for field, filename, content in files:
        data.add_field(field, content, filename=filename, content_type="image/png")
    return data


async def post(session: aiohttp.ClientSession, url: str, data: Any) -> tuple[int, Any]:
    async with session.post(url, data=data) as response:
        assert response.content_type == "application/json"
        return response.status, orjson.loads(await response.read())


def test_a_file_is_classified() -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        status, body = await post(
            session, service.url, form(("images", "r.png", image_bytes(SOLID["red"])))
        )
        assert status == 200
        assert body["predicted_label"] == "red"
        assert set(body) == {"predicted_label", "scores"}
        assert service.stats.rows_scored == 1

    with_colors(test)


@pytest.mark.parametrize(
    ("data", "status", "code", "message"),
    [
        (b'{"data": {"req_data": [{}]}}', 400, "ModelArts.4101",
         "The model 'colors' takes file input, not application/octet-stream: send one file as "
         "multipart/form-data under the form field 'images' (curl -F 'images=@photo.png')"),
        (form(("file", "r.png", b"x")), 400, "ModelArts.4101",
         "The form holds no 'images' file (its fields are 'file'): send one file"),
        (form(("images", "a.png", b"x"), ("images", "b.png", b"x")), 400, "ModelArts.4101",
         "The form holds more than one 'images' file"),
        (form(("images", "notes.txt", b"hello")), 400, "MR.0105",
         "'notes.txt' is not an image (its format cannot be identified)"),
    ],
)  # fmt: skip
def test_file_input_errors(data: Any, status: int, code: str, message: str) -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        got_status, body = await post(session, service.url, data)
        assert (got_status, body["error_code"]) == (status, code)
        assert body["error_msg"].startswith(message)

    with_colors(test)


def test_our_own_form_is_read_with_its_non_ascii_file_name(tmp_path: Path) -> None:
    corrupt = tmp_path / "été.png"
    corrupt.write_bytes(b"hello")
    request = FileCodec().encode(Batch(seq=0, keys=("été.png",), path=corrupt), "u-1")

    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        headers = {"Content-Type": request.content_type}
        async with session.post(service.url, data=request.body, headers=headers) as response:
            body = orjson.loads(await response.read())
        assert (response.status, body["error_code"]) == (400, "MR.0105")
        assert body["error_msg"] == "'été.png' is not an image (its format cannot be identified)"

    with_colors(test)


def test_a_file_over_the_body_limit_gets_413() -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        status, body = await post(session, service.url, form(("images", "big.png", b"x" * 5000)))
        assert (status, body["error_code"]) == (413, "APIG.0201")

        async def chunks() -> Any:  # no Content-Length: counted as it streams in
            yield b"x" * 3000
            yield b"x" * 3000

        data = aiohttp.FormData()
        data.add_field("images", chunks(), filename="big.png")
        status, body = await post(session, service.url, data)
        assert (status, body["error_code"]) == (413, "APIG.0201")

    with_colors(test, max_body_bytes=4096)


def test_a_malformed_multipart_body_gets_400() -> None:
    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
        async with session.post(service.url, data=b"no boundary here", headers=headers) as response:
            body = orjson.loads(await response.read())
        assert (response.status, body["error_code"]) == (400, "ModelArts.4101")

    with_colors(test)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_vendors_curl_command_for_file_input_works(tmp_path: Path) -> None:
    picture = tmp_path / "test.png"
    picture.write_bytes(image_bytes(SOLID["magenta"]))

    async def test(service: RunningService, session: aiohttp.ClientSession) -> None:
        # The vendor's file-input command, word for word but for the path, token and URL.
        command = [
            shutil.which("curl") or "curl",
            "-kv",
            "-F",
            f"images=@{picture}",
            "-H",
            f"X-Auth-Token:{service.token}",
            "-X",
            "POST",
            service.url,
        ]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
        assert process.returncode == 0, stderr.decode()
        assert b"< HTTP/1.1 200 OK" in stderr
        answer = orjson.loads(stdout)
        assert answer["predicted_label"] == "magenta"
        assert answer["scores"][0] == ["magenta", 1.0]

    with_colors(test)
