"""One-file multipart/form-data bodies, parsed back by independent parsers."""

from __future__ import annotations

import asyncio
import os
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import aiohttp
import pytest
from aiohttp import BodyPartReader, web

from batchrunner.errors import RequestError
from batchrunner.protocols import multipart
from batchrunner.protocols.multipart import (
    choose_boundary,
    content_type_of,
    file_part,
    read_file,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\r\n--not-a-boundary\r\n"


def build(field: str, filename: str, content: bytes, seed: str = "3f2a") -> tuple[str, bytes]:
    form = file_part(field, filename, choose_boundary(seed, content))
    return form.content_type, form.body(content)


def parse_with_email(content_type: str, body: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert isinstance(message, EmailMessage)
    assert not message.defects
    (part,) = message.iter_parts()
    assert isinstance(part, EmailMessage)
    return part


def parse_with_aiohttp(content_type: str, body: bytes) -> tuple[str | None, str | None, bytes]:
    """(field name, file name, bytes) as a real aiohttp server reads the form."""

    async def read_form(request: web.Request) -> web.Response:
        reader = await request.multipart()
        part = await reader.next()
        assert isinstance(part, BodyPartReader)
        content = bytes(await part.read())
        assert await reader.next() is None
        return web.json_response(
            {
                "name": part.name,
                "filename": part.filename,
                "n": len(content),
                "content": content.hex(),
            }
        )

    async def main() -> tuple[str | None, str | None, bytes]:
        app = web.Application()
        app.router.add_post("/", read_form)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session:
                headers = {"Content-Type": content_type}
                async with session.post(
                    f"http://127.0.0.1:{port}/", data=body, headers=headers
                ) as answer:
                    assert answer.status == 200, await answer.text()
                    form = await answer.json()
        finally:
            await runner.cleanup()
        return form["name"], form["filename"], bytes.fromhex(form["content"])

    return asyncio.run(main())


def test_the_body_is_what_curl_sends() -> None:
    content_type, body = build("images", "test.png", b"PIXELS", seed="ab-12")
    assert content_type == "multipart/form-data; boundary=batchrunner-ab12"
    assert body == (
        b"--batchrunner-ab12\r\n"
        b'Content-Disposition: form-data; name="images"; filename="test.png"\r\n'
        b"Content-Type: image/png\r\n"
        b"\r\n"
        b"PIXELS\r\n"
        b"--batchrunner-ab12--\r\n"
    )


@pytest.mark.parametrize("parse", [parse_with_email, parse_with_aiohttp])
def test_parsers_get_field_name_and_bytes_back(parse) -> None:  # type: ignore[no-untyped-def]
    content_type, body = build("images", "photo.png", PNG)
    parsed = parse(content_type, body)
    if isinstance(parsed, EmailMessage):
        assert parsed.get_param("name", header="content-disposition") == "images"
        assert parsed.get_filename() == "photo.png"
        assert parsed.get_content_type() == "image/png"
        assert parsed.get_payload(decode=True) == PNG
    else:
        assert parsed == ("images", "photo.png", PNG)


@pytest.mark.parametrize("name", ["été rouge.png", "写真.jpg", "a;b.png", "it's.png"])
def test_names_that_are_not_plain_ascii_survive(name: str) -> None:
    content_type, body = build("images", name, b"x")
    assert parse_with_email(content_type, body).get_filename() == name
    assert parse_with_aiohttp(content_type, body)[1] == name


def test_a_name_that_needs_escaping_is_exact_where_rfc5987_is_read() -> None:
    content_type, body = build("images", 'say "cheese".png', b"x")
    assert parse_with_aiohttp(content_type, body)[1] == 'say "cheese".png'  # from filename*
    # Parsers that read only filename get what a browser would send (WHATWG escaping).
    assert parse_with_email(content_type, body).get_filename() == "say %22cheese%22.png"


def test_non_ascii_names_also_get_the_rfc5987_parameter() -> None:
    _, body = build("images", "été.png", b"x")
    head = body.split(b"\r\n\r\n")[0]
    assert b'filename="\xc3\xa9t\xc3\xa9.png"' in head  # UTF-8, as browsers and curl send
    assert b"filename*=UTF-8''%C3%A9t%C3%A9.png" in head


def test_quotes_and_line_breaks_cannot_break_the_header() -> None:
    name = 'a"b\r\nX-Evil: 1.png'
    content_type, body = build("images", name, b"x")
    head = body.split(b"\r\n\r\n")[0]
    assert b'filename="a%22b%0D%0AX-Evil: 1.png"' in head
    assert head.count(b"\r\n") == 2  # boundary, disposition, type: no injected header
    assert parse_with_aiohttp(content_type, body)[1] == name


def test_a_boundary_inside_the_file_is_avoided() -> None:
    content = b"start\r\n--batchrunner-seed\r\nmore"
    boundary = choose_boundary("seed", content)
    assert boundary == "batchrunner-seed-1"
    content_type, body = build("images", "x.bin", content, seed="seed")
    assert parse_with_email(content_type, body).get_payload(decode=True) == content


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jpg", "image/jpeg"),
        ("a.JPEG", "image/jpeg"),
        ("a.png", "image/png"),
        ("a.webp", "image/webp"),
        ("a.tif", "image/tiff"),
        ("a.bmp", "image/bmp"),
        ("a.gif", "image/gif"),
        ("noext", "application/octet-stream"),
        ("a.unknown-ext", "application/octet-stream"),
    ],
)
def test_content_type_from_the_extension(name: str, expected: str) -> None:
    assert content_type_of(name) == expected


# --- reading under a limit -----------------------------------------------------------------------


def test_read_file_within_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"12345")
    assert read_file(path, 5) == b"12345"


def test_a_file_over_the_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(b"x" * 6)
    with pytest.raises(RequestError) as caught:
        read_file(path, 5)
    assert caught.value.kind == "file_too_large"
    assert not caught.value.retryable
    assert caught.value.message.startswith("the file is 6 bytes; at most 5 fit in one request")


@pytest.mark.parametrize(("limit", "refused"), [(100, False), (50, True)])
def test_a_file_that_grows_after_its_size_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, refused: bool
) -> None:
    # fstat said 10 bytes; the file holds 60 by the time it is read: all of it is read, up
    # to the limit (and one byte beyond, to know it is over).
    path = tmp_path / "growing.png"
    path.write_bytes(b"g" * 60)
    real = os.fstat

    def stale(descriptor: int) -> os.stat_result:
        fields = list(real(descriptor))
        fields[6] = 10  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(multipart.os, "fstat", stale)
    if not refused:
        assert read_file(path, limit) == b"g" * 60
        return
    with pytest.raises(RequestError) as caught:
        read_file(path, limit)
    assert caught.value.kind == "file_too_large"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "no such file (removed after the input was listed?)"),
        (lambda p: p.mkdir(), "it is a folder"),
        (lambda p: os.mkfifo(p), "not a regular file"),
    ],
)
def test_unreadable_files(tmp_path: Path, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(RequestError) as caught:
        read_file(path, 100)
    assert caught.value.kind == "unreadable"
    assert caught.value.message == f"cannot read the file: {reason}"
