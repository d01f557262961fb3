"""Token sources: masking, fixed and file tokens, single-flight renewal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from batchrunner.auth import (
    FileToken,
    FixedToken,
    RenewingToken,
    Scrubber,
    Secret,
    mask_headers,
    read_env_token,
    read_secret_file,
    scrub,
)
from batchrunner.errors import AuthError, SettingError
from tests.conftest import TOKEN


def test_secret_is_masked_everywhere_but_reveal() -> None:
    secret = Secret(TOKEN)
    for shown in (repr(secret), str(secret), f"{secret} {[secret]} { ({'t': secret}) }"):
        assert TOKEN not in shown
    assert secret.reveal() == TOKEN
    assert secret == Secret(TOKEN) and secret != Secret("other") and secret != TOKEN


def test_mask_headers_hides_every_credential() -> None:
    headers = {
        "X-Auth-Token": TOKEN,
        "x-apig-appcode": "a",
        "X-Subject-Token": "s",
        "Authorization": "SDK-HMAC-SHA256 x",
        "Accept": "a",
    }
    assert mask_headers(headers) == {
        "X-Auth-Token": "****",
        "x-apig-appcode": "****",
        "X-Subject-Token": "****",
        "Authorization": "****",
        "Accept": "a",
    }


def test_scrub_removes_secrets_a_server_echoed() -> None:
    text = f"user u with password {TOKEN} is locked"
    assert scrub(text, Secret(TOKEN), None) == "user u with password **** is locked"
    assert scrub("nothing here", Secret("")) == "nothing here"


def test_a_scrubber_takes_every_secret_it_holds_out_of_text_and_bytes() -> None:
    scrubber = Scrubber(Secret(TOKEN), None, Secret(""))
    scrubber.add(Secret("issued-2"))  # a token IAM issued later
    text = f"{TOKEN} and issued-2, again {TOKEN}"
    assert scrubber.text(text) == "**** and ****, again ****"
    assert scrubber.body(text.encode()) == b"**** and ****, again ****"
    assert scrubber.body(b"clean") == b"clean"


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\x00"])
def test_a_secret_with_a_line_break_is_refused_naming_where_never_the_value(
    bad: str, tmp_path: Path
) -> None:
    value = f"tok-a1b2{bad}X-Injected: c3d4"
    with pytest.raises(SettingError) as caught:
        read_env_token("MY_TOKEN", {"MY_TOKEN": value})
    message = str(caught.value)
    assert message.startswith("service.token_env: environment variable MY_TOKEN holds a")
    assert "tok-a1b2" not in message and "c3d4" not in message
    path = tmp_path / "token"
    path.write_text(value + "\n")
    with pytest.raises(SettingError) as caught:
        read_secret_file(path, "service.token_file")
    assert str(caught.value).startswith(f"service.token_file: {path} holds a")
    assert "tok-a1b2" not in str(caught.value)


def test_env_token_names_the_variable_when_missing() -> None:
    with pytest.raises(SettingError, match="environment variable NOPE is not set or empty"):
        read_env_token("NOPE", {})
    assert read_env_token("T", {"T": f"  {TOKEN}\n"}).reveal() == TOKEN


def test_a_fixed_token_has_nothing_better() -> None:
    async def main() -> None:
        tokens = FixedToken(Secret(TOKEN))
        assert (await tokens.current()).reveal() == TOKEN
        assert await tokens.refresh(Secret(TOKEN)) is None

    asyncio.run(main())


def test_a_file_token_is_read_again_when_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")

    async def main() -> None:
        tokens = FileToken(path)
        first = await tokens.current()
        assert first.reveal() == "first"
        path.write_text("second\n")  # an external refresher replaced it
        assert await tokens.current() == first  # not read again until refused
        renewed = await tokens.refresh(first)
        assert renewed is not None and renewed.reveal() == "second"
        assert await tokens.current() == renewed
        # refused again, and the file still holds it: that is final, and it is remembered
        assert await tokens.refresh(renewed) is None
        assert await tokens.refresh(renewed) is None
        assert tokens.reads == 3  # the first read, and one per wave: not one per refusal

    asyncio.run(main())


def test_a_token_file_gone_mid_run_is_a_fatal_auth_error(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first")

    async def main() -> None:
        tokens = FileToken(path, reread_delays=(0, 0))
        first = await tokens.current()
        path.unlink()
        with pytest.raises(AuthError, match=r"refused the token, and service.token_file: cannot"):
            await tokens.refresh(first)
        assert tokens.reads == 4  # once, then again after each pause

    asyncio.run(main())


def test_a_token_file_being_rewritten_is_read_until_it_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first")

    async def main() -> None:
        tokens = FileToken(path, reread_delays=(0.05,))
        first = await tokens.current()
        path.write_text("")  # a refresher that truncates, then writes

        async def refresher() -> None:
            await asyncio.sleep(0.01)
            path.write_text("second")

        renewed, _ = await asyncio.gather(tokens.refresh(first), refresher())
        assert renewed == Secret("second")

    asyncio.run(main())


class CountingToken(RenewingToken):
    """Renews to "token-<n>", slowly, counting renewals; gives up after ``limit``."""

    def __init__(self, limit: int = 100) -> None:
        super().__init__()
        self.renewals = 0
        self.limit = limit

    async def _obtain(self, stale: Secret | None) -> Secret:
        return Secret("token-0")

    async def _renew(self, refused: Secret) -> Secret | None:
        self.renewals += 1
        await asyncio.sleep(0.01)  # while this runs, the others of the wave pile up
        return Secret(f"token-{self.renewals}") if self.renewals <= self.limit else None


def test_a_wave_of_refusals_renews_once() -> None:
    async def main() -> None:
        tokens = CountingToken()
        first = await tokens.current()
        renewed = await asyncio.gather(*(tokens.refresh(first) for _ in range(50)))
        assert tokens.renewals == 1
        assert {token.reveal() for token in renewed if token} == {"token-1"}
        # a late refusal of the old token gets the new one, without renewing again
        assert (await tokens.refresh(first)) == Secret("token-1")
        # the next wave renews once more
        second = await asyncio.gather(*(tokens.refresh(Secret("token-1")) for _ in range(20)))
        assert tokens.renewals == 2
        assert {token.reveal() for token in second if token} == {"token-2"}

    asyncio.run(main())


def test_a_wave_that_finds_nothing_better_gives_up_once() -> None:
    async def main() -> None:
        tokens = CountingToken(limit=0)
        first = await tokens.current()
        results = await asyncio.gather(*(tokens.refresh(first) for _ in range(10)))
        assert results == [None] * 10
        assert tokens.renewals == 1

    asyncio.run(main())
