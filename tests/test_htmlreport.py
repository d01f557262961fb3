"""`inspect --html`: one self-contained page, checked as text and as rendered by a real headless
Chromium (Debian's `chromium`): its text, and a screenshot that shows the charts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageStat

from batchrunner.htmlreport import render_report
from batchrunner.inspection import count_values, inspect_output
from tests.conftest import write_csv, write_job

#: Set by .ci/run: there, a missing browser fails the test instead of skipping it.
REQUIRE_BROWSER = "BATCHRUNNER_REQUIRE_CHROMIUM"
THROUGHPUT_BLUE = (0x2F, 0x80, 0xED)
LATENCY_GREEN = (0x16, 0xA3, 0x94)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get(REQUIRE_BROWSER):
        pytest.fail(
            f"{REQUIRE_BROWSER} is set but no chromium is installed (apt-get install chromium)"
        )
    pytest.skip("no chromium here (apt-get install chromium); .ci/run installs it and requires it")


def browse(page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = page.parent / "chromium-profile"
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            f"--user-data-dir={profile}",
            *args,
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


@pytest.fixture
def output(invoke) -> Path:
    """A real run's output: 60 iris rows, 3 of which the model refuses."""
    rows = [(f"k{i}", 5.1 + i % 3, 3.5, 1.4 + i % 4, "" if i % 20 == 7 else 0.2) for i in range(60)]
    data = write_csv(
        Path("data.csv"),
        ["id", "sepal_length", "sepal_width", "petal_length", "petal_width"],
        rows,
    )
    job = write_job(
        Path("nightly.toml"),
        f'name = "nightly"\nmax_error_rate = 0.1\n[input]\npath = "{data}"\nid_column = "id"\n'
        '[service]\nurl = "embedded:iris"\n[batch]\nsize = 4\n',
    )
    assert invoke("run", str(job)).exit_code == 0
    return Path("out/nightly.parquet")


def test_the_command_writes_a_self_contained_page(invoke, output: Path) -> None:
    result = invoke("inspect", str(output), "--html", "report/nightly.html")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "report written to report/nightly.html\n"
    page = Path("report/nightly.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    for section in ("Throughput over time", "Latency distribution", "Errors by kind"):
        assert f"<h2>{section}</h2>" in page
    assert page.count("<svg") >= 2
    # nothing is loaded from anywhere: no scripts, links, images or URLs but SVG's namespace
    assert not re.search(r"<script|<link|<img|<iframe|src=|href=|url\(", page)
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}
    assert "default-src 'none'" in page


def test_values_are_escaped(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    pq.write_table(
        pa.table(
            {
                "_key": [evil, "b"],
                "_status": ["error", "ok"],
                "_error": [evil, None],
                "_error_kind": ["bad_response", None],
                "label": [evil, "fine"],
            }
        ),
        tmp_path / "o.parquet",
    )
    inspection = inspect_output(tmp_path / "o.parquet", error_limit=5)
    page = render_report(inspection, [count_values(tmp_path / "o.parquet", "label")])
    assert evil not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "No timeline in the summary" in page  # no summary: the page says so


def test_chromium_renders_the_report(invoke, output: Path, tmp_path: Path) -> None:
    assert invoke("inspect", str(output), "--html", "report.html").exit_code == 0
    page = Path("report.html")
    dom = browse(page, "--dump-dom").stdout
    text = re.sub(r"<[^>]+>", " ", dom)
    text = " ".join(text.split())
    assert "nightly: batchrunner report" in text
    assert "outcome done" in text
    assert re.search(r"60 rows 57 ok 3 errors", text), text[:400]
    assert "Rows finished per second" in text
    assert "model_error" in text and "k7" in text  # an error kind and its sample
    assert "predictresult" in text and "setosa" in text  # a result field's values
    assert len(re.findall(r"<rect ", dom)) > 5  # the charts' bars are in the rendered page

    shot = tmp_path / "report.png"
    browse(page, f"--screenshot={shot}", "--window-size=1000,1400", "--hide-scrollbars")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 1400)
    assert ImageStat.Stat(image.convert("L")).stddev[0] > 20  # not blank
    colours = {colour for _, colour in image.getcolors(maxcolors=1_000_000) or []}
    assert THROUGHPUT_BLUE in colours  # the throughput chart was drawn
    assert LATENCY_GREEN in colours  # and the latency histogram


def test_a_report_that_cannot_be_written_is_exit_2(invoke, output: Path) -> None:
    Path("taken").write_text("a file, not a folder")
    result = invoke("inspect", str(output), "--html", "taken/report.html")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --html: cannot write taken/report.html: ")
    assert "Traceback" not in result.stderr
